"""Microbenchmark of the fp8 block-scaled linears on CUDA against a bf16 torch matmul.

    python3 -m runtime.bench_fp8 [--out FILE.json]

DeepSeek-V3 attention projections (o_proj 7168x16384 is larger than the H100's L2, so its decode
numbers are HBM numbers; kv_a_proj_with_mqa 576x7168 is the ragged one), at M = 1..16 rows (decode:
the GEMV and the fp8 GEMM both, to place GEMV_MAX_ROWS) and M = 512 (prefill); plus the per-call
dequantization of kv_b_proj that MLA's absorbed form pays. Weight GB/s counts the weight bytes read
(fp8 + scales, or bf16) per call; TFLOP/s counts 2*M*N*K.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from runtime.bench_common import metadata
from runtime.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

SHAPES = {"o_proj": (7168, 16384), "q_b_proj": (24576, 1536), "kv_a_proj_with_mqa": (576, 7168)}
ROWS = (1, 2, 4, 8, 16, 512)


def time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def bench_shape(name: str, N: int, K: int) -> list[dict]:
    from runtime import fp8_kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, s = quantize_fp8_blocks(torch.randn(N, K, generator=gen, device="cuda") * K**-0.5)
    w = dequantize_fp8_blocks(q, s)
    w_bf16 = w.to(torch.bfloat16)
    fp8_bytes, bf16_bytes = q.numel() + s.numel() * 4, w_bf16.numel() * 2
    rows = []
    for M in ROWS:
        x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
        exact = x.float() @ w.T
        paths = {"bf16 torch": (lambda: x @ w_bf16.T, bf16_bytes),
                 "fp8 (dispatch)": (lambda: fp8_kernels.fp8_linear(x, q, s), fp8_bytes)}
        if M <= 16:
            paths["fp8 gemv"] = (lambda: fp8_kernels.fp8_gemv(x, q, s, out_dtype=torch.bfloat16), fp8_bytes)
            paths["fp8 gemm"] = (lambda: fp8_kernels.fp8_gemm(x, q, s, out_dtype=torch.bfloat16), fp8_bytes)
        for path, (fn, weight_bytes) in paths.items():
            err = float((fn().float() - exact).norm() / exact.norm())
            us = time_us(fn)
            rows.append({"shape": name, "N": N, "K": K, "M": M, "path": path, "us": round(us, 2),
                         "weight_GBps": round(weight_bytes / us / 1e3, 1), "TFLOPs": round(2 * M * N * K / us / 1e6, 2),
                         "rel_err_vs_fp32": round(err, 5)})
            print(f"{name:20s} M={M:4d} {path:15s} {us:9.2f} us  {rows[-1]['weight_GBps']:7.1f} GB/s  "
                  f"{rows[-1]['TFLOPs']:7.2f} TFLOP/s  err {err:.4f}", flush=True)
    return rows


def bench_dequant() -> dict:
    from runtime.fp8_kernels import weight_dequant

    N, K = 128 * (128 + 128), 512  # V3 kv_b_proj
    q, s = quantize_fp8_blocks(torch.randn(N, K, device="cuda"))
    us = time_us(lambda: weight_dequant(q, s, dtype=torch.bfloat16))
    moved = q.numel() * 3 + s.numel() * 4  # fp8 read, bf16 written
    print(f"kv_b_proj dequant to bf16: {us:.2f} us ({moved / us / 1e3:.0f} GB/s)")
    return {"shape": "kv_b_proj", "N": N, "K": K, "us": round(us, 2), "GBps": round(moved / us / 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU")
    from runtime.fp8_kernels import GEMV_MAX_ROWS

    rows = [r for name, (N, K) in SHAPES.items() for r in bench_shape(name, N, K)]
    result = {**metadata("python3 -m runtime.bench_fp8" + (f" --out {args.out}" if args.out else "")),
              "gemv_max_rows": GEMV_MAX_ROWS, "linears": rows, "kv_b_dequant": bench_dequant()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
