"""The numbers the prefill threshold needs, measured on this machine: pinned host-to-GPU bandwidth
and the CPU time of one MoE layer's routed experts at several token counts; and, with the same
engine, one MoE layer's decode step through HybridExperts against the CPU experts alone.

    python -m orchestrator.measure --shape v3 --fmt q4_k --out result.json

prints and writes (JSON: date, machine, commit, command) the PCIe bandwidth, the CPU curve, the
layer's compact-format bytes and the resulting threshold.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .threshold import CpuCurve, layer_stream_bytes, prefill_threshold


def pinned_h2d(nbytes: int = 1 << 30, repeats: int = 5, device=None) -> dict:
    """GB/s of host-to-device copies from pinned memory (CUDA events around each copy)."""
    import torch

    device = torch.device(device or "cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm: mappings, clocks
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        samples.append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return {"nbytes": nbytes, "gbs_median": float(np.median(samples)), "gbs_best": max(samples), "samples_gbs": samples}


def cpu_curve(engine, tokens: list[int], *, top_k: int, repeats: int = 5, seed: int = 0, log=print):
    """(CpuCurve, rows): median seconds of the engine's layer at each token count, timed as bench-moe does."""
    from cpu_experts.bandwidth import Flusher
    from cpu_experts.bench import repeats_for, time_layer

    rng, flush, rows = np.random.default_rng(seed), Flusher(engine.threads, engine.pool.cpus), []
    for T in sorted(tokens):
        row = time_layer(engine, T, top_k=top_k, repeats=repeats_for(T, repeats), rng=rng, flush=flush)
        rows.append(row)
        log(f"CPU experts, {T:5d} tokens: {row['ms']:9.3f} ms per layer, {row['gflops']:8.1f} GFLOP/s")
    return CpuCurve(tuple((r["tokens"], r["ms"] / 1e3) for r in rows)), rows


def main(argv: list[str] | None = None) -> int:
    from cpu_experts.bench import SHAPES
    from cpu_experts.experts import CPUExperts, default_threads
    from runtime.bench_common import metadata

    p = argparse.ArgumentParser(prog="python -m orchestrator.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="v3")
    p.add_argument("--fmt", default="q4_k", help="format of the experts (default q4_k)")
    p.add_argument("--threads", type=int, default=None, help="CPU expert threads (default: physical cores)")
    p.add_argument("--tokens", default="32,64,128,256,512,1024", help="token counts of the CPU curve")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--h2d-gib", type=float, default=1.0, help="size of each pinned copy in GiB (default 1)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    if not torch.cuda.is_available():
        print("error: the prefill threshold needs a CUDA GPU to measure PCIe bandwidth", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    pcie = pinned_h2d(int(args.h2d_gib * 2**30))
    log(f"pinned host-to-device: {pcie['gbs_median']:.1f} GB/s median, {pcie['gbs_best']:.1f} best")
    threads = args.threads or default_threads()
    engine = CPUExperts.random(fmt=args.fmt, num_experts=shape["num_experts"], hidden=shape["hidden"],
                               inter=shape["inter"], threads=threads)
    curve, rows = cpu_curve(engine, [int(t) for t in args.tokens.split(",")], top_k=shape["topk"],
                            repeats=args.repeats, log=log)
    from .layer_bench import decode_layer

    layer = decode_layer(engine, args.shape)
    log(f"one MoE layer, 1 token: CPU experts alone {layer['cpu_experts_alone_ms']:.3f} ms, hybrid block eager "
        f"{layer['hybrid_eager_ms']:.3f} ms ({layer['ratio_eager']:.3f}x), CUDA graph {layer['hybrid_graph_ms']:.3f} ms "
        f"({layer['ratio_graph']:.3f}x); shared experts on the GPU {layer['shared_experts_gpu_ms']:.3f} ms")
    engine.close()
    nbytes = layer_stream_bytes(args.fmt, num_experts=shape["num_experts"], hidden=shape["hidden"], inter=shape["inter"])
    threshold = prefill_threshold(curve, layer_bytes=nbytes, pcie_gbs=pcie["gbs_median"])
    copy_ms = nbytes / (pcie["gbs_median"] * 1e9) * 1e3
    log(f"one layer in {args.fmt}: {nbytes / 1e9:.2f} GB, {copy_ms:.1f} ms over PCIe; streaming wins from "
        f"{threshold} tokens")
    command = "python -m orchestrator.measure " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {**metadata(command), "shape": {"name": args.shape, **shape}, "fmt": args.fmt, "threads": threads,
              "pcie_h2d_pinned": pcie, "cpu_layer": rows, "layer_stream_bytes": nbytes, "layer_copy_ms": copy_ms,
              "gpu_ms_per_token": 0.0, "prefill_threshold_tokens": threshold, "decode_layer": layer,
              "model": "stream cost per layer = max(copy, GPU compute) with prefetch of the next layer; GPU compute "
                       "of the streamed experts taken as 0 (not measured here)"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
