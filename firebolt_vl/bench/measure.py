"""Measuring tools of the benchmark: clocks that respect CUDA's asynchrony, peak memory, memory bandwidth, summaries.

Glossary
    B   batch rows      N   new tokens      GB  10^9 bytes      MB  2^20 bytes

Peak memory is the resident set size (RSS) high-water mark on CPU (the Linux `VmHWM` counter, reset through
`/proc/self/clear_refs` before each measured run) and the caching allocator's peak on CUDA. Bandwidth is what
read-only kernels (a reduction and a matrix-vector product; the faster counts) achieve over buffers far larger than
the last-level cache with the benchmark's own thread count: the ceiling that batch-1 decoding, a read of every weight
per token, can approach.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time

import torch

MB = 2**20


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (a no-op on CPU), so host clocks bracket the work they time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device | str | None = None) -> float:
    """perf_counter after a device sync."""
    if device is not None:
        sync(device)
    return time.perf_counter()


def summarize(values: list[float]) -> dict:
    """Median and spread of repeated measurements: median, mean, min, max, IQR, relative IQR, stdev, n, values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": None, "mean": None, "min": None, "max": None, "iqr": None, "rel_iqr": None, "stdev": None,
                "n": 0, "values": []}
    vs = sorted(vals)
    if len(vs) >= 2:
        q = statistics.quantiles(vs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    med = statistics.median(vs)
    return {
        "median": med,
        "mean": statistics.fmean(vs),
        "min": vs[0],
        "max": vs[-1],
        "iqr": iqr,
        "rel_iqr": (iqr / med) if med else None,
        "stdev": statistics.stdev(vs) if len(vs) >= 2 else 0.0,
        "n": len(vs),
        "values": vals,
    }


# ---------------------------------------------------------------------------------------------------- memory
def _proc_status_mb(keys=("VmRSS", "VmHWM")) -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0]) * 1024 / MB  # kB -> MB
    except OSError:
        pass
    return out


def current_rss_mb() -> float | None:
    return _proc_status_mb(("VmRSS",)).get("VmRSS")


