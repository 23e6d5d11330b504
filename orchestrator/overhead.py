"""Where a hybrid MoE layer's decode time goes beyond the CPU experts alone: one V3-shape layer
(layer_bench.decode_layer) under variants of what competes with the expert workers for cores.

    python -m orchestrator.overhead --shape v3 --fmt q4_k --threads 16,15 --wait-spin 2000,0 --out r.json

- expert worker threads (all cores, or one left for CUDA's host-function thread and the Python thread);
- how the host thread waits for the GPU (SYNC_FLAGS: CUDA's default spin or blocking); set before
  the CUDA context exists, so each mode runs in its own process;
- how long the native wait (run by CUDA's host-function thread) spins before sleeping (WAIT_SPIN).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _with_threads(engine, threads: int):
    """The same weights worked on by a pool of `threads` (as CPUExperts.retiled shares them)."""
    import numpy as np

    from cpu_experts.codegen.fields import JOB_FIELDS
    from cpu_experts.experts import CPUExperts, shared_pool
    from cpu_experts.pool import aligned_zeros

    other = object.__new__(CPUExperts)
    other.__dict__.update(engine.__dict__)
    other.threads = threads
    other.pool = shared_pool(engine.lib, threads)
    other.job = aligned_zeros(len(JOB_FIELDS), np.int64)
    other._capacity, other._pending, other._owner = (0, 0), None, False
    other._write_static_fields()
    return other


def child(args) -> list[dict]:
    from .cuda_host import set_host_sync

    applied = set_host_sync(args.sync)  # before anything creates the CUDA context
    from cpu_experts.bench import SHAPES
    from cpu_experts.codegen.fields import POOL_FIELDS
    from cpu_experts.experts import CPUExperts

    from .layer_bench import decode_layer

    shape = SHAPES[args.shape]
    threads = [int(t) for t in args.threads.split(",")]
    base = CPUExperts.random(fmt=args.fmt, num_experts=shape["num_experts"], hidden=shape["hidden"],
                             inter=shape["inter"], threads=max(threads))
    rows = []
    for t in threads:
        engine = base if t == base.threads else _with_threads(base, t)
        for spin in (int(s) for s in args.wait_spin.split(",")):
            engine.pool.ctrl[POOL_FIELDS["WAIT_SPIN"]] = spin
            row = decode_layer(engine, args.shape, steps=args.steps)
            row.update(sync=args.sync, sync_applied=applied, wait_spin=spin)
            rows.append(row)
            print(f"sync {args.sync:8s} threads {t:2d} wait_spin {spin:6d}: alone {row['cpu_experts_alone_ms']:.3f} ms, "
                  f"eager {row['hybrid_eager_ms']:.3f} ms ({row['ratio_eager']:.3f}x), graph "
                  f"{row['hybrid_graph_ms']:.3f} ms ({row['ratio_graph']:.3f}x)", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="v3")
    p.add_argument("--fmt", default="q4_k")
    p.add_argument("--threads", default="16,15", help="expert worker counts (the first is the largest pool)")
    p.add_argument("--wait-spin", default="2000,0", help="WAIT_SPIN values of the native wait")
    p.add_argument("--sync", default="spin,blocking", help="host sync modes, one process each")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from runtime.bench_common import metadata

    rows = []
    for mode in args.sync.split(","):
        cmd = [sys.executable, "-m", "orchestrator.overhead", "--child", "--sync", mode, "--shape", args.shape,
               "--fmt", args.fmt, "--threads", args.threads, "--wait-spin", args.wait_spin, "--steps", str(args.steps)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ)
        if done.returncode:
            print(f"sync {mode}: child failed ({done.returncode})", file=sys.stderr)
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    best = min(rows, key=lambda r: r["ratio_graph"]) if rows else None
    command = "python -m orchestrator.overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {**metadata(command), "rows": rows,
              "best": None if best is None else {k: best[k] for k in ("sync", "threads", "wait_spin", "ratio_eager",
                                                                     "ratio_graph")}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["best"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
