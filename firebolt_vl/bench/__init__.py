"""`firebolt-vl bench`: Firebolt-VL side by side with its peers, and decoding against the memory-bandwidth limit.

    firebolt-vl bench --preset tiny --output runs/bench-tiny              # quick (< 2 min on 2 cores)
    firebolt-vl bench --preset paper --device cpu --output runs/bench     # real shapes, random weights
    firebolt-vl bench --preset paper --device cuda --batch-sizes 1,32 --output runs/bench-gpu
    firebolt-vl bench --preset release --device cpu --output runs/bench-release   # the release's checkpoint format
    firebolt-vl bench --model fireboltvl --output runs/bench-model                # a saved model directory

For every variant (Firebolt-VL with recurrent CMM decoding, the authors' no-cache decoding, the prepend design,
LFM2-VL through transformers, the bare LFM2 decoder) it measures time to first token split into pre-processing,
vision, fusion and prefill, decoding tokens/s over a fixed number of new tokens (EOS ignored), end-to-end latency and
peak memory, over warm-up runs and timed repetitions (median and spread); the machine's memory bandwidth and the
bytes one decoding step reads, hence the bandwidth bound; and prefill scaling with the prompt length and the number
of grids. Writes OUTPUT/results.json and PNG plots; the last line printed is a JSON summary.

Modules: `measure` (clocks, memory, bandwidth), `suite` (the variants), `runner` (timed runs), `scaling`, `plots`,
`core` (the whole run).
"""

from __future__ import annotations

import sys


def add_bench_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper", "release"],
                   help="model shapes: tiny (seconds) or paper (SigLIP2-base 256 px + LFM2-350M, random weights); "
                        "release: the paper's shapes, Firebolt-VL written in the authors' checkpoint format with "
                        "random weights and converted by convert-release (S4 d_state 128 pair form, 512-tap window); "
                        "variants default to firebolt,firebolt_nocache")
    p.add_argument("--model", default=None,
                   help="bench this saved model directory (e.g. convert-release's output) as firebolt / "
                        "firebolt_nocache instead of a built one; variants default to firebolt,firebolt_nocache")
    p.add_argument("--adapter", default=None, help="with --model: a LoRA adapter directory applied on top of it")
    p.add_argument("--identity-tokens", type=int, default=None,
                   help="greedy tokens over which the cached decoding must equal the release's recompute decoding, "
                        "checked once (default: 64 for --preset release / --model, else 0 = off)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights/activations dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default: 1 on CPU, 1,32 on CUDA)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run, EOS ignored (default 256)")
    p.add_argument("--nocache-tokens", type=int, default=None,
                   help="tokens per run of the no-cache decoding (default: 16 for paper on CPU, else min(new, 64))")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per variant (short, 4 tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tiny, else bench.load.default_threads(): the cores not "
                        "busy with other work at start; --threads-under-load measures the choice)")
    p.add_argument("--int8", action="store_true", help="CPU: int8 weights (dynamic quantization of every nn.Linear)")
    p.add_argument("--quantize", default=None,
                   help="comma-separated weight-only modes among none,int8,int4,fp16 (firebolt_vl.quantize): the "
                        "Firebolt-VL model is also benchmarked quantized, as variants firebolt_int8 / _int4 / _fp16 "
                        "decoded side by side with the unquantized firebolt; targets int8_decode_vs_fp etc.")
    p.add_argument("--compile", default="auto",
                   choices=["auto", "off", "static", "default", "reduce-overhead", "max-autotune", "reduction"],
                   help="static cache + torch.compile(mode) of the decoding step; 'static': static cache, no compile; "
                        "'reduction': compiled with single-row Linears as streaming reductions (auto: reduce-overhead "
                        "= CUDA graphs on CUDA; on CPU reduction for paper / release / --model, off for tiny). On CPU "
                        "the peers (lfm2, lfm2_vl) always decode through transformers' eager step")
    p.add_argument("--lockstep", default="auto", choices=["auto", "on", "off"],
                   help="decode the cached variants side by side, one token each in turn, every step timed "
                        "(auto: on for CPU, where a shared machine's load drifts; off on CUDA: no syncs in the loop)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of firebolt,firebolt_nocache,prepend,lfm2_vl,lfm2 (default: all)")
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the prefill scaling sweeps")
    p.add_argument("--threads-under-load", action="store_true",
                   help="CPU: also time Firebolt-VL's TTFT and decoding with 1 and 2 threads, idle and beside a "
                        "competing one-core process started by the bench (a Python busy loop, a torch matmul loop)")
    p.add_argument("--scaling-lengths", default=None, help="prompt lengths of the sweep (default 64,256,1024,4096)")
    p.add_argument("--scaling-grids", default=None, help="grid counts of the sweep (default 1,2,5,10,17)")
    p.add_argument("--llamacpp", nargs="?", const=True, default=None, metavar="SRC",
                   help="also LFM2 through llama.cpp (llama-cpp-python, optional extra) vs ours at fp32/int8/int4: "
                        "SRC = llama.cpp's source tree or the llama-cpp-python sdist (its converter); skipped, with "
                        "the reason, when absent (see firebolt_vl/bench/llamacpp.py; also --variants ...,llamacpp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="directory for results.json and the PNG plots")


def bench(output: str, preset: str = "tiny", device: str = "auto", dtype: str | None = None, batch_sizes=None,
          new_tokens: int = 256, nocache_tokens: int | None = None, warmup: int = 1, repeats: int = 3,
          threads: int | None = None, int8: bool = False, compile: str = "auto", lockstep: str = "auto", variants=None,
          scaling: bool = True,
          scaling_lengths=None, scaling_grids=None, seed: int = 0, model: str | None = None,
          identity_tokens: int | None = None, quantize=None, adapter: str | None = None, llamacpp=None,
          threads_under_load: bool = False) -> int:
    """CLI entry: run the benchmark, print a one-line JSON summary last."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .core import run_bench, summary_line
    from .llamacpp import split_variants

    variants, llamacpp = split_variants(variants, llamacpp)
    result = run_bench(output=output, preset=preset, device=device, dtype=dtype, batch_sizes=batch_sizes,
                       new_tokens=new_tokens, nocache_tokens=nocache_tokens, warmup=warmup, repeats=repeats,
                       threads=threads, int8=int8, compile=compile, lockstep=lockstep, variants=variants, scaling=scaling,
                       scaling_lengths=scaling_lengths, scaling_grids=scaling_grids, seed=seed, model=model,
                       identity_tokens=identity_tokens, quantize=quantize, adapter=adapter,
                       threads_under_load=threads_under_load,
                       argv=sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "bench" else None)
    if llamacpp:
        from .llamacpp import attach

        attach(result, llamacpp, preset, seed)
    print(summary_line(result), flush=True)
    return 0


__all__ = ["bench", "add_bench_arguments"]
