"""LFM2 through llama.cpp beside our decoding, in the same run (issue 19 part 4): the engine a CPU user would pick.

    firebolt-vl bench --preset paper --device cpu --variants firebolt,lfm2 --quantize int8,int4 --llamacpp SRC ...
    firebolt-vl bench --preset paper --device cpu --variants llamacpp --llamacpp SRC --output runs/llamacpp

What it does, on the random-weight LFM2 the bench's `lfm2` variant builds (same seed, same shapes: LFM2-350M for
--preset paper):
    1. saves it in Hugging Face layout (`save_pretrained` + the bench's offline tokenizer) to a temporary directory;
    2. converts it with llama.cpp's own `convert_hf_to_gguf.py` to F32, F16 and Q8_0 (--outtype), and quantizes the
       F32 file to Q4_0 with llama.cpp's quantizer (`llama_cpp.llama_model_quantize`, default parameters: what
       `llama-quantize model.gguf out.gguf Q4_0` writes);
    3. parity: llama.cpp's F32 logits at every position of the bench's prompt against transformers' fp32 logits
       (max |diff|, argmax agreement), and the other GGUF types against the same reference;
    4. timing, round-robin over R rounds (R = the bench's --repeats, at most 3; the order rotating, so a shared machine's load hits every engine alike),
       all with the same thread count: prefill of a P-token prompt (P = 512, llama-bench's pp512; random ids) and
       greedy decoding of N tokens (N = the bench's --new-tokens, at most 64) after
       the bench's prompt (tokens/s over the summed step times; also the rate at the median step), for
         ours      the same LFM2 through our code path (the bench's `lfm2` loop) at fp32, and weight-only int8 / int4
                   by `firebolt_vl.quantize` (torchao: every decoder nn.Linear and the LM head);
         llama.cpp F32, F16, Q8_0, Q4_0 through llama-cpp-python (batch 1, one sequence, no sampling: argmax of the
                   last logits, the bench's greedy rule).
Matching precisions: fp32 vs F32 (and F16), int8 vs Q8_0, int4 vs Q4_0; the ratios `<ours>_decode_vs_llamacpp_<type>`
and `<ours>_prefill_vs_llamacpp_<type>`; the goal `int8_decode_vs_llamacpp_q8_0` >= 0.8. When the same bench run
also decoded Firebolt-VL (firebolt, firebolt_int8, firebolt_int4), their decode rates are set against llama.cpp's
too (`firebolt_*`): those were timed earlier in the run, so those ratios carry the load drift between the two parts.

llama.cpp's converter is not part of the llama-cpp-python wheel: it lives in llama.cpp's source tree, which the
llama-cpp-python sdist vendors. `--llamacpp SRC` takes a llama.cpp checkout, the sdist's directory or the sdist
tarball itself (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`); without SRC the environment
variable FIREBOLT_LLAMA_CPP_SRC is read. The converter needs no package beyond this project's (its `gguf` package is
taken from the source tree). The pre-tokenizer check: the converter identifies a BPE tokenizer by hashing its
tokens for a fixed text; the bench's locally trained tokenizer matches no published model, so the conversion
records LFM2's pre-tokenizer name instead of stopping (it only matters for llama.cpp's own text tokenization; here
token ids are fed directly).

Everything is skipped, with the reason in the result, when llama_cpp is not importable or the source tree is not
found.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .core import _log, _ratio

REQUIREMENT = "llama-cpp-python==0.3.36"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself; others by the quantizer
# ours -> the llama.cpp type it is set against (fp32 also against F16: the float formats a CPU user would pick)
MATCHING = (("fp32", "f32"), ("fp32", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))
GOAL = ("int8_decode_vs_llamacpp_q8_0", 0.8)
SRC_ENV = "FIREBOLT_LLAMA_CPP_SRC"

_DRIVER = r"""
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:  # a locally trained tokenizer: no published hash; token ids are fed directly
        return "lfm2"
base.TextModel.get_vocab_base_pre = _pre
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


