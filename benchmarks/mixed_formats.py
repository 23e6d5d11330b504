"""One MoE layer in one format against the same layer with down_proj in another (Q4_K_M's q4_k
gate/up + q6_k down): `python benchmarks/mixed_formats.py --shape v3 --threads 16 --out FILE.json`.
Same timer as bench-moe (cpu_experts.bench.time_layer: LLC flushed before each call, median)."""
import argparse
import json
import time

import numpy as np

from cpu_experts.bandwidth import Flusher, measure_read_bandwidth
from cpu_experts.bench import SHAPES, _commit, cpu_model, repeats_for, time_layer
from cpu_experts.experts import CPUExperts


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="v3", choices=SHAPES)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--pairs", default="q4_k/q4_k,q4_k/q6_k")
    p.add_argument("--tokens", default="1,8,512")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    s = SHAPES[a.shape]
    tokens = [int(t) for t in a.tokens.split(",")]
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": cpu_model(), "commit": _commit(),
           "shape": a.shape, "threads": a.threads, "runs": []}
    for pair in a.pairs.split(","):
        fmt, down = pair.split("/")
        t0 = time.perf_counter()
        ex = CPUExperts.random(fmt=fmt, down_fmt=down, num_experts=s["num_experts"], hidden=s["hidden"],
                               inter=s["inter"], threads=a.threads)
        build = time.perf_counter() - t0
        bw = measure_read_bandwidth(a.threads, cpus=ex.pool.cpus)
        flush = Flusher(a.threads, ex.pool.cpus)
        rng = np.random.default_rng(0)
        rows = [time_layer(ex, T, top_k=s["topk"], repeats=repeats_for(T, a.repeats), rng=rng, flush=flush)
                for T in tokens]
        for r in rows:
            r["pct_bandwidth"] = 100 * r["gbs"] / bw
            print(f"{pair:10s} tokens {r['tokens']:4d} {r['ms']:8.2f} ms {r['pct_bandwidth']:5.1f}% of {bw:.0f} GB/s",
                  flush=True)
        out["runs"].append({"fmt": fmt, "down_fmt": down, "amx": ex.tiles.amx, "isa": ex.isa.name,
                            "bytes_per_expert": ex.bytes_per_expert(), "read_bandwidth_gbs": bw, "build_s": build,
                            "results": rows})
        ex.close()
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
