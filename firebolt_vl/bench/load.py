"""Threads under load: Firebolt-VL's time to first token and decoding rate with 1 and with all cores' threads, on an
idle machine and beside a competing process that keeps one core busy (started here).

Glossary
    n   torch intra-op threads   C   cores (os.cpu_count())

An OpenMP team of n threads finishes a parallel region only when its slowest thread does: when another process
holds one of the cores, the thread scheduled there waits for its time slice at every region, and a decoding step
runs hundreds of short regions. The measurement decides the default thread count (`default_threads`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

# a pure-Python busy loop: one core at 100 %, no memory traffic to speak of
BUSY_LOOP = "import time\nwhile True:\n    pass\n"
# a torch matmul job on one thread: one core at 100 % plus its own cache and memory traffic
MATMUL_LOOP = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
               "while True:\n    a = torch.mm(a, a).clamp_(-1, 1)\n")


class Competitor:
    """A competing process on one core for the duration of a `with` block: kind "python" (busy loop) or "matmul"."""

    def __init__(self, kind: str = "python"):
        if kind not in ("python", "matmul"):
            raise ValueError(f"competitor kind must be python or matmul, got {kind!r}")
        self.kind = kind
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Competitor:
        code = BUSY_LOOP if self.kind == "python" else MATMUL_LOOP
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(1.0 if self.kind == "python" else 3.0)  # started and spinning (torch imported)
        return self

    def __exit__(self, *exc) -> bool:
        if self.proc is not None:
            self.proc.kill()  # only the process started above
            self.proc.wait()
        return False


def busy_cores(interval_s: float = 0.25) -> float | None:
    """Cores kept busy by the machine's other work right now: the non-idle share of all CPU time over `interval_s`
    (Linux /proc/stat, sampled while this process waits) times the core count. None where /proc/stat is absent."""

    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        return sum(vals[:8]), vals[3] + vals[4]

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def default_threads(cores: int | None = None, busy: float | None = -1.0) -> int:
    """The CPU thread count used when none is given: the cores not busy with other work, at least 1
    (busy: cores in use elsewhere; -1 measures it now with `busy_cores`, None means unknown = idle).

    Measured on the 2-core development machine (docs/bench/README.md, "Threads under load"): idle, 2 threads decode
    ~1.7x faster than 1 and halve the time to first token; beside one busy core, 2 threads collapse (decoding 0.57x,
    TTFT 2.2x slower than 1 thread: every parallel region waits for the thread that shares the busy core), while 1
    thread keeps its idle speed. So: all cores when idle, one fewer per core in use elsewhere."""
    cores = cores or os.cpu_count() or 1
    if busy is not None and busy < 0:
        busy = busy_cores()
    return max(1, cores - round(busy or 0.0))


@torch.no_grad()
def threads_under_load(variant, compile_mode: str | None, threads=(1, 2), new_tokens: int = 24,
                       competitors=("python",), progress=None, static=None, max_new_tokens: int | None = None) -> dict:
    """TTFT and decoding rate of `variant` (batch 1) for each thread count, idle and beside each competitor.

    compile_mode: the run's decode step ("off"/None: eager). Inductor's C++ kernels fix their thread count when
    compiled, so the step is compiled again for every other thread count than the current one, whose compiled
    runner `static` (if given; compiled for static caches of max_new_tokens) is reused; the current count is
    measured first. Restores the thread count it found."""
    from .runner import StaticRunner, run_cached

    max_new_tokens = max(max_new_tokens or new_tokens, new_tokens)  # the compiled step's static cache length
    before = torch.get_num_threads()
    threads = sorted(threads, key=lambda n: n != before)  # the current count first: its compiled step is reused
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            if compile_mode in (None, "off"):
                static = None
            elif n != before or static is None:
                torch._dynamo.reset()
                static = StaticRunner(compile_mode)
                run_cached(variant, 1, 3, static, max_new_tokens=max_new_tokens)  # compiles for n threads
            for load in ("idle", *competitors):
                if progress is not None:
                    progress(f"{n} thread(s), {load}")
                if load == "idle":
                    rec = run_cached(variant, 1, new_tokens, static, max_new_tokens=max_new_tokens)
                else:
                    with Competitor(load):
                        rec = run_cached(variant, 1, new_tokens, static, max_new_tokens=max_new_tokens)
                rows.append({"threads": n, "load": load, "ttft_s": rec["ttft_s"], "vision_s": rec["vision_s"],
                             "prefill_s": rec["prefill_s"], "decode_tok_s": rec["decode_tok_s"],
                             "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None})
    finally:
        torch.set_num_threads(before)
        if compile_mode not in (None, "off"):
            torch._dynamo.reset()
    out = {"variant": variant.name, "compile": compile_mode or "off", "new_tokens": new_tokens,
           "cores": os.cpu_count(), "rows": rows, "competitors": {"python": "a pure-Python busy loop (one core)",
                                                                  "matmul": "a one-thread torch matmul loop"}}
    # the ratios that decide the default: n threads against 1 under each load
    ratios = {}
    for load in ("idle", *competitors):
        by_n = {r["threads"]: r for r in rows if r["load"] == load}
        base = by_n.get(1)
        for n, r in by_n.items():
            if n != 1 and base and base["decode_tok_s"] and r["decode_tok_s"]:
                ratios[f"{load}_decode_{n}_vs_1"] = r["decode_tok_s"] / base["decode_tok_s"]
                ratios[f"{load}_ttft_{n}_vs_1"] = r["ttft_s"] / base["ttft_s"]
    out["ratios"] = ratios
    return out
