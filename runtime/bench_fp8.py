"""Microbenchmark of the fp8 block-scaled linears on CUDA against a bf16 torch matmul.

    python3 -m runtime.bench_fp8 [--out FILE.json]

DeepSeek-V3 attention projections (kv_a_proj_with_mqa 576x7168 is the ragged one) at M = 1..512
rows; up to DECODE_MAX_ROWS both fp8 paths (decode kernel and fp8 GEMM), to place it; at 512
rows on o_proj a few GEMM tile configs; plus the per-call dequantization of kv_b_proj that MLA's
absorbed form pays. GPU time per call comes from a CUDA graph of calls that cycle through enough
weight copies (ROTATE_BYTES) that no call finds its weights in L2, as in decode, where every
layer's weights stream once per token; eager time adds the Python launches. Weight GB/s counts the
weight bytes read (fp8 + scales, or bf16) per call; TFLOP/s counts 2*M*N*K.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from runtime.bench_common import metadata
from runtime.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

SHAPES = {"o_proj": (7168, 16384), "q_b_proj": (24576, 1536), "kv_a_proj_with_mqa": (576, 7168)}
ROWS = (1, 4, 16, 64, 512)
ROTATE_BYTES = 256 << 20  # weight copies cycled through per timed call: 5x the H100's L2, as in decode
# fp8 GEMM tiles tried at 512 rows on o_proj (the default is fp8_kernels.gemm_config)
SWEEP = [dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=4), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4)]


def time_us(fn, copies: int) -> tuple[float, float]:
    """(GPU time per call from a CUDA graph of calls cycling through the weight copies, wall time
    per eager call including its launches), in microseconds."""
    calls = max(20, copies)
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1000 / calls)
    eager = []
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            fn(i % copies)
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(gpu), statistics.median(eager)


def bench_shape(name: str, N: int, K: int) -> list[dict]:
    from runtime import fp8_kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, s = quantize_fp8_blocks(torch.randn(N, K, generator=gen, device="cuda") * K**-0.5)
    w = dequantize_fp8_blocks(q, s)
    fp8_bytes, bf16_bytes = q.numel() + s.numel() * 4, N * K * 2
    copies = max(1, ROTATE_BYTES // bf16_bytes)
    fp8 = [(q.clone(), s.clone()) for _ in range(max(1, ROTATE_BYTES // fp8_bytes))]
    bf16 = [w.to(torch.bfloat16) for _ in range(copies)]
    rows = []
    for M in ROWS:
        x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
        exact = x.float() @ w.T
        paths = {"bf16 torch": (lambda i: x @ bf16[i].T, bf16_bytes, len(bf16)),
                 "fp8": (lambda i: fp8_kernels.fp8_linear(x, *fp8[i]), fp8_bytes, len(fp8))}
        if M <= fp8_kernels.DECODE_MAX_ROWS:  # the other path, to place DECODE_MAX_ROWS
            paths["fp8 gemm"] = (lambda i: fp8_kernels.fp8_gemm(x, *fp8[i], out_dtype=torch.bfloat16), fp8_bytes,
                                 len(fp8))
        if M == 512 and name == "o_proj":
            for c in SWEEP:
                paths["fp8 gemm " + "/".join(str(v) for v in c.values())] = (
                    lambda i, c=c: fp8_kernels.fp8_gemm(x, *fp8[i], out_dtype=torch.bfloat16, config=c), fp8_bytes,
                    len(fp8))
        for path, (fn, weight_bytes, n_copies) in paths.items():
            err = float((fn(0).float() - exact).norm() / exact.norm())
            gpu_us, eager_us = time_us(fn, n_copies)
            rows.append({"shape": name, "N": N, "K": K, "M": M, "path": path, "gpu_us": round(gpu_us, 2),
                         "eager_us": round(eager_us, 2), "weight_GBps": round(weight_bytes / gpu_us / 1e3, 1),
                         "TFLOPs": round(2 * M * N * K / gpu_us / 1e6, 2), "rel_err_vs_fp32": round(err, 5)})
            print(f"{name:18s} M={M:4d} {path:26s} {gpu_us:8.2f} us (eager {eager_us:8.2f})  "
                  f"{rows[-1]['weight_GBps']:7.1f} GB/s  {rows[-1]['TFLOPs']:7.2f} TFLOP/s  err {err:.4f}", flush=True)
    return rows


def bench_dequant() -> dict:
    from runtime.fp8_kernels import weight_dequant

    N, K = 128 * (128 + 128), 512  # V3 kv_b_proj
    q, s = quantize_fp8_blocks(torch.randn(N, K, device="cuda"))
    us, eager = time_us(lambda i: weight_dequant(q, s, dtype=torch.bfloat16), 1)  # 16 MB: L2-resident
    moved = q.numel() * 3 + s.numel() * 4  # fp8 read, bf16 written
    print(f"kv_b_proj dequant to bf16: {us:.2f} us (eager {eager:.2f}), {moved / us / 1e3:.0f} GB/s")
    return {"shape": "kv_b_proj", "N": N, "K": K, "gpu_us": round(us, 2), "eager_us": round(eager, 2),
            "GBps": round(moved / us / 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU")
    from runtime.fp8_kernels import DECODE_MAX_ROWS

    rows = [r for name, (N, K) in SHAPES.items() for r in bench_shape(name, N, K)]
    result = {**metadata("python3 -m runtime.bench_fp8" + (f" --out {args.out}" if args.out else "")),
              "decode_max_rows": DECODE_MAX_ROWS, "rotate_bytes": ROTATE_BYTES, "linears": rows, "kv_b_dequant": bench_dequant()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
