"""What one dependent node costs in a CUDA-graph decode chain, with and without programmatic dependent
launch (PDL: the next kernel is launched while this one runs and waits on the device with
griddepcontrol.wait), and whether a GEMV gains by loading its first weight tile before that wait.

A chain of N GEMVs x_{i+1} = W_i · x_i (bf16, [rows, cols] each, N distinct matrices so that the
weights stream from HBM as a decode step's do), captured in one CUDA graph, replayed; µs per node:
  cublas      torch.mv (what the decode step uses for its projections)
  triton      a one-row Triton GEMV, plain launches
  pdl         the same kernel launched with PDL (gdc_launch_dependents + gdc_wait at its start)
  pdl_pre     PDL, and the first K tile of the weights loaded before the wait
  mixed       cuBLAS and the PDL Triton GEMV alternating (a PDL kernel after a kernel that is not)

    PYTHONPATH=. python benchmarks/pdl_chain.py --nodes 100 --rows 2048 --cols 2048 --out pdl.json
"""
import argparse
import sys

import torch
import triton
import triton.language as tl

from gpu_attention.bench import replay_us
from runtime.bench_common import script_metadata, write_json


@triton.jit
def _gemv(W, X, Y, rows, cols, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
          PRELOAD: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    w_first = tl.zeros([BLOCK_R, BLOCK_K], tl.bfloat16)
    if PRELOAD:   # the weights do not depend on the previous kernel: read them before waiting for it
        w_first = tl.load(W + r[:, None] * cols + k[None, :])
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_R], tl.float32)
    start = 0
    if PRELOAD:
        acc += tl.sum(w_first.to(tl.float32) * tl.load(X + k).to(tl.float32)[None, :], 1)
        start = BLOCK_K
    for k0 in range(start, cols, BLOCK_K):
        w = tl.load(W + r[:, None] * cols + (k0 + k)[None, :])
        x = tl.load(X + k0 + k)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
    tl.store(Y + r, acc.to(Y.dtype.element_ty))


def triton_mv(w, x, y, pdl: bool, preload: bool):
    rows, cols = w.shape
    _gemv[(rows // 16,)](w, x, y, rows, cols, BLOCK_R=16, BLOCK_K=512, PDL=pdl, PRELOAD=preload,
                         launch_pdl=pdl, num_warps=4)


def chain(variant: str, ws, xs):
    for i, w in enumerate(ws):
        x, y = xs[i % 2], xs[(i + 1) % 2]
        if variant == "cublas" or (variant == "mixed" and i % 2 == 0):
            torch.mv(w, x, out=y)
        else:
            triton_mv(w, x, y, pdl=variant != "triton", preload=variant == "pdl_pre")


def per_node_us(variant: str, ws, xs, replays: int) -> float:
    return replay_us(lambda: chain(variant, ws, xs), replays) / len(ws)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rows", type=int, default=2048, help="rows = cols (V2-Lite's o_proj: 2048)")
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.rows != a.cols:
        ap.error("--rows must equal --cols: each GEMV's output is the next one's input")
    torch.manual_seed(0)
    ws = [torch.randn(a.rows, a.cols, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(a.nodes)]
    xs = [torch.randn(a.cols, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    # the variants compute the same chain: check the Triton GEMV against cuBLAS once
    y_ref, y = torch.empty(a.rows, device="cuda", dtype=torch.bfloat16), torch.empty(a.rows, device="cuda",
                                                                                     dtype=torch.bfloat16)
    torch.mv(ws[0], xs[0], out=y_ref)
    triton_mv(ws[0], xs[0], y, pdl=True, preload=True)
    err = float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
    variants = ["cublas", "triton", "pdl", "pdl_pre", "mixed"]
    rows = {v: [] for v in variants}
    for _ in range(a.rounds):   # round-robin: the variants see the same machine
        for v in variants:
            rows[v].append(per_node_us(v, ws, xs, a.replays))
    mb = a.rows * a.cols * 2 / 1e6
    res = dict(**script_metadata("benchmarks/pdl_chain.py", argv), nodes=a.nodes, rows=a.rows, cols=a.cols,
               weight_mb_per_node=mb, triton_vs_cublas_max_rel_err=err,
               us_per_node={v: sorted(t) for v, t in rows.items()})
    for v, t in rows.items():
        m = sorted(t)[len(t) // 2]
        print(f"{v:8s} {m:6.2f} us per node ({mb / m:.2f} TB/s of weights)  rounds {', '.join(f'{x:.2f}' for x in t)}")
    print(f"triton vs cublas max rel err {err:.2e}")
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
