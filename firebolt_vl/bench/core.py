"""The benchmark run: build the variants, measure bandwidth, time warm-up + repeated runs round-robin, aggregate,
sweep prefill scaling, check the targets, write results.json + PNG plots, print a one-line JSON summary.

Glossary
    B batch rows   T prompt tokens   N new tokens   L context length (T + tokens generated so far)

Variants run round-robin inside every repetition (the order rotates from one repetition to the next), so a change
of load on a shared machine hits all of them alike; the bandwidth is re-sampled at every repetition for the same
reason. All models stay resident for the whole run: peak memory is reported as the process peak during a variant's
runs and as the growth over the memory held when the run started (activations, caches), next to the variant's
weight bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

PAPER_TOK_S = 46.67  # paper Table 2: one H100, batch 1, POPE, 256 new tokens
# --compile auto on CPU (real shapes): static cache + torch.compile with single-row Linears as reductions, the fastest
# correct batch-1 step measured on the 2-core AVX2 development machine (docs/bench/README.md, "Decoding speed")
CPU_DECODE_COMPILE = "reduction"
TARGETS = {
    "decode_vs_lfm2": (">=", 1.1, "Firebolt-VL decode tokens/s / bare LFM2 decode tokens/s through transformers "
                       "(its stock eager step on CPU; batch 1)"),
    "decode_vs_nocache": (">=", 20.0, "Firebolt-VL cached decode tokens/s / no-cache (authors') decode tokens/s"),
    "bandwidth_fraction": (">=", 0.8, "Firebolt-VL decode tokens/s / memory-bandwidth bound (batch 1)"),
    "decode_compiled_vs_eager": ("report", None, "Firebolt-VL decode tokens/s, compiled static-cache step / the same "
                                 "model's eager step (batch 1, decoded in lockstep)"),
    "ttft_vs_lfm2_vl": ("<=", 0.25, "Firebolt-VL time to first token / LFM2-VL's (256 image tokens), same image"),
    "vision_compute_fraction": ("report", None, "Firebolt-VL vision: achieved matmul GFLOP/s / the machine's sgemm "
                                "GFLOP/s at the tower's shapes"),
    "prefill_compute_fraction": ("report", None, "Firebolt-VL fusion + prefill: achieved matmul GFLOP/s / sgemm "
                                 "GFLOP/s at the decoder's prefill shapes"),
    "gpu_decode_tok_s_batch1": (">=", 10 * PAPER_TOK_S, "GPU decode tokens/s at batch 1 (10x the paper's 46.67)"),
    "gpu_decode_tok_s_batch32": ("report", None, "GPU decode throughput at batch 32 (tokens/s, all rows)"),
    "tiny_wall_s": ("<=", 120.0, "wall time of a --preset tiny run (2 cores)"),
    "int8_decode_vs_fp": (">=", 1.8, "Firebolt-VL int8 weight-only decode tokens/s / the same model unquantized"),
    "int4_decode_vs_fp": ("report", None, "Firebolt-VL int4 weight-only decode tokens/s / the same model unquantized"),
    "fp16_decode_vs_fp": ("report", None, "Firebolt-VL with fp16-stored weights (fp32 compute) decode tokens/s / the "
                                          "same model in fp32"),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_ints(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [x for x in str(value).replace(" ", "").split(",") if x]
    try:
        out = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {value!r}") from None
    if not out or any(x < 1 for x in out):
        raise ValueError(f"{name} must hold positive integers, got {value!r}")
    return out


def _target(name: str, value, note: str | None = None) -> dict:
    op, goal, what = TARGETS[name]
    met = None
    if value is not None and goal is not None:
        met = bool(value >= goal) if op == ">=" else bool(value <= goal)
    out = {"value": value, "target": None if goal is None else f"{op} {goal}", "met": met, "what": what}
    if note:
        out["note"] = note
    return out


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "tokens"}


def run_bench(
    output: str,
    preset: str = "tiny",
    device: str = "auto",
    dtype: str | None = None,
    batch_sizes=None,
    new_tokens: int = 256,
    nocache_tokens: int | None = None,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    int8: bool = False,
    compile: str = "auto",
    lockstep: str = "auto",
    variants=None,
    scaling: bool = True,
    scaling_lengths=None,
    scaling_grids=None,
    seed: int = 0,
    model: str | None = None,
    identity_tokens: int | None = None,
    quantize=None,
    adapter: str | None = None,
    threads_under_load: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """Run the benchmark; returns the full result dict (also written to OUTPUT/results.json)."""
    from tqdm.auto import tqdm

    from ..hub import parse_dtype, resolve_device

    if adapter is not None and model is None:
        raise ValueError("--adapter needs --model (the base model directory it was trained on)")
    from ..processing import atomic_write_text
    from .measure import machine_info, measure_bandwidth, quick_read_bandwidth, summarize
    from .plots import plot_results
    from .runner import StaticRunner, check_against_generate, run_lockstep, run_variant
    from .suite import EXTRA_VARIANTS, VARIANT_NAMES, build_suite, make_preset

    wall0 = time.perf_counter()
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (one prefill token + decoding steps), got {new_tokens}")
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    preset_obj = make_preset(preset)
    dev = resolve_device(device)
    dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
    # tiny matrices gain nothing from a second thread, and on a busy machine an OpenMP team waiting for a descheduled
    # thread stalls every small op: the tiny preset runs single-threaded unless told otherwise
    from .load import busy_cores, default_threads

    busy = busy_cores() if not threads and preset != "tiny" else None
    n_threads = threads or (1 if preset == "tiny" else default_threads(busy=busy))
    torch.set_num_threads(n_threads)
    batches = _parse_ints(batch_sizes, "--batch-sizes") or ([1, 32] if dev.type == "cuda" else [1])
    default_names = ("firebolt", "firebolt_nocache") if (preset == "release" or model) else VARIANT_NAMES
    names = [x for x in (variants.split(",") if isinstance(variants, str) else (variants or default_names)) if x]
    from ..quantize import check_mode

    quant = [check_mode(q) for q in (quantize.split(",") if isinstance(quantize, str) else (quantize or ())) if q]
    quant = [q for i, q in enumerate(quant) if q != "none" and q not in quant[:i]]  # firebolt itself is the float one
    if quant and "firebolt" not in names:
        raise ValueError("--quantize adds quantized copies of the firebolt variant: keep firebolt in --variants")
    unknown = [n for n in names if n not in VARIANT_NAMES + EXTRA_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANT_NAMES + EXTRA_VARIANTS)}")
    real_shapes = preset in ("paper", "release") or model is not None
    slow_nocache = real_shapes and dev.type == "cpu"
    n_nocache = nocache_tokens or (16 if slow_nocache else min(new_tokens, 64))
    n_nocache = max(2, min(n_nocache, new_tokens))
    from ..static_decoding import COMPILE_MODES

    mode = compile
    if mode == "auto":
        # CUDA: CUDA graphs. CPU at real shapes: the fastest batch-1 step measured (docs/bench/README.md); the tiny
        # preset decodes eagerly (its compile time would exceed its whole decoding)
        mode = "reduce-overhead" if dev.type == "cuda" else ("off" if preset == "tiny" else CPU_DECODE_COMPILE)
    if mode != "off" and mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be auto, off or one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    static = StaticRunner(mode) if mode != "off" else None
    if static is not None and "firebolt" in names and "firebolt_eager" not in names and variants is None:
        names.insert(names.index("firebolt") + 1, "firebolt_eager")  # the eager step, decoded side by side
    if lockstep not in ("auto", "on", "off"):
        raise ValueError(f"--lockstep must be auto, on or off, got {lockstep!r}")
    use_lockstep = lockstep == "on" or (lockstep == "auto" and dev.type == "cpu")
    lengths = _parse_ints(scaling_lengths, "--scaling-lengths") or preset_obj.scaling_lengths
    grids = _parse_ints(scaling_grids, "--scaling-grids") or preset_obj.scaling_grids
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)

    _log(f"[bench] preset={preset} device={dev} dtype={dtype_name} threads={n_threads} batches={batches} "
         f"new_tokens={new_tokens} (no-cache: {n_nocache}) compile={mode} int8={int8} quantize={quant}")
    torch.manual_seed(seed)
    suite = build_suite(preset, dev, dt, names, int8=int8, seed=seed,
                        progress=lambda n: _log(f"[bench] built {n}"), model_dir=model, quantize=quant, adapter=adapter)
    if dev.type == "cpu":  # the peers decode through transformers' own (eager, DynamicCache) step: the reference
        for n in ("lfm2", "lfm2_vl"):
            if n in suite.variants:
                suite.variants[n].compiled_step = False
    # cached vs the release's recompute decoding, token for token (greedy), once: default 64 tokens for the release
    n_identity = identity_tokens if identity_tokens is not None else (64 if (preset == "release" or model) else 0)
    result = {
        "schema": "firebolt-bench/1",
        "command": "firebolt-vl bench " + " ".join(argv) if argv is not None else None,
        "preset": preset,
        "model": model,
        "adapter": adapter,
        "device": str(dev),
        "dtype": dtype_name,
        "threads": n_threads,
        "threads_choice": ("given" if threads else "tiny preset: 1" if preset == "tiny" else
                           f"bench.load.default_threads: {os.cpu_count()} cores, {busy if busy is None else round(busy, 2)} "
                           "busy with other work at start"),
        "int8": bool(int8),
        "quantize": quant,
        "compile": mode,
        "cuda_graphs": mode == "reduce-overhead" and dev.type == "cuda",
        "decode_timing": "lockstep" if use_lockstep else "solo",
        "kernels": _kernel_report(),
        "machine": machine_info(dev),
        "settings": {
            "batch_sizes": batches,
            "new_tokens": new_tokens,
            "nocache_new_tokens": n_nocache,
            "warmup_runs": warmup,
            "timed_repeats": repeats,
            "sampling": "greedy argmax, EOS ignored: every variant generates exactly the same number of tokens",
            "question": suite.question,
            "image_px": suite.image.size[0],
            "firebolt_view_geometry": _geometry(suite),
            "seed": seed,
            "weights": "random (seeded), real shapes for --preset paper / release: SigLIP2-base 256 px + LFM2-350M"
                       + ("; release: Firebolt-VL converted from the authors' checkpoint format"
                          if preset == "release" else ""),
        },
        "build_s": suite.build_s,
        "notes": [],
        "gpu": None,
    }
    notes = result["notes"]
    if dev.type != "cuda":
        where = ("a GPU is available but this run used the CPU" if torch.cuda.is_available()
                 else "no GPU on this machine (none was lent to this task)")
        result["gpu"] = {"available": torch.cuda.is_available(),
                         "note": f"no GPU figures: {where}. The CUDA path (bf16, static cache + torch.compile mode "
                                 "reduce-overhead = CUDA graphs, allocator peak memory, batch 1 and 32) exists: "
                                 "`firebolt-vl bench --preset paper --device cuda --output DIR`"}
    if "firebolt_nocache" in suite.variants:
        notes.append(f"firebolt_nocache decodes {n_nocache} tokens per run instead of {new_tokens} (it recomputes "
                     "vision, CMM and the whole prefix per token); its rates are per token over those tokens, measured "
                     "at batch 1 only. Its prefix is shorter than later in a long answer, so over those first tokens "
                     "its per-token cost is underestimated; it is also measured late in the answer (prompt + "
                     "new_tokens - 4 tokens of prefix, 4 tokens) and the mean of the two is reported as "
                     "full_answer_per_token_s_estimate (the cost grows about linearly with the prefix).")
    notes.extend(suite.notes)
    for v in suite.variants.values():
        notes.extend(v.notes)
    if use_lockstep:
        notes.append("decode timing 'lockstep': in every repetition the cached variants first produce their first "
                     "tokens one after the other (TTFT stages timed), then decode side by side, one token each in "
                     "turn, every step timed; decode_tok_s = batch x (N - 1) / sum of the step times, "
                     "decode_tok_s_median_step = batch / median step time (robust to load spikes); peak memory of a "
                     "cached variant is measured over its first-token stages (decoding adds only its cache, counted "
                     "in bytes_per_step)")
    if dev.type == "cpu":
        notes.append(f"CPU timings on a shared machine ({os.cpu_count()} cores, load average at start "
                     f"{result['machine']['loadavg_at_start']}): noisy; variants run round-robin per repetition so "
                     "load changes hit all alike; medians and spreads reported.")

    # ---- memory bandwidth (the decoding limit)
    _log("[bench] measuring memory bandwidth")
    bw = measure_bandwidth(dev)
    result["bandwidth"] = bw
    bw_samples = [bw["read_gbps"]]

    # ---- correctness of the benchmark loops (and compile warm-up)
    checks = {}
    for name in ("firebolt", "prepend", "lfm2", *(f"firebolt_{q}" for q in quant)):
        if name in suite.variants:
            checks[name] = check_against_generate(suite.variants[name], min(6, new_tokens))
    if static is not None:
        for name, v in suite.variants.items():
            if v.kind == "cached" and v.supports_static():
                _log(f"[bench] compiling the decoding step of {name} (mode {mode})")
                checks.setdefault(name, {}).update(check_compiled_step(v, static, min(8, new_tokens), new_tokens))
    if n_identity > 0 and "firebolt" in suite.variants and "firebolt_nocache" in suite.variants:
        from .runner import check_cached_vs_nocache

        _log(f"[bench] greedy tokens of the cached decoding vs the release's recompute decoding, {n_identity} tokens")
        checks["cached_vs_nocache"] = check_cached_vs_nocache(suite.variants["firebolt"], n_identity)
        _log(f"[bench] identical: {checks['cached_vs_nocache']['identical']} "
             f"(cached {checks['cached_vs_nocache']['cached_s']:.1f} s, "
             f"recompute {checks['cached_vs_nocache']['nocache_s']:.1f} s)")
    if suite.release_check is not None:
        checks["release_s4_exact"] = suite.release_check
    result["consistency"] = checks

    # ---- timed runs
    records = {n: {b: [] for b in batches} for n in suite.variants}
    warm_records = {n: {b: [] for b in batches} for n in suite.variants}
    cached_names = [n for n, v in suite.variants.items() if v.kind == "cached"]
    nocache_names = [n for n, v in suite.variants.items() if v.kind == "nocache"]
    plan = []  # (batch, repetition (< 0: warm-up), names run together)
    for b in batches:
        for rep in range(-warmup, repeats):
            k = rep % max(len(cached_names), 1) if rep >= 0 else 0
            order = cached_names[k:] + cached_names[:k]
            if use_lockstep and rep >= 0 and order:
                plan.append((b, rep, tuple(order)))
            else:
                plan += [(b, rep, (n,)) for n in order]
            if b == 1:
                plan += [(b, rep, (n,)) for n in nocache_names]
    bar = tqdm(plan, desc="bench runs", file=sys.stderr, disable=None)
    last_rep = None
    for b, rep, group in bar:
        if rep >= 0 and (b, rep) != last_rep:
            bw_samples.append(quick_read_bandwidth(dev))
            last_rep = (b, rep)
        what = f"B={b} {'+'.join(group)} {'warm-up' if rep < 0 else f'rep {rep + 1}/{repeats}'}"
        bar.set_postfix_str(what)
        if bar.disable:  # no progress bar (not a terminal): one log line per run instead
            _log(f"[bench] run {what}")
        sink = warm_records if rep < 0 else records
        if len(group) > 1:
            recs, samples = run_lockstep([suite.variants[n] for n in group], b, new_tokens, static,
                                         bandwidth_every=64)
            bw_samples += samples
            for n, rec in recs.items():
                sink[n][b].append(rec)
            continue
        v = suite.variants[group[0]]
        tokens = n_nocache if v.kind == "nocache" else new_tokens
        if rep < 0:
            tokens = min(tokens, 4)
        sink[group[0]][b].append(run_variant(v, b, tokens, static, max_new_tokens=new_tokens))
    bar.close()

    # the no-cache decoding late in a long answer: its prefix has grown by new_tokens - k tokens
    late = {}
    if nocache_names and 1 in batches:
        from .runner import run_nocache
        from .scaling import _text_ids

        k = min(4, n_nocache)
        grow = new_tokens - k
        if grow > n_nocache:
            prefix = _text_ids(suite.tokenizer, grow, torch.Generator().manual_seed(seed))
            for n in nocache_names:
                late[n] = []
                for rep in range(repeats):
                    _log(f"[bench] run B=1 {n} late in the answer (+{grow} tokens of prefix, {k} tokens) "
                         f"rep {rep + 1}/{repeats}")
                    late[n].append(run_nocache(suite.variants[n], 1, k, extra_prefix=prefix))
    bw_median = summarize(bw_samples)["median"]
    bw_best = max(bw_samples)
    result["bandwidth"]["samples_gbps"] = bw_samples
    result["bandwidth"]["used_gbps"] = bw_median
    result["bandwidth"]["used"] = "median of the read-bandwidth samples taken at start and before every repetition"
    result["memory_method"] = "CUDA allocator peak" if dev.type == "cuda" else "RSS high-water mark (VmHWM)"

    # ---- aggregate
    keys = ["preprocess_s", "vision_s", "fusion_s", "prefill_s", "ttft_s", "ttft_with_preprocess_s", "decode_s",
            "decode_tok_s", "step_s_median", "decode_tok_s_median_step", "e2e_s", "e2e_tok_s", "peak_mem_mb",
            "peak_over_start_mb"]
    result["variants"] = {}
    for n, v in suite.variants.items():
        entry = {"description": v.description, "kind": v.kind, "params": v.total_params(),
                 "weights_mb": v.resident_bytes() / 2**20, "batches": {}}
        if n == "lfm2_vl":
            entry["image_tokens"] = v.image_tokens
        elif n in ("firebolt", "prepend", "firebolt_nocache"):
            entry["image_tokens"] = v.model.config.image_seq_length
            entry["grids"] = v.model.config.num_grids
        for b in batches:
            recs = records[n][b]
            if not recs:
                continue
            e = {k: summarize([r.get(k) for r in recs]) for k in keys}
            warm = warm_records[n][b]
            if warm:  # first (warm-up) run: includes first-touch allocations
                e["peak_mem_mb_first_run"] = max(r["peak_mem_mb"] for r in warm if r.get("peak_mem_mb") is not None)
            e["new_tokens"] = recs[0]["new_tokens"]
            e["prompt_tokens"] = recs[0]["prompt_tokens"]
            e["tokens_identical_across_runs"] = all(torch.equal(r["tokens"], recs[0]["tokens"]) for r in recs)
            e["runs"] = [_strip(r) for r in recs]
            if v.kind == "cached":
                ctx = e["prompt_tokens"] + e["new_tokens"] / 2  # mean context length over the decoding
                wbytes = v.weight_bytes(b)
                cbytes = v.cache_bytes(b, ctx)
                step_bytes = wbytes + cbytes
                e["bytes_per_step"] = {"weights": wbytes, "caches": cbytes, "total": step_bytes,
                                       "per_token": step_bytes / b, "mean_context": ctx}
                e["bound_tok_s"] = b * bw_median * 1e9 / step_bytes
                e["bound_tok_s_best_bandwidth"] = b * bw_best * 1e9 / step_bytes
                med = e["decode_tok_s"]["median"]
                e["bound_fraction"] = med / e["bound_tok_s"] if med else None
                e["bound_fraction_best_bandwidth"] = med / e["bound_tok_s_best_bandwidth"] if med else None
                ms = e["decode_tok_s_median_step"]["median"]
                e["bound_fraction_median_step"] = ms / e["bound_tok_s"] if ms else None
                e["achieved_gbps"] = med * step_bytes / b / 1e9 if med else None
            else:
                e["per_token_s"] = summarize([1.0 / r["decode_tok_s"] for r in recs if r["decode_tok_s"]])
                if late.get(n) and b == 1:
                    lr = late[n]
                    late_per_token = summarize([1.0 / r["decode_tok_s"] for r in lr if r["decode_tok_s"]])
                    early_s, late_s = e["per_token_s"]["median"], late_per_token["median"]
                    e["late_in_answer"] = {
                        "prefix_tokens": lr[0]["prompt_tokens"],
                        "new_tokens": lr[0]["new_tokens"],
                        "per_token_s": late_per_token,
                        "runs": [_strip(r) for r in lr],
                    }
                    # per-token cost grows ~linearly with the prefix: the mean over a whole answer of new_tokens
                    # tokens is about the mean of the costs measured at its start and at its end
                    e["full_answer_per_token_s_estimate"] = (early_s + late_s) / 2 if early_s and late_s else None
                    e["full_answer_decode_tok_s_estimate"] = (
                        1.0 / e["full_answer_per_token_s_estimate"] if e["full_answer_per_token_s_estimate"] else None)
            entry["batches"][str(b)] = e
        result["variants"][n] = entry

    # greedy tokens of each quantized copy against the unquantized model (same prompt, first timed run, batch 1)
    if quant and 1 in batches and records["firebolt"][1]:
        ref = records["firebolt"][1][0]["tokens"][0]
        result["quantized_tokens"] = {}
        for q in quant:
            mine = records[f"firebolt_{q}"][1][0]["tokens"][0]
            differ = (mine != ref).nonzero()
            result["quantized_tokens"][q] = {"equal_share": float((mine == ref).float().mean()),
                                             "first_difference": int(differ[0]) if len(differ) else None,
                                             "new_tokens": int(ref.numel())}

    # ---- where one decoding step's time goes (per-op profile)
    if dev.type == "cpu" and 1 in batches:
        result["decode_profile"] = {}
        for name in ("firebolt", "firebolt_eager", "lfm2"):
            if name in suite.variants:
                _log(f"[bench] profiling decoding steps of {name}")
                v = suite.variants[name]
                result["decode_profile"][name] = profile_decode_step(v, static if v.supports_static() else None,
                                                                     new_tokens)

    # ---- compute roofline of the first-token stages
    if 1 in batches and any(n in suite.variants for n in ("firebolt", "lfm2_vl", "lfm2")):
        _log("[bench] compute roofline: matmul FLOPs of vision and prefill, sgemm GFLOP/s at their shapes")
        result["roofline"] = compute_roofline(suite, result, dev)

    # ---- threads under load (1 vs all threads, idle and beside a competing process)
    if threads_under_load and "firebolt" in suite.variants and dev.type == "cpu":
        from .load import threads_under_load as measure_threads

        counts = sorted({1, min(2, os.cpu_count() or 1), n_threads})
        result["threads_under_load"] = measure_threads(
            suite.variants["firebolt"], mode, threads=counts, new_tokens=min(24, new_tokens),
            competitors=("python", "matmul"), progress=lambda s: _log(f"[bench] threads under load: {s}"),
            static=static, max_new_tokens=new_tokens)

    # ---- scaling sweeps
    if scaling and any(n in suite.variants for n in ("firebolt", "prepend", "lfm2_vl")):
        from .scaling import run_scaling

        _log(f"[bench] prefill scaling: lengths {lengths}, grids {grids}")
        result["scaling"] = run_scaling(suite, lengths, grids, grid_text_tokens=min(256, max(lengths)),
                                        progress=lambda s: _log(f"[bench] scaling {s}"))

    result["targets"] = _targets(result, batches, dev, preset)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - wall0
    if preset == "tiny":
        result["targets"]["tiny_wall_s"] = _target("tiny_wall_s", result["wall_s"],
                                                   f"{n_threads} threads; wall time includes building and scaling")
    result["plots"] = plot_results(result, out_dir)
    result["results_path"] = str(out_dir / "results.json")
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=1))
    return result


@torch.no_grad()
def compute_roofline(suite, result: dict, dev: torch.device) -> dict:
    """Vision and prefill (fusion + prefill) of each variant at batch 1 as fractions of the machine's matrix-multiply
    throughput: FLOPs counted once (torch.utils.flop_counter: matmuls, attention), divided by the stage's median time
    from the timed runs, over torch.mm's GFLOP/s measured now at the stage's typical GEMM shape:
        vision   (P, D_v) x (D_v, F_v)   P patch tokens per encoder call, F_v the tower's MLP width
        prefill  (T, D) x (D, F)         T prompt tokens, F the decoder's widest Linear (its FFN)"""
    from torch import nn

    from .measure import count_flops, measure_matmul

    def widest(module) -> int:
        return max(m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    out = {"method": compute_roofline.__doc__.split("\n\n")[0].strip(), "variants": {}}
    gflops = {}  # "MxKxN" -> torch.mm GFLOP/s
    for name in ("firebolt", "prepend", "lfm2_vl", "lfm2"):
        v = suite.variants.get(name)
        e = result["variants"].get(name, {}).get("batches", {}).get("1")
        if v is None or not e:
            continue
        inp = v.prepare(1)
        vis_flops, vis = count_flops(lambda v=v, inp=inp: v.vision(inp))
        fus_flops, fused = count_flops(lambda v=v, inp=inp, vis=vis: v.fusion(inp, vis))
        pre_flops, _ = count_flops(lambda v=v, inp=inp, fused=fused: v.prefill(inp, fused))
        T = v.prompt_tokens(inp)
        model = v.model
        if name in ("firebolt", "prepend"):
            vc, enc = model.config.vision_config, model.vision
            patches = [(b[2] - b[0]) // enc.patch_size * ((b[3] - b[1]) // enc.patch_size) for b in enc.boxes]
            if model.config.view_size is not None:
                patches = [(model.config.view_size // enc.patch_size) ** 2] * len(patches)
            calls = 1 if model.config.view_size is not None or enc.is_naflex else len(
                {b[2] - b[0] for b in enc.boxes})
            shapes = {"vision": (sum(patches) // calls, vc.hidden_size, vc.intermediate_size),
                      "prefill": (T, model.config.text_config.hidden_size, widest(model.language_model.get_decoder()))}
        elif name == "lfm2_vl":
            vc = model.config.vision_config
            shapes = {"vision": (int(inp["pixel_attention_mask"].sum()), vc.hidden_size, vc.intermediate_size),
                      "prefill": (T, model.config.text_config.hidden_size,
                                  widest(model.model.language_model))}
        else:
            shapes = {"prefill": (T, model.config.hidden_size, widest(model.model))}
        new = [shape for shape in shapes.values() if "x".join(map(str, shape)) not in gflops]
        if new:  # variants sharing a tower or a decoder share shapes: each is measured once
            gflops.update(measure_matmul(new, dev))
        row = {"prompt_tokens": T}
        for stage, flops, secs in (("vision", vis_flops, e["vision_s"]["median"]),
                                   ("prefill", fus_flops + pre_flops, (e["fusion_s"]["median"] or 0)
                                    + (e["prefill_s"]["median"] or 0))):
            if stage not in shapes or not secs:
                continue
            M, K, N = shapes[stage]
            peak = gflops[f"{M}x{K}x{N}"]
            achieved = flops / secs / 1e9
            row[stage] = {"gflop": flops / 1e9, "median_s": secs, "achieved_gflops": achieved,
                          "sgemm_shape": [M, K, N], "sgemm_gflops": peak, "fraction": achieved / peak}
        out["variants"][name] = row
    return out


def _op_category(name: str, shapes) -> str:
    """Where a profiled op's time goes: weights (matrix-vector products / the compiled reductions that replace them;
    the LM head apart), attention, cache and copies, the rest."""
    n = name.lower()
    flat = str(shapes)
    if any(k in n for k in ("addmm", "aten::mm", "aten::mv", "linear", "matmul")) or ("cpp_fused" in n and "sum" in n):
        return "lm_head" if "65536" in flat else "weights"
    if any(k in n for k in ("attention", "bmm", "softmax")):
        return "attention"
    if any(k in n for k in ("copy", "cat", "index", "slice", "select", "view", "stack", "scatter")):
        return "copies_and_cache"
    if "compiled" in n or "torch-compiled" in n:
        return "compiled_region_overhead"
    return "other"


@torch.no_grad()
def profile_decode_step(variant, static, max_new_tokens: int, steps: int = 3, top: int = 20) -> dict:
    """torch.profiler over `steps` decoding steps (batch 1, after one warm step): per op self CPU time per step
    (ms), its share, the input shapes, and the totals by category (`_op_category`). With a compiled step the
    Inductor kernels show one by one only if it was compiled with torch._inductor.config.cpp.enable_kernel_profile;
    otherwise the compiled region is one entry."""
    from torch.profiler import ProfilerActivity, profile

    from .runner import first_token

    _, d = first_token(variant, 1, steps + 2, static, max_new_tokens)
    d.advance()  # warm
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            d.advance()
    wall = (time.perf_counter() - t0) / steps
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps  # ms per step
    cats: dict = {}
    rows = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
        ms = e.self_cpu_time_total / 1e3 / steps
        cat = _op_category(e.key, e.input_shapes)
        cats[cat] = cats.get(cat, 0.0) + ms
        if len(rows) < top:
            rows.append({"op": e.key, "calls_per_step": e.count / steps, "self_ms": ms,
                         "share": ms / total if total else None, "input_shapes": str(e.input_shapes)[:160],
                         "category": cat})
    return {"variant": variant.name, "steps": steps, "step_wall_ms": wall * 1e3, "profiled_self_ms": total,
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top_ops": rows,
            "note": "self CPU time of the calling thread's ops (intra-op worker threads run inside them); profiler "
                    "overhead included in step_wall_ms"}


@torch.no_grad()
def check_compiled_step(variant, static, new_tokens: int, max_new_tokens: int) -> dict:
    """The compiled static-cache step against the variant's eager step, batch 1: both decode from the same first
    token, the compiled one fed the eager one's tokens (teacher forcing), so every step's logits (V,) compare.
    Returns whether the greedy tokens match at every step, the largest absolute logit difference and that over the
    largest |logit|, and the compile time (the first compiled run)."""
    from .runner import first_token

    _, ref = first_token(variant, 1, new_tokens)
    ref_logits = []
    for _ in range(1, new_tokens):
        ref.advance()
        ref_logits.append(ref.logits.float())
    t0 = time.perf_counter()
    _, comp = first_token(variant, 1, new_tokens, static, max_new_tokens)
    diff, scale, same = 0.0, 0.0, bool(torch.equal(comp.tok, ref.tokens[:, :1]))
    for i in range(1, new_tokens):
        comp.tok = ref.tokens[:, i - 1 : i].clone()  # contiguous, like the argmax it stands for (no recompile)
        comp.advance()
        diff = max(diff, float((comp.logits.float() - ref_logits[i - 1]).abs().max()))
        scale = max(scale, float(ref_logits[i - 1].abs().max()))
        same = same and bool(torch.equal(comp.tok, ref.tokens[:, i : i + 1]))
    return {"compiled_tokens_match_eager": same, "compiled_logits_max_abs_diff": diff,
            "compiled_logits_max_rel_diff": diff / scale if scale else None, "compared_steps": new_tokens - 1,
            "compile_s": time.perf_counter() - t0}


def _b1(result, name, key="decode_tok_s"):
    e = result["variants"].get(name, {}).get("batches", {}).get("1")
    if not e:
        return None
    v = e.get(key)
    return v.get("median") if isinstance(v, dict) else v


def _ratio(a, b):
    return a / b if a is not None and b else None


def _paired(result, a, b, key="decode_tok_s"):
    """Median over repetitions of the per-repetition ratio a/b (runs of one repetition are adjacent in time)."""
    from .measure import summarize

    ea = result["variants"].get(a, {}).get("batches", {}).get("1")
    eb = result["variants"].get(b, {}).get("batches", {}).get("1")
    if not ea or not eb:
        return None
    ra, rb = ea["runs"], eb["runs"]
    vals = [x[key] / y[key] for x, y in zip(ra, rb) if x.get(key) and y.get(key)]
    return summarize(vals)["median"]


def _targets(result, batches, dev, preset) -> dict:
    t = {}
    fb, lm, nc = _b1(result, "firebolt"), _b1(result, "lfm2"), _b1(result, "firebolt_nocache")
    t["decode_vs_lfm2"] = _target("decode_vs_lfm2", _ratio(fb, lm))
    if t["decode_vs_lfm2"]["value"] is not None:
        t["decode_vs_lfm2"]["paired_median"] = _paired(result, "firebolt", "lfm2")
        t["decode_vs_lfm2"]["median_step"] = _ratio(_b1(result, "firebolt", "decode_tok_s_median_step"),
                                                    _b1(result, "lfm2", "decode_tok_s_median_step"))
    t["decode_vs_nocache"] = _target("decode_vs_nocache", _ratio(fb, nc),
                                     "no-cache rate over its first tokens (see settings.nocache_new_tokens)")
    if t["decode_vs_nocache"]["value"] is not None:
        t["decode_vs_nocache"]["over_full_answer_estimate"] = _ratio(
            fb, _b1(result, "firebolt_nocache", "full_answer_decode_tok_s_estimate"))
        t["decode_vs_nocache"]["median_step"] = _ratio(_b1(result, "firebolt", "decode_tok_s_median_step"),
                                                       _b1(result, "firebolt_nocache", "decode_tok_s_median_step"))
    frac = _b1(result, "firebolt", "bound_fraction")
    t["bandwidth_fraction"] = _target("bandwidth_fraction", frac)
    if frac is not None:
        t["bandwidth_fraction"]["at_best_bandwidth"] = _b1(result, "firebolt", "bound_fraction_best_bandwidth")
        t["bandwidth_fraction"]["median_step"] = _b1(result, "firebolt", "bound_fraction_median_step")
        t["bandwidth_fraction"]["bound_tok_s"] = _b1(result, "firebolt", "bound_tok_s")
    ttft = _ratio(_b1(result, "firebolt", "ttft_s"), _b1(result, "lfm2_vl", "ttft_s"))
    t["ttft_vs_lfm2_vl"] = _target("ttft_vs_lfm2_vl", ttft)
    if ttft is not None:
        t["ttft_vs_lfm2_vl"]["with_preprocess"] = _ratio(_b1(result, "firebolt", "ttft_with_preprocess_s"),
                                                         _b1(result, "lfm2_vl", "ttft_with_preprocess_s"))
        t["ttft_vs_lfm2_vl"]["paired_median"] = _paired(result, "firebolt", "lfm2_vl", "ttft_s")
    eager = _b1(result, "firebolt_eager")
    t["decode_compiled_vs_eager"] = _target("decode_compiled_vs_eager", _ratio(fb, eager),
                                            f"compile mode {result['compile']}" if eager else "no eager variant in this run")
    if eager:
        t["decode_compiled_vs_eager"]["paired_median"] = _paired(result, "firebolt", "firebolt_eager")
        t["decode_compiled_vs_eager"]["eager_bound_fraction"] = _b1(result, "firebolt_eager", "bound_fraction")
        t["decode_compiled_vs_eager"]["eager_vs_lfm2"] = _ratio(eager, lm)
    roof = result.get("roofline", {}).get("variants", {}).get("firebolt", {})
    for stage in ("vision", "prefill"):
        r = roof.get(stage)
        t[f"{stage}_compute_fraction"] = _target(f"{stage}_compute_fraction", r["fraction"] if r else None)
        if r:
            t[f"{stage}_compute_fraction"].update(achieved_gflops=r["achieved_gflops"], sgemm_gflops=r["sgemm_gflops"],
                                                  gflop=r["gflop"])
    for q in ("int8", "int4", "fp16"):
        if f"firebolt_{q}" in result["variants"]:
            t[f"{q}_decode_vs_fp"] = _target(f"{q}_decode_vs_fp", _ratio(_b1(result, f"firebolt_{q}"), fb),
                                             "same model, decoded in lockstep with the unquantized one" if
                                             result["decode_timing"] == "lockstep" else None)
            t[f"{q}_decode_vs_fp"]["paired_median"] = _paired(result, f"firebolt_{q}", "firebolt")
            t[f"{q}_decode_vs_fp"]["median_step"] = _ratio(_b1(result, f"firebolt_{q}", "decode_tok_s_median_step"),
                                                         _b1(result, "firebolt", "decode_tok_s_median_step"))
            t[f"{q}_decode_vs_fp"]["bound_ratio"] = _ratio(_b1(result, f"firebolt_{q}", "bound_tok_s"),
                                                         _b1(result, "firebolt", "bound_tok_s"))
            t[f"{q}_decode_vs_fp"]["greedy_tokens_equal_fp"] = result.get("quantized_tokens", {}).get(q)
    if dev.type == "cuda":
        t["gpu_decode_tok_s_batch1"] = _target("gpu_decode_tok_s_batch1", fb)
        b32 = result["variants"].get("firebolt", {}).get("batches", {}).get("32")
        t["gpu_decode_tok_s_batch32"] = _target("gpu_decode_tok_s_batch32",
                                                b32["decode_tok_s"]["median"] if b32 else None)
    else:
        note = "no GPU in this run"
        t["gpu_decode_tok_s_batch1"] = _target("gpu_decode_tok_s_batch1", None, note)
        t["gpu_decode_tok_s_batch32"] = _target("gpu_decode_tok_s_batch32", None, note)
    if preset == "tiny":
        for k in ("decode_vs_lfm2", "decode_vs_nocache", "bandwidth_fraction", "ttft_vs_lfm2_vl"):
            t[k]["note"] = "targets are defined for --preset paper; tiny-preset figures are for smoke testing"
    return t


def _geometry(suite) -> dict | None:
    v = suite.variants.get("firebolt") or suite.variants.get("prepend")
    if v is None:
        return None
    c = v.model.config
    return {"image_size": c.image_size, "tile_size": c.tile_size, "tile_overlap": c.tile_overlap,
            "grid": f"{c.grid_rows}x{c.grid_cols}", "global_view": c.add_global_view, "view_size": c.view_size,
            "grids": c.num_grids}


def _kernel_report() -> dict:
    """Which optional fused kernels are importable (transformers' LFM2 and our Mamba use them when present)."""
    out = {}
    for mod in ("causal_conv1d", "mamba_ssm"):
        try:
            __import__(mod)
            out[mod] = True
        except Exception:
            out[mod] = False
    return out


def summary_line(result: dict) -> str:
    """The one-line JSON summary printed last: key figures at the smallest batch, targets, output paths."""
    b0 = str(min(result["settings"]["batch_sizes"]))
    variants = {}
    for n, e in result["variants"].items():
        x = e["batches"].get(b0) or next(iter(e["batches"].values()), None)
        if not x:
            continue
        variants[n] = {
            "ttft_s": x["ttft_s"]["median"],
            "decode_tok_s": x["decode_tok_s"]["median"],
            "e2e_s": x["e2e_s"]["median"],
            "new_tokens": x["new_tokens"],
            "peak_mem_mb": x["peak_mem_mb"]["median"],
            "bound_fraction": x.get("bound_fraction"),
        }
    summary = {
        "schema": result["schema"],
        "preset": result["preset"],
        "device": result["device"],
        "dtype": result["dtype"],
        "batch": int(b0),
        "bandwidth_gbps": result["bandwidth"]["used_gbps"],
        "variants": variants,
        "targets": {k: {"value": v["value"], "target": v["target"], "met": v["met"]} for k, v in result["targets"].items()},
        "compile": result["compile"],
        "threads": result["threads"],
        "roofline": {n: {st: r[st]["fraction"] for st in ("vision", "prefill") if st in r}
                     for n, r in result.get("roofline", {}).get("variants", {}).items()} or None,
        "threads_under_load": ({"rows": [{k: r[k] for k in ("threads", "load", "ttft_s", "decode_tok_s")}
                                         for r in result["threads_under_load"]["rows"]],
                                "ratios": result["threads_under_load"]["ratios"]}
                               if "threads_under_load" in result else None),
        "cached_vs_nocache": ({k: result["consistency"]["cached_vs_nocache"][k] for k in ("new_tokens", "identical")}
                              if "cached_vs_nocache" in result.get("consistency", {}) else None),
        "results": result["results_path"],
        "plots": result["plots"],
        "wall_s": result["wall_s"],
    }
    return json.dumps(summary)