# ---------------------------------------------------------------------------------------------------- availability
def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None when `llama_cpp` is not importable."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # not installed, or its shared library does not load
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def find_source(src: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """llama.cpp's source tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/: `src` (or $FIREBOLT_LLAMA_CPP_SRC)
    is a llama.cpp checkout, a llama-cpp-python source directory (vendor/llama.cpp inside) or its sdist tarball,
    whose converter files are extracted once under `cache_dir` (default ~/.cache/firebolt_vl/llama.cpp)."""
    src = src or os.environ.get(SRC_ENV)
    if not src:
        return None
    p = Path(src).expanduser()
    for cand in (p, p / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py").is_dir():
            return cand
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        root = Path(cache_dir or Path.home() / ".cache" / "firebolt_vl" / "llama.cpp") / p.name.split(".tar")[0]
        if not (root / "convert_hf_to_gguf.py").is_file():
            with tarfile.open(p) as tf:
                members = []
                for m in tf.getmembers():
                    parts = m.name.split("/")
                    # <top>/vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/..., gguf-py/...}
                    if (len(parts) >= 4 and parts[1:3] == ["vendor", "llama.cpp"]
                            and (parts[3] in ("conversion", "gguf-py") or parts[3:] == ["convert_hf_to_gguf.py"])
                            and (m.isfile() or m.isdir())):
                        m.name = "/".join(parts[3:])
                        members.append(m)
                if not members:
                    return None
                root.mkdir(parents=True, exist_ok=True)
                tf.extractall(root, members=members, filter="data")
        return root if (root / "convert_hf_to_gguf.py").is_file() else None
    return None


def availability(src=None) -> tuple[bool, str, Path | None]:
    """(usable, reason, source tree)."""
    ver = llama_cpp_version()
    if ver is None:
        return False, (f"llama.cpp is not installed: llama_cpp is not importable (optional extra: pip install "
                       f"'{REQUIREMENT}', a source build of a few minutes)"), None
    tree = find_source(src)
    if tree is None:
        return False, (f"llama.cpp's converter (convert_hf_to_gguf.py, in llama.cpp's source tree) was not found: pass "
                       f"--llamacpp SRC or set {SRC_ENV} to a llama.cpp checkout or the llama-cpp-python sdist "
                       f"(pip download --no-deps --no-binary :all: llama-cpp-python=={ver})"), None
    return True, f"llama-cpp-python {ver}", tree


# ---------------------------------------------------------------------------------------------------- conversion
def save_hf(model, tokenizer, directory) -> Path:
    """The LFM2 in Hugging Face layout (config.json, model.safetensors, tokenizer files)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def convert(hf_dir, out_path, outtype: str, src: Path) -> Path:
    """convert_hf_to_gguf.py HF_DIR --outtype OUTTYPE --outfile OUT, in a subprocess (its imports stay out of ours)."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"the converter writes {CONVERTER_TYPES}, not {outtype!r} (use quantize_gguf)")
    cmd = [sys.executable, "-c", _DRIVER, str(src), str(hf_dir), "--outtype", outtype, "--outfile", str(out_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not Path(out_path).is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed ({proc.returncode}):\n"
                           + (proc.stderr or proc.stdout)[-3000:])
    return Path(out_path)


def quantize_gguf(src_gguf, out_path, ftype: str = "q4_0", threads: int | None = None) -> Path:
    """llama.cpp's quantizer (llama_model_quantize, default parameters) from a F32/F16 GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(out_path).encode(), params)
    if rc != 0 or not Path(out_path).is_file():
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({rc})")
    return Path(out_path)


def build_ggufs(hf_dir, out_dir, src: Path, types=GGUF_TYPES, threads: int | None = None) -> dict:
    """{type: path} for the requested GGUF types, plus conversion times under "seconds"."""
    out_dir = Path(out_dir)
    paths, secs = {}, {}
    base = None
    for t in types:
        t0 = time.perf_counter()
        path = out_dir / f"lfm2-{t}.gguf"
        if t in CONVERTER_TYPES:
            convert(hf_dir, path, t, src)
        else:
            if base is None:  # quantize from the F32 file (llama.cpp's usual input)
                base = paths.get("f32") or convert(hf_dir, out_dir / "lfm2-f32.gguf", "f32", src)
            quantize_gguf(base, path, t, threads)
        paths[t] = path
        secs[t] = time.perf_counter() - t0
    return {"paths": paths, "seconds": secs}


# ---------------------------------------------------------------------------------------------------- llama.cpp side
class LlamaCppLM:
    """One GGUF through llama-cpp-python: prefill a prompt, then one token at a time; greedy = argmax of the last
    logits (read straight from llama.cpp's buffer)."""

    def __init__(self, path, threads: int, n_ctx: int, n_batch: int = 512, logits_all: bool = False):
        import llama_cpp

        self._lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> int:
        """Fresh state, the whole prompt; returns the greedy next token."""
        self.llm.reset()
        self.llm.eval(ids)
        return int(self.last_logits().argmax())

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return int(self.last_logits().argmax())

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """(T, V) logits at every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self):
        self.llm.close()


# ---------------------------------------------------------------------------------------------------- our side
class OurLM:
    """The same LFM2 through our code path: the bench's `lfm2` variant (prefill with a dynamic cache, one token per
    step, logits_to_keep=1), optionally weight-only quantized by firebolt_vl.quantize."""

    def __init__(self, model, processor):
        from .suite import QUESTION, Lfm2Variant

        self.model = model
        self.variant = Lfm2Variant(model, processor, QUESTION, torch.device("cpu"), torch.float32)

    @torch.no_grad()
    def prefill_ids(self, ids: list[int]) -> int:
        from transformers import DynamicCache

        x = torch.tensor([ids])
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x), cache=DynamicCache(config=self.model.config),
                         use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def decode(self, new_tokens: int) -> tuple[list[float], list[int]]:
        """The bench's loop after the bench's prompt: (step times, tokens)."""
        from .runner import first_token

        _, d = first_token(self.variant, 1, new_tokens)
        for _ in range(1, new_tokens):
            t0 = time.perf_counter()
            d.advance()
            d.step_times.append(time.perf_counter() - t0)
        return d.step_times, d.tokens[0].tolist()


def quantized_copy(model, mode: str):
    """A copy of the LFM2 with firebolt_vl.quantize applied (it quantizes a model's `language_model`)."""
    import copy

    from torch import nn

    from ..quantize import quantize_model

    if mode == "fp32":
        return model
    holder = nn.Module()
    holder.language_model = copy.deepcopy(model)
    quantize_model(holder, mode)
    return holder.language_model


# ---------------------------------------------------------------------------------------------------- measurements
def parity(reference, ggufs: dict, ids: list[int], threads: int) -> dict:
    """llama.cpp's logits at every prompt position against transformers' fp32 ones, per GGUF type."""
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    out = {"prompt_tokens": len(ids), "reference": "transformers fp32 (the same weights)",
           "reference_logit_absmax": float(np.abs(ref).max()), "reference_logit_std": float(ref.std())}
    for t, path in ggufs.items():
        lm = LlamaCppLM(path, threads, n_ctx=max(64, len(ids) + 8), n_batch=max(32, len(ids)), logits_all=True)
        try:
            got = lm.all_logits(ids)
        finally:
            lm.close()
        diff = np.abs(got - ref)
        out[t] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                  "max_abs_diff_over_logit_std": float(diff.max() / ref.std()) if ref.std() > 0 else None,
                  "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}
    return out


def _rate(times: list[float]) -> dict:
    s = sum(times)
    med = statistics.median(times) if times else None
    return {"tok_s": len(times) / s if s > 0 else None, "tok_s_median_step": 1.0 / med if med else None}


def _summ(vals):
    vals = [v for v in vals if v is not None]
    return {"median": statistics.median(vals) if vals else None, "min": min(vals) if vals else None,
            "max": max(vals) if vals else None, "values": vals}


def time_engines(engines: dict, prompt_ids: list[int], prefill_ids: list[int], new_tokens: int, rounds: int) -> dict:
    """Round-robin: every round each engine prefills the long prompt once and decodes new_tokens after the bench
    prompt once (order rotating by round). engines: {name: ("ours", OurLM) | ("llamacpp", LlamaCppLM)}."""
    names = list(engines)
    runs = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            kind, eng = engines[n]
            t0 = time.perf_counter()
            if kind == "ours":
                eng.prefill_ids(prefill_ids)
            else:
                eng.prefill(prefill_ids)
            pre = time.perf_counter() - t0
            if kind == "ours":
                steps, toks = eng.decode(new_tokens)
            else:
                tok = eng.prefill(prompt_ids)
                toks, steps = [tok], []
                for _ in range(1, new_tokens):
                    t1 = time.perf_counter()
                    tok = eng.step(tok)
                    steps.append(time.perf_counter() - t1)
                    toks.append(tok)
            rec = {"prefill_s": pre, "prefill_tok_s": len(prefill_ids) / pre, **_rate(steps), "tokens": toks}
            runs[n].append(rec)
            _log(f"[llamacpp] round {r + 1}/{rounds} {n}: prefill {rec['prefill_tok_s']:.1f} tok/s, "
                 f"decode {rec['tok_s']:.2f} tok/s")
    out = {}
    for n in names:
        rs = runs[n]
        out[n] = {"prefill_tok_s": _summ([x["prefill_tok_s"] for x in rs]),
                  "decode_tok_s": _summ([x["tok_s"] for x in rs]),
                  "decode_tok_s_median_step": _summ([x["tok_s_median_step"] for x in rs]),
                  "tokens_first_run": rs[0]["tokens"]}
    return out


# ---------------------------------------------------------------------------------------------------- the comparison
def run_llamacpp_comparison(preset: str = "paper", threads: int | None = None, src=None, seed: int = 0,
                            modes=("fp32", "int8", "int4"), gguf_types=GGUF_TYPES, prefill_tokens: int = 512,
                            new_tokens: int = 64, rounds: int = 3, workdir=None, keep: bool = False,
                            time_it: bool = True) -> dict:
    """Conversion + parity + timing (see the module docstring); returns a dict (`skipped` + `reason` when
    llama.cpp or its converter is missing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..presets import tiny_text_config
    from ..processing import FireboltProcessor
    from .suite import bench_tokenizer, make_preset

    ok, reason, tree = availability(src)
    if not ok:
        _log(f"[llamacpp] skipped: {reason}")
        return {"skipped": True, "reason": reason}
    wall0 = time.perf_counter()
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    p = make_preset(preset)
    tok = bench_tokenizer()
    text = dict(p.text) if p.text is not None else tiny_text_config(len(tok), tokenizer=tok, initializer_range=0.5)
    torch.manual_seed(seed)  # as the bench's `lfm2` variant: the same random weights
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).eval().float()
    processor = FireboltProcessor(tok)
    ours = {m: OurLM(quantized_copy(model, m), processor) for m in modes}
    prompt_ids = ours[modes[0]].variant.prepare(1)["input_ids"][0].tolist()
    gen = torch.Generator().manual_seed(seed + 1)
    long_ids = torch.randint(3, text["vocab_size"], (prefill_tokens,), generator=gen).tolist()
    result = {"skipped": False, "llama_cpp_python": llama_cpp_version(), "source_tree": str(tree),
              "preset": preset, "threads": threads, "seed": seed,
              "model": f"random-weight LFM2 ({preset} shapes: hidden {text['hidden_size']}, "
                       f"{text['num_hidden_layers']} layers, vocab {text['vocab_size']}), as the bench's lfm2 variant",
              "settings": {"prompt_tokens": len(prompt_ids), "prefill_tokens": prefill_tokens, "new_tokens": new_tokens,
                           "rounds": rounds, "batch": 1,
                           "ours": "the bench's lfm2 loop (transformers LFM2, dynamic cache, logits_to_keep=1); int8 / "
                                   "int4: firebolt_vl.quantize (torchao weight-only, decoder nn.Linear + LM head)",
                           "llamacpp": "llama-cpp-python Llama.eval, n_threads = n_threads_batch = threads, "
                                       "n_batch = n_ubatch = 512, flash attention off (the binding's default); greedy "
                                       "argmax of the last logits",
                           "prefill_prompt": "random token ids (seeded), one fresh sequence per run"}}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="firebolt_llamacpp_"))
    tmp.mkdir(parents=True, exist_ok=True)
    engines = {}
    try:
        t0 = time.perf_counter()
        hf_dir = save_hf(model, tok, tmp / "hf")
        result["save_s"] = time.perf_counter() - t0
        _log(f"[llamacpp] saved the LFM2 to {hf_dir}; converting to {', '.join(gguf_types)}")
        built = build_ggufs(hf_dir, tmp, tree, gguf_types, threads)
        result["convert_s"] = built["seconds"]
        result["gguf_bytes"] = {t: p.stat().st_size for t, p in built["paths"].items()}
        _log("[llamacpp] parity: llama.cpp logits vs transformers fp32")
        result["parity"] = parity(model, built["paths"], prompt_ids, threads)
        _log("[llamacpp] conversion s " + ", ".join(f"{t} {v:.0f}" for t, v in built["seconds"].items())
             + "; parity max |logit diff| vs fp32 " + ", ".join(f"{t} {result['parity'][t]['max_abs_diff']:.2e}"
                                                              for t in built["paths"]))
        if time_it:
            n_ctx = max(prefill_tokens, len(prompt_ids) + new_tokens) + 16
            for m in modes:
                engines[f"ours_{m}"] = ("ours", ours[m])
            for t in gguf_types:
                engines[f"llamacpp_{t}"] = ("llamacpp", LlamaCppLM(built["paths"][t], threads, n_ctx=n_ctx))
            timing = time_engines(engines, prompt_ids, long_ids, new_tokens, rounds)
            result["engines"] = timing
            result["greedy_tokens_equal"] = {
                f"ours_{m}_vs_llamacpp_{t}": float(np.mean(np.array(timing[f"ours_{m}"]["tokens_first_run"])
                                                           == np.array(timing[f"llamacpp_{t}"]["tokens_first_run"])))
                for m, t in MATCHING if f"ours_{m}" in timing and f"llamacpp_{t}" in timing}
            result["ratios"] = comparison_ratios(timing)
    finally:
        for kind, eng in engines.values():
            if kind == "llamacpp":
                eng.close()
        if not keep and workdir is None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - wall0
    return result


def comparison_ratios(timing: dict, extra: dict | None = None) -> dict:
    """{ours}_{decode|prefill}_vs_llamacpp_{type} = ours / llama.cpp (medians over rounds). extra: {name: decode tok/s}
    of other variants of ours (e.g. Firebolt-VL from the same bench run) set against the llama.cpp types too."""
    def med(n, k):
        return (timing.get(n, {}).get(k) or {}).get("median")

    out = {}
    for m, t in MATCHING:
        for what in ("decode", "prefill"):
            r = _ratio(med(f"ours_{m}", f"{what}_tok_s"), med(f"llamacpp_{t}", f"{what}_tok_s"))
            if r is not None:
                out[f"{m}_{what}_vs_llamacpp_{t}"] = r
    for name, rate in (extra or {}).items():
        q = name.rsplit("_", 1)[1] if name.endswith(("_int8", "_int4")) else "fp32"
        for m, t in MATCHING:
            if m == q:
                r = _ratio(rate, med(f"llamacpp_{t}", "decode_tok_s"))
                if r is not None:
                    out[f"{name}_decode_vs_llamacpp_{t}"] = r
    return out


# ---------------------------------------------------------------------------------------------------- bench hook
def split_variants(variants, flag) -> tuple[object, object]:
    """`--variants ...,llamacpp` / `--llamacpp [SRC]` -> (variants for the main bench, llama.cpp request or None).
    `llamacpp` alone leaves the main bench the cheap `lfm2` variant (our transformers baseline)."""
    if variants is None or "llamacpp" not in str(variants):
        return variants, flag
    names = [x for x in (variants.split(",") if isinstance(variants, str) else variants) if x and x != "llamacpp"]
    return (",".join(names) if names else "lfm2"), (flag or True)


def attach(result: dict, request, preset: str, seed: int = 0) -> dict:
    """Run the comparison after a bench run, add it to results.json under `llamacpp` and its goal to `targets`."""
    import json

    from ..processing import atomic_write_text

    src = request if isinstance(request, str) else None
    threads = result.get("threads")
    if result.get("device", "cpu") != "cpu":
        res = {"skipped": True, "reason": "the llama.cpp comparison is a CPU comparison (this run used "
                                          f"{result.get('device')})"}
    else:
        settings = result.get("settings", {})
        res = run_llamacpp_comparison(preset=preset, threads=threads, src=src, seed=seed,
                                      new_tokens=min(64, settings.get("new_tokens", 64)),
                                      rounds=max(1, min(3, settings.get("timed_repeats", 3))))
    if not res.get("skipped") and "engines" in res:
        extra = {}
        for n in ("firebolt", "firebolt_int8", "firebolt_int4"):
            e = result.get("variants", {}).get(n, {}).get("batches", {}).get("1")
            if e:
                extra[n] = e["decode_tok_s"]["median"]
        if extra:
            res["ratios"].update(comparison_ratios(res["engines"], extra))
            res["notes"] = [("firebolt*_decode_vs_llamacpp_*: Firebolt-VL's rates from the main part of this bench "
                             "run (timed before the llama.cpp part), against llama.cpp's from this part")]
    result["llamacpp"] = res
    name, goal = GOAL
    value = res.get("ratios", {}).get(name) if not res.get("skipped") else None
    result.setdefault("targets", {})[name] = {
        "value": value, "target": f">= {goal}", "met": None if value is None else bool(value >= goal),
        "what": "our LFM2 int8 weight-only decode tokens/s / llama.cpp Q8_0 decode tokens/s (same weights, threads)",
        **({"note": res["reason"]} if res.get("skipped") else {})}
    if result.get("results_path"):
        atomic_write_text(Path(result["results_path"]), json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    """`python -m firebolt_vl.bench.llamacpp`: the comparison alone (no other variant), written to OUTPUT/results.json."""
    import argparse
    import json

    from ..processing import atomic_write_text

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", default="paper", choices=["tiny", "paper"])
    ap.add_argument("--llamacpp", default=None, metavar="SRC", help=f"llama.cpp's source tree or the sdist (or ${SRC_ENV})")
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: min(2, cores))")
    ap.add_argument("--modes", default="fp32,int8,int4", help="ours: fp32,int8,int4")
    ap.add_argument("--types", default=",".join(GGUF_TYPES), help="llama.cpp: f32,f16,q8_0,q4_0")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True)
    a = ap.parse_args(argv)
    threads = a.threads or min(2, os.cpu_count() or 1)
    res = run_llamacpp_comparison(preset=a.preset, threads=threads, src=a.llamacpp, seed=a.seed,
                                  modes=tuple(x for x in a.modes.split(",") if x),
                                  gguf_types=tuple(x for x in a.types.split(",") if x),
                                  prefill_tokens=a.prefill_tokens, new_tokens=a.new_tokens, rounds=a.rounds)
    res["command"] = "python -m firebolt_vl.bench.llamacpp " + " ".join(argv if argv is not None else sys.argv[1:])
    res["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    name, goal = GOAL
    print(json.dumps({"skipped": res.get("skipped"), "reason": res.get("reason"), "ratios": res.get("ratios"),
                      "goal": {name: res.get("ratios", {}).get(name), "target": f">= {goal}"},
                      "results": str(out / "results.json")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
