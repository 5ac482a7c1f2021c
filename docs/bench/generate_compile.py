"""`model.generate` end to end, eager step vs `compile=MODE` (static cache + one compiled step), at paper shapes
(random weights, one image per row, batch 1 unless --batch, EOS ignored): time to first token, decode tok/s, the compile time paid by the
first call, and whether the tokens are the same. Rounds alternate eager / compiled so both see the same load.
Writes docs/bench/cpu_paper_generate_compile.json (or the path given).

    flock /tmp/cpu.lock python docs/bench/generate_compile.py [OUT.json] [--threads N] [--new-tokens N]
        [--rounds R] [--mode reduction] [--batch B]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def timed_generate(model, inputs: dict, new_tokens: int, compile_mode: str | None) -> dict:
    from firebolt_vl.bench.measure import TimingStreamer

    streamer = TimingStreamer("cpu")
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, ignore_eos=True, streamer=streamer,
                         compile=compile_mode)
    total = time.perf_counter() - t0
    first, last = streamer.times[0], streamer.times[-1]
    B = out.shape[0]
    return {"total_s": total, "ttft_s": first - t0, "decode_tok_s": B * (len(streamer.times) - 1) / (last - first),
            "tokens": out[:, inputs["input_ids"].shape[1]:].tolist()}


def main(argv: list[str]) -> None:
    from firebolt_vl.bench.load import default_threads
    from firebolt_vl.bench.suite import build_suite

    def opt(name, default, cast=int):
        return cast(argv[argv.index(name) + 1]) if name in argv else default

    out = next((a for a in argv if a.endswith(".json")), "docs/bench/cpu_paper_generate_compile.json")
    threads, new_tokens, rounds = opt("--threads", default_threads()), opt("--new-tokens", 128), opt("--rounds", 2)
    mode, batch = opt("--mode", "reduction", str), opt("--batch", 1)
    torch.set_num_threads(threads)
    v = build_suite("paper", torch.device("cpu"), torch.float32, ["firebolt"]).variants["firebolt"]
    inputs = v.prepare(batch)
    first = timed_generate(v.model, inputs, new_tokens, mode)  # pays the compile
    runs = {"eager": [], mode: []}
    for _ in range(rounds):
        runs["eager"].append(timed_generate(v.model, inputs, new_tokens, None))
        runs[mode].append(timed_generate(v.model, inputs, new_tokens, mode))
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("total_s", "ttft_s", "decode_tok_s")}
           for k, rs in runs.items()}
    result = {
        "command": "python docs/bench/generate_compile.py " + " ".join(argv),
        "threads": threads, "batch": batch, "new_tokens": new_tokens, "rounds": rounds, "mode": mode, "torch": torch.__version__,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "median": med,
        "decode_speedup": med[mode]["decode_tok_s"] / med["eager"]["decode_tok_s"],
        "total_speedup": med["eager"]["total_s"] / med[mode]["total_s"],
        "first_compiled_call_s": first["total_s"],
        "compile_overhead_s": first["total_s"] - med[mode]["total_s"],
        "same_tokens": all(r["tokens"] == runs["eager"][0]["tokens"] for rs in runs.values() for r in rs)
        and first["tokens"] == runs["eager"][0]["tokens"],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