class PeakMemory:
    """Peak memory over a block of work.

    CPU: resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reads VmHWM after
    the block; where that is impossible falls back to `ru_maxrss` (the process-lifetime peak, reported as such).
    CUDA: `torch.cuda.reset_peak_memory_stats` / `max_memory_allocated`.
    After the block: `.peak_mb` (absolute), `.start_mb` (at entry), `.delta_mb` (peak - start), `.method`.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb = self.start_mb = self.delta_mb = None
        self.method = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / MB
            self.method = "cuda max_memory_allocated"
            return self
        self._reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
            self.method = "VmHWM (reset per run)"
        except OSError:
            self.method = "ru_maxrss (process lifetime peak)"
        self.start_mb = current_rss_mb()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            hwm = _proc_status_mb(("VmHWM",)).get("VmHWM") if self._reset else None
            if hwm is None:
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # kB on Linux
            self.peak_mb = hwm
        if self.start_mb is not None and self.peak_mb is not None:
            self.delta_mb = max(0.0, self.peak_mb - self.start_mb)
        return False


# ---------------------------------------------------------------------------------------------------- bandwidth
def _time_best(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return times


def _read_kernels(x: torch.Tensor):
    """Two read-only kernels over the buffer x: a reduction and a matrix-vector product (the decoding access pattern,
    through the same BLAS the model's Linear layers use)."""
    W = x.view(-1, 1024)  # (n / 1024, 1024)
    v = torch.ones(1024, dtype=x.dtype, device=x.device)
    return {"sum": lambda: x.sum(), "gemv": lambda: torch.mv(W, v)}


def measure_bandwidth(device: torch.device | str = "cpu", size_mb: int = 1024, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s (10^9 bytes/s) with the current thread count.

    read: the faster of `x.sum()` and `W @ v` (W = x viewed as (n/1024, 1024)) over a size_mb fp32 buffer -- both read
    every byte once, like a batch-1 decoding step reads every weight once; copy: `y.copy_(x)` counted as read + write.
    Best and median of `repeats`. The buffer (1 GiB by default) is far larger than the last-level cache, so this is
    DRAM (or HBM) bandwidth.
    """
    device = torch.device(device)
    n = size_mb * MB // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    nbytes = n * 4
    out = {}
    for name, fn in _read_kernels(x).items():
        fn()  # fault the pages in / warm the kernels
        times = _time_best(fn, device, repeats)
        out[f"{name}_gbps"] = nbytes / min(times) / 1e9
        out[f"{name}_gbps_median"] = nbytes / statistics.median(times) / 1e9
    y.copy_(x)
    copy = _time_best(lambda: y.copy_(x), device, repeats)
    del x, y
    best = max(("sum", "gemv"), key=lambda k: out[f"{k}_gbps"])
    return {
        "read_gbps": out[f"{best}_gbps"],
        "read_gbps_median": out[f"{best}_gbps_median"],
        "read_kernel": best,
        **out,
        "copy_gbps": 2 * nbytes / min(copy) / 1e9,
        "copy_gbps_median": 2 * nbytes / statistics.median(copy) / 1e9,
        "buffer_mb": size_mb,
        "threads": torch.get_num_threads(),
        "method": "fp32 read kernels (sum, gemv; the faster counts) and copy (read+write), best of %d" % repeats,
    }


def quick_read_bandwidth(device: torch.device | str = "cpu", size_mb: int = 512, repeats: int = 3) -> float:
    """A short read-bandwidth sample (GB/s, the faster of sum and gemv, best of `repeats`), taken between
    repetitions to follow a shared machine's load."""
    device = torch.device(device)
    x = torch.ones(size_mb * MB // 4, dtype=torch.float32, device=device)
    best = 0.0
    for fn in _read_kernels(x).values():
        fn()
        best = max(best, x.numel() * 4 / min(_time_best(fn, device, repeats)) / 1e9)
    del x
    return best


# ---------------------------------------------------------------------------------------------------- compute
def measure_matmul(shapes, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   repeats: int = 7, min_s: float = 0.1) -> dict:
    """Matrix-multiply throughput in GFLOP/s (10^9 floating-point operations per second, 2 M K N per product) of
    `torch.mm` at each (M, K, N) in `shapes`, with the current thread count: the compute roofline of a stage whose
    matmuls have those shapes. Each timing repeats the product until it lasts >= min_s, after as long a warm-up;
    the best of `repeats` counts (a shared machine's load only ever lowers a figure). Returns {"MxKxN": GFLOP/s}."""
    device = torch.device(device)
    out = {}
    for M, K, N in shapes:
        a = torch.randn(M, K, dtype=dtype, device=device)
        b = torch.randn(K, N, dtype=dtype, device=device)
        t0 = now(device)
        torch.mm(a, b)  # first touch
        one = max(now(device) - t0, 1e-6)
        inner = max(1, int(min_s / one))
        loop = lambda a=a, b=b, k=inner: [torch.mm(a, b) for _ in range(k)]
        loop()  # warm the kernel, the caches and the thread pool
        best = min(_time_best(loop, device, repeats)) / inner
        out[f"{M}x{K}x{N}"] = 2 * M * K * N / best / 1e9
    return out


def count_flops(fn) -> tuple[float, object]:
    """(FLOPs of the matrix products, convolutions and attention inside fn() (torch.utils.flop_counter), fn()'s
    result). Element-wise work (norms, activations, the SSM's scans) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


# ---------------------------------------------------------------------------------------------------- streaming
class TimingStreamer:
    """A `transformers`-style streamer that timestamps every `put`: the first call carries the prompt, each later
    one a step's new tokens (B,). Used to time `model.generate` (the no-cache decoding) from the outside."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.times: list[float] = []
        self.prompt_seen = False
        self.ended_at: float | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(now(self.device))

    def end(self) -> None:
        self.ended_at = now(self.device)


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU model, cores, threads, library versions, GPU (if any)."""
    import platform

    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info
