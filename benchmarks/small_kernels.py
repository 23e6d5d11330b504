"""Warps for the decode step's one-program kernels: a CUDA graph of N calls of the same kernel, µs per
node, for each num_warps (a kernel of one program per token is a chain of block-wide reductions, whose
cost grows with the warps that take part). The route kernel (V2-Lite greedy 64 experts top-6, V3
noaux_tc 256 experts top-8) and add + RMSNorm (2048 and 7168 wide, bf16).

    PYTHONPATH=. python benchmarks/small_kernels.py --out small.json
"""
import argparse
import sys

import torch

from gpu_attention.bench import replay_us
from runtime.bench_common import script_metadata, write_json
from runtime.fused import add_rms_norm, route


def per_node_us(fn, nodes: int) -> float:
    return replay_us(lambda: [fn() for _ in range(nodes)]) / nodes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = {}
    for name, E, k, method, sigmoid, groups, tg, norm in [("route_v2lite", 64, 6, "greedy", False, 1, 1, False),
                                                          ("route_v3", 256, 8, "noaux_tc", True, 8, 4, True)]:
        logits = torch.randn(1, E, device=dev, generator=gen)
        bias = torch.randn(E, device=dev, generator=gen) * 0.1
        out = (torch.empty(1, k, device=dev), torch.empty(1, k, dtype=torch.int64, device=dev))
        for w in (1, 2, 4, 8):
            cases[(name, w)] = (lambda w=w, logits=logits, bias=bias, out=out, E=E, k=k, method=method,
                                sigmoid=sigmoid, groups=groups, tg=tg, norm=norm:
                                route(logits, top_k=k, method=method, sigmoid=sigmoid, n_group=groups, topk_group=tg,
                                      norm=norm, scaling=1.0, bias=bias, out=out, num_warps=w))
    for D in (2048, 7168):
        h = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
        d = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
        wt = torch.randn(D, device=dev, generator=gen).to(torch.bfloat16)
        for w in (1, 2, 4, 8, 16):
            cases[(f"add_rms_norm_{D}", w)] = (lambda w=w, h=h, d=d, wt=wt: add_rms_norm(h, (d,), wt, 1e-6, num_warps=w))
    times = {key: [] for key in cases}
    for _ in range(a.rounds):
        for key, fn in cases.items():
            times[key].append(per_node_us(fn, a.nodes))
    rows = []
    for (name, w), t in times.items():
        m = sorted(t)[len(t) // 2]
        rows.append(dict(kernel=name, num_warps=w, us_per_node=m, rounds=t))
        print(f"{name:18s} warps {w:2d}  {m:6.2f} us per node")
    write_json(a.out, dict(**script_metadata("benchmarks/small_kernels.py", argv), nodes=a.nodes, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
