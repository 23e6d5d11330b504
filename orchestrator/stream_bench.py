"""Prefill of N MoE layers' routed experts at a real shape: CPU experts alone against streamed to the GPU.

    python -m orchestrator.stream_bench --shape v3 --fmt q4_k --layers 4 --tokens 2048,8192 --out r.json

The layers are cpu_experts engines with random weights written straight into the repacked layout
(`CPUExperts.random`; a q4_k checkpoint of the V3 shape would take hours of numpy quantizing and
`make-model --preset v3 --layers 4` holds only one MoE layer). Per token count: the CPU time of
each layer (one call each, after a warm-up call), and the streamed path over all layers in model
order (copy of layer j+1 while layer j computes), timed end to end with the copy stream's own
events: PCIe busy = bytes copied / copy-stream busy time, and bytes / streamed wall time, each
against the measured pinned host-to-device bandwidth. Also the GPU compute alone per layer (the
weights resident) and the threshold the loader would pick (streamed.measured_threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _inputs(rng, T: int, shape: dict):
    from cpu_experts.bench import routing

    hidden = rng.standard_normal((T, shape["hidden"])).astype(np.float32)
    ids = routing(rng, T, shape["num_experts"], shape["topk"])
    weights = rng.uniform(0.1, 1.0, (T, shape["topk"])).astype(np.float32)
    return hidden, ids, weights


def _cpu_layers(engines, hidden, ids, weights, log) -> list[float]:
    engines[0].forward(hidden, ids, weights)  # warm: scratch for this T, page faults
    times = []
    for j, engine in enumerate(engines):
        t0 = time.perf_counter()
        engine.forward(hidden, ids, weights)
        times.append(time.perf_counter() - t0)
        log(f"  CPU layer {j}: {times[-1] * 1e3:.1f} ms")
    return times


def _streamed(prefill, hidden, ids, weights) -> dict:
    import torch

    prefill.schedule.forget()  # every layer copied, as in a model with more layers than two slots
    prefill.copies.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j in range(len(prefill.layers)):
        out = prefill.run(j, hidden, ids, weights)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(start.elapsed_time(end) / 1e3 for _, _, start, end in prefill.copies)
    nbytes = sum(n for _, n, _, _ in prefill.copies)
    first = prefill.copies[0][2]
    span = first.elapsed_time(prefill.copies[-1][3]) / 1e3
    return dict(wall_s=wall, copies=len(prefill.copies), bytes=nbytes, copy_busy_s=busy, copy_span_s=span,
                out_finite=bool(torch.isfinite(out).all()))


def _gpu_compute_only(engine, hidden, ids, weights, repeats: int = 2) -> float:
    """Seconds of one layer's GPU work with its weights already resident (a one-layer schedule)."""
    import torch

    from .streamed import StreamedPrefill

    one = StreamedPrefill([engine], "cuda")
    one.run(0, hidden, ids, weights)  # copies the layer once
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one.run(0, hidden, ids, weights)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    one.close()
    del one
    torch.cuda.empty_cache()
    return min(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    from cpu_experts.bench import SHAPES
    from cpu_experts.experts import CPUExperts, default_threads
    from runtime.bench_common import metadata

    from .measure import pinned_h2d
    from .streamed import StreamedPrefill, measured_threshold

    p = argparse.ArgumentParser(prog="python -m orchestrator.stream_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="v3")
    p.add_argument("--fmt", default="q4_k")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if not torch.cuda.is_available():
        print("error: streamed prefill needs a CUDA GPU", file=sys.stderr)
        return 2
    command = "python -m orchestrator.stream_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    shape = SHAPES[args.shape]
    threads = args.threads or default_threads()
    from .streamed import ENV_DEQUANT, dequantizer

    result = {**metadata(command), "shape": {"name": args.shape, **shape}, "fmt": args.fmt, "layers": args.layers,
              "threads": threads, "dequant": dequantizer(torch.device("cuda"), args.fmt).__module__, "rows": [],
              "env": {ENV_DEQUANT: os.environ.get(ENV_DEQUANT)}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    t0 = time.perf_counter()
    engines = [CPUExperts.random(fmt=args.fmt, num_experts=shape["num_experts"], hidden=shape["hidden"],
                                 inter=shape["inter"], threads=threads, seed=j) for j in range(args.layers)]
    result["build_s"] = time.perf_counter() - t0
    pcie = pinned_h2d(1 << 30)
    result["pcie_h2d_pinned"] = pcie
    log(f"{args.layers} layers built in {result['build_s']:.1f} s; pinned H2D {pcie['gbs_median']:.1f} GB/s")
    t0 = time.perf_counter()
    prefill = StreamedPrefill(engines, "cuda", timing=True)
    result["register_s"] = time.perf_counter() - t0
    result["layer_bytes"] = prefill.layer_bytes
    result["host_ram_extra_bytes"] = 0  # the engines' own buffers are page-locked in place
    result["device_slot_bytes"] = 2 * prefill.slots[0].numel()
    found, facts = measured_threshold(prefill, top_k=shape["topk"])
    result["auto_threshold_tokens"], result["auto_threshold_facts"] = found, facts
    log(f"registered in {result['register_s']:.1f} s; auto threshold {found} ({facts})")
    save()
    rng = np.random.default_rng(0)
    gbs = pcie["gbs_median"]
    for T in sorted(int(t) for t in args.tokens.split(",")):
        hidden, ids, weights = _inputs(rng, T, shape)
        h, i, w = (torch.from_numpy(a).cuda() for a in (hidden, ids.astype(np.int64), weights))
        h = h.bfloat16()
        _streamed(prefill, h, i, w)  # warm: cuBLAS, allocator, this T's buffers
        s = _streamed(prefill, h, i, w)
        gpu_only = _gpu_compute_only(engines[0], h, i, w)
        log(f"T={T}: streamed {args.layers} layers {s['wall_s'] * 1e3:.1f} ms, copies busy {s['copy_busy_s'] * 1e3:.1f} "
            f"ms for {s['bytes'] / 1e9:.2f} GB; GPU compute alone {gpu_only * 1e3:.1f} ms per layer")
        cpu = _cpu_layers(engines, hidden, ids, weights, log)
        row = dict(tokens=T, cpu_layer_ms=[c * 1e3 for c in cpu], cpu_total_ms=sum(cpu) * 1e3,
                   cpu_experts_tps=T / sum(cpu), streamed_total_ms=s["wall_s"] * 1e3,
                   streamed_layer_ms=s["wall_s"] * 1e3 / args.layers, streamed_experts_tps=T / s["wall_s"],
                   speedup=sum(cpu) / s["wall_s"], gpu_compute_only_layer_ms=gpu_only * 1e3,
                   bytes_copied=s["bytes"], copies=s["copies"], copy_busy_ms=s["copy_busy_s"] * 1e3,
                   copy_span_ms=s["copy_span_s"] * 1e3,
                   copy_gbs_while_busy=s["bytes"] / s["copy_busy_s"] / 1e9,
                   pcie_busy_fraction=s["bytes"] / s["copy_busy_s"] / 1e9 / gbs,
                   pcie_fraction_of_streamed_wall=s["bytes"] / s["wall_s"] / 1e9 / gbs,
                   out_finite=s["out_finite"])
        result["rows"].append(row)
        log(json.dumps(row))
        save()
        del h, i, w
        torch.cuda.empty_cache()
    result["notes"] = ("experts only (no attention): pp t/s here = tokens / time of the routed experts of all "
                       "layers; pcie_busy_fraction = bytes / copy-stream busy time / pinned GB/s; "
                       "pcie_fraction_of_streamed_wall = bytes / wall time of the streamed layers / pinned GB/s")
    save()
    prefill.close()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
