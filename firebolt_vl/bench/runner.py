"""Timed runs of the benchmark variants: pre-process -> vision -> fusion -> prefill (first token) -> N - 1 decoding
steps, always exactly N new tokens (EOS ignored), greedy (the same argmax for every variant).

Glossary
    B batch rows   T prompt tokens   N new tokens   V vocabulary

The decoding loop keeps per-token work minimal: no host synchronisation inside it (the chosen token stays on the
device and feeds the next step; tokens are written into a preallocated (B, N) buffer), no re-encoding, no re-running
of the prefix. Clocks sync the device only at stage boundaries.

Two ways to time decoding:
    solo      each variant decodes its N tokens alone, one clock around the loop (no sync inside: the GPU way)
    lockstep  the cached variants decode side by side, one token each in turn, every step timed on its own (CPU).
              On a shared machine the load changes from second to second; variants that alternate every few hundred
              milliseconds see the same load, so their ratios stay meaningful. Reported: tokens/s over the total of
              the step times, and over the median step time (robust to load spikes).

With `compile` set, the cached variants decode through a static cache (transformers StaticCache, SSM state and
attention mask in fixed buffers) and a `torch.compile`d step; on CUDA mode "reduce-overhead" captures the step in a
CUDA graph.
"""

from __future__ import annotations

import statistics
import time

import torch

from .measure import PeakMemory, TimingStreamer, now, quick_read_bandwidth


class StaticRunner:
    """A torch.compile'd decoding step per variant, reused across runs (static caches live on the variant).
    mode: see `firebolt_vl.static_decoding.compile_decode_step` ("static": the static-cache step run eagerly)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._fns = {}

    def step_fn(self, variant):
        if variant.name not in self._fns:
            from ..static_decoding import compile_decode_step

            self._fns[variant.name] = compile_decode_step(variant.static_step_fn(), self.mode)
        return self._fns[variant.name]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B, 1) greedy choice, on the device."""
    return logits.argmax(-1, keepdim=True)


class Decoding:
    """A variant after its prefill: `advance()` decodes one more token (no host sync), `tokens` holds them all."""

    def __init__(self, variant, st, tok: torch.Tensor, new_tokens: int, static: StaticRunner | None):
        self.variant, self.st, self.tok = variant, st, tok
        self.tokens = torch.empty(tok.shape[0], new_tokens, dtype=torch.long, device=tok.device)
        self.tokens[:, :1] = tok
        self.i = 1
        self.step_times: list[float] = []
        if static is not None and variant.supports_static():
            fn = static.step_fn(variant)
            full_mask, pos = st.full_mask(), st.first_positions()  # (B, L), (B, 1)

            def stepper(t):
                logits = fn(t, pos, full_mask, st.lm_cache, st.memory, st.ssm_state)
                pos.add_(1)
                return logits

            self._step = stepper
        else:
            self._step = lambda t: variant.step(t, st)

    def advance(self) -> None:
        self.logits = self._step(self.tok)  # (B, V), kept for the compiled-vs-eager check
        self.tok = _argmax(self.logits)
        self.tokens[:, self.i : self.i + 1] = self.tok
        self.i += 1


@torch.no_grad()
def first_token(variant, batch: int, new_tokens: int, static: StaticRunner | None = None,
                max_new_tokens: int | None = None) -> tuple[dict, Decoding]:
    """Pre-process, vision, fusion, prefill and the first token, each stage timed; peak memory over them."""
    dev = variant.device
    use_static = static is not None and variant.supports_static()
    with PeakMemory(dev) as mem:
        t0 = now(dev)
        inp = variant.prepare(batch)
        t1 = now(dev)
        vis = variant.vision(inp)
        t2 = now(dev)
        fused = variant.fusion(inp, vis)
        t3 = now(dev)
        T = variant.prompt_tokens(inp)
        if use_static:
            logits, st = variant.static_prefill(inp, fused, T + (max_new_tokens or new_tokens))
        else:
            logits, st = variant.prefill(inp, fused)
        tok = _argmax(logits)
        t4 = now(dev)
    rec = {
        "preprocess_s": t1 - t0,
        "vision_s": t2 - t1,
        "fusion_s": t3 - t2,
        "prefill_s": t4 - t3,
        "ttft_s": t4 - t1,
        "ttft_with_preprocess_s": t4 - t0,
        "peak_mem_mb": mem.peak_mb,
        "peak_over_start_mb": mem.delta_mb,
        "prompt_tokens": T,
        "new_tokens": new_tokens,
    }
    return rec, Decoding(variant, st, tok, new_tokens, static if use_static else None)


def _finish(rec: dict, d: Decoding, decode_s: float, batch: int) -> dict:
    n = rec["new_tokens"]
    rec["decode_s"] = decode_s
    rec["decode_tok_s"] = batch * (n - 1) / decode_s if n > 1 and decode_s > 0 else None
    rec["e2e_s"] = rec["ttft_with_preprocess_s"] + decode_s
    rec["e2e_tok_s"] = batch * n / rec["e2e_s"]
    if d.step_times:
        med = statistics.median(d.step_times)
        rec["step_s_median"] = med
        rec["decode_tok_s_median_step"] = batch / med if med > 0 else None
    rec["tokens"] = d.tokens.cpu()
    return rec


