"""Which weight format can a compiled batch-1 decoding step stream faster than fp32 on this CPU? One matrix-vector
product y = W x (one row x, the shape of a decoding step's Linear), written the way `DecodeOpsAsReductions` writes it
((x * W).sum(-1), the weight converted to fp32 inside the reduction) and compiled by Inductor, per storage format:

    fp32           W float32                                       4 bytes / weight
    fp16, bf16     W 16-bit, .float() fused into the reduction      2 bytes (firebolt_vl.quantize mode "fp16")
    int8           W int8 x per-row scale, .float() fused           1 byte
    int8_packed    int8 read as int32 words, bytes unpacked by shifts/masks (full-width vector loads)
    fp8_e4m3       W float8 x per-row scale                         1 byte
next to the library kernels (MKL fp32 GEMV, aten._weight_int8pack_mm). Medians of 30 calls, 2 threads; writes
docs/bench/cpu_weight_formats.json (or the path given).

    flock /tmp/cpu.lock python docs/bench/weight_formats.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, *args, n: int = 30) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def unpacked_int8(x, words, scale):
    """x (1, K), words (N, K/4) int32 holding 4 int8 each (little endian), scale (N,) -> (N,)."""
    xs = x.view(-1, 4)  # (K/4, 4)
    acc = 0
    for b in range(4):
        v = (((words >> (8 * b)) & 255) ^ 128) - 128  # byte b, sign-extended
        acc = acc + v.to(torch.float32) * xs[:, b]
    return acc.sum(-1) * scale


def main(argv: list[str]) -> None:
    out = argv[0] if argv else "docs/bench/cpu_weight_formats.json"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    compile_ = lambda f: torch.compile(f, dynamic=False)  # noqa: E731
    dense = compile_(lambda x, w: (x * w.float()).sum(-1))
    scaled = compile_(lambda x, w, s: (x * w.float()).sum(-1) * s)
    packed = compile_(unpacked_int8)
    rows = []
    for N, K in ((4608, 1024), (65536, 1024)):  # LFM2-350M's MLP up-projection and its LM head
        W, x = torch.randn(N, K) * 0.05, torch.randn(1, K)
        s8 = W.abs().amax(1) / 127
        q8 = torch.round(W / s8[:, None]).clamp(-127, 127).to(torch.int8)
        s_fp8 = W.abs().amax(1) / 448
        cases = {
            "fp32": (dense, (x, W), 4),
            "fp16": (dense, (x, W.half()), 2),
            "bf16": (dense, (x, W.bfloat16()), 2),
            "int8": (scaled, (x, q8, s8), 1),
            "int8_packed": (packed, (x, q8.view(torch.int32), s8), 1),
            "fp8_e4m3": (scaled, (x, (W / s_fp8[:, None]).to(torch.float8_e4m3fn), s_fp8), 1),
            "mkl_fp32_gemv (eager F.linear)": (F.linear, (x, W), 4),
            "aten._weight_int8pack_mm (eager)": (torch.ops.aten._weight_int8pack_mm, (x, q8, s8), 1),
        }
        ms = {name: median_ms(fn, *args) for name, (fn, args, _) in cases.items()}
        for name, (_, _, nbytes) in cases.items():
            rows.append({"shape": [N, K], "format": name, "ms": ms[name], "bytes_per_weight": nbytes,
                         "gbps": N * K * nbytes / ms[name] / 1e6, "speed_vs_fp32": ms["fp32"] / ms[name]})
            print(f"{N}x{K} {name:34s} {ms[name]:7.2f} ms  {rows[-1]['gbps']:5.1f} GB/s  "
                  f"x{rows[-1]['speed_vs_fp32']:.2f} fp32", flush=True)
    with open(out, "w") as f:
        json.dump({"command": "python docs/bench/weight_formats.py " + " ".join(argv), "threads": 2,
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
