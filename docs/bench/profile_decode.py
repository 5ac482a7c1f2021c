"""Per-op profile of Firebolt-VL's batch-1 decoding step at paper shapes (random weights), eager and compiled
(the CPU default: static cache + torch.compile with single-row Linears as reductions), Inductor kernels named one
by one. Writes docs/bench/cpu_decode_profile.json (or the path given).

    flock /tmp/cpu.lock python docs/bench/profile_decode.py [OUT.json] [--threads N]
"""

from __future__ import annotations

import json
import sys

import torch
import torch._inductor.config as inductor_config


def main(argv: list[str]) -> None:
    from firebolt_vl.bench.core import CPU_DECODE_COMPILE, profile_decode_step
    from firebolt_vl.bench.load import default_threads
    from firebolt_vl.bench.runner import StaticRunner
    from firebolt_vl.bench.suite import build_suite

    out = next((a for a in argv if a.endswith(".json")), "docs/bench/cpu_decode_profile.json")
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else default_threads()
    torch.set_num_threads(threads)
    inductor_config.cpp.enable_kernel_profile = True  # every Inductor kernel a profiler entry of its own
    suite = build_suite("paper", torch.device("cpu"), torch.float32, ["firebolt"])
    v = suite.variants["firebolt"]
    result = {"threads": threads, "compile": CPU_DECODE_COMPILE, "torch": torch.__version__,
              "eager": profile_decode_step(v, None, 16, steps=3, top=25)}
    static = StaticRunner(CPU_DECODE_COMPILE)
    profile_decode_step(v, static, 16, steps=1)  # compiles
    result["compiled"] = profile_decode_step(v, static, 16, steps=5, top=40)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for k in ("eager", "compiled"):
        r = result[k]
        print(k, f"{r['step_wall_ms']:.1f} ms/step", {c: round(ms, 1) for c, ms in r["categories_ms"].items()})


if __name__ == "__main__":
    main(sys.argv[1:])