@torch.no_grad()
def run_cached(variant, batch: int, new_tokens: int, static: StaticRunner | None = None,
               max_new_tokens: int | None = None) -> dict:
    """One solo run of a cached variant: stage times, decoding throughput, peak memory, the new tokens."""
    dev = variant.device
    with PeakMemory(dev) as mem:
        rec, d = first_token(variant, batch, new_tokens, static, max_new_tokens)
        t4 = now(dev)
        for _ in range(1, new_tokens):
            d.advance()
        t5 = now(dev)
    rec["peak_mem_mb"], rec["peak_over_start_mb"] = mem.peak_mb, mem.delta_mb
    return _finish(rec, d, t5 - t4, batch)


@torch.no_grad()
def run_lockstep(variants: list, batch: int, new_tokens: int, static: StaticRunner | None = None,
                 bandwidth_every: int = 0) -> tuple[dict, list[float]]:
    """First tokens one variant after the other, then decoding side by side, one token each in turn (the order
    rotating every step), every step timed. Returns ({name: record}, read-bandwidth samples taken meanwhile)."""
    dev = variants[0].device
    recs, decs = {}, {}
    for v in variants:
        recs[v.name], decs[v.name] = first_token(v, batch, new_tokens, static, new_tokens)
    samples = []
    order = [v.name for v in variants]
    for i in range(1, new_tokens):
        k = i % len(order)
        for name in order[k:] + order[:k]:
            d = decs[name]
            t0 = now(dev)
            d.advance()
            d.step_times.append(now(dev) - t0)
        if bandwidth_every and i % bandwidth_every == 0:
            samples.append(quick_read_bandwidth(dev))
    return {n: _finish(recs[n], decs[n], sum(decs[n].step_times), batch) for n in order}, samples


@torch.no_grad()
def run_nocache(variant, batch: int, new_tokens: int, extra_prefix: torch.Tensor | None = None) -> dict:
    """One timed run of the authors' decoding through `generate(use_cache=False)`, timed by a streamer.
    extra_prefix (1, k) token ids appended to the prompt: measures the per-token cost late in a long answer."""
    dev = variant.device
    with PeakMemory(dev) as mem:
        t0 = now(dev)
        inp = variant.prepare(batch)
        if extra_prefix is not None:
            ids = torch.cat([inp["input_ids"], extra_prefix.to(dev).expand(batch, -1)], 1)
            inp = {**inp, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        t1 = now(dev)
        streamer = TimingStreamer(dev)
        seq = variant.generate(inp, new_tokens, streamer)
        t5 = now(dev)
    first, last = streamer.times[0], streamer.times[-1]
    decode = last - first
    steps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
    med = statistics.median(steps) if steps else None
    return {
        "preprocess_s": t1 - t0,
        "vision_s": None,
        "fusion_s": None,
        "prefill_s": None,
        "ttft_s": first - t1,
        "ttft_with_preprocess_s": first - t0,
        "decode_s": decode,
        "decode_tok_s": batch * (new_tokens - 1) / decode if new_tokens > 1 and decode > 0 else None,
        "step_s_median": med,
        "decode_tok_s_median_step": batch / med if med else None,
        "e2e_s": t5 - t0,
        "e2e_tok_s": batch * new_tokens / (t5 - t0),
        "peak_mem_mb": mem.peak_mb,
        "peak_over_start_mb": mem.delta_mb,
        "prompt_tokens": int(inp["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "tokens": seq[:, -new_tokens:].cpu(),
    }


def run_variant(variant, batch: int, new_tokens: int, static: StaticRunner | None = None,
                max_new_tokens: int | None = None) -> dict:
    if variant.kind == "nocache":
        return run_nocache(variant, batch, new_tokens)
    return run_cached(variant, batch, new_tokens, static, max_new_tokens)


@torch.no_grad()
def check_against_generate(variant, new_tokens: int = 6) -> dict:
    """The benchmark's own loop must produce the tokens of the model's `generate` (greedy, EOS ignored)."""
    from .suite import FireboltVariant, Lfm2Variant

    t0 = time.perf_counter()
    mine = run_cached(variant, 1, new_tokens)["tokens"]
    inp = variant.prepare(1)
    if isinstance(variant, FireboltVariant):
        ref = variant.model.generate(**inp, max_new_tokens=new_tokens, ignore_eos=True)[:, -new_tokens:]
    elif isinstance(variant, Lfm2Variant):
        ref = variant.model.generate(**inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=0)[:, -new_tokens:]
    else:
        return {"checked": False}
    return {"checked": True, "tokens_match_generate": bool(torch.equal(mine, ref.cpu())), "new_tokens": new_tokens,
            "check_s": time.perf_counter() - t0}


def check_cached_vs_nocache(variant, new_tokens: int = 64) -> dict:
    """Greedy tokens of Firebolt-VL's cached decoding (CMM recurrence + LFM2 cache) against the authors' released
    decoding (`generate(use_cache=False)`: vision, CMM and the whole prefix recomputed per token), batch 1, EOS ignored,
    each timed once."""
    inp = variant.prepare(1)
    model = variant.model
    t0 = time.perf_counter()
    cached = model.generate(**inp, max_new_tokens=new_tokens, ignore_eos=True)[:, -new_tokens:].cpu()
    t1 = time.perf_counter()
    nocache = model.generate(**inp, max_new_tokens=new_tokens, ignore_eos=True, use_cache=False)[:, -new_tokens:].cpu()
    t2 = time.perf_counter()
    differ = (cached != nocache)[0].nonzero()
    return {"new_tokens": new_tokens, "prompt_tokens": int(inp["input_ids"].shape[1]),
            "identical": bool(torch.equal(cached, nocache)),
            "first_difference": int(differ[0]) if len(differ) else None,
            "distinct_tokens": len(set(cached[0].tolist())),
            "cached_s": t1 - t0, "nocache_s": t2 - t1,
            "note": "each decoding timed once, including its prefill (first token)"}
