"""Per-layer time of the CPU experts as a GPU-driven decode sees it: `python -m cpu_experts.native_timing
--shape v2-lite --fmt q8_0 --threads 15 --variants base,ready --layers 26 [--out FILE]`.

Each call is one layer's job through the bound native submit and wait (CPUExperts.bind; what
cudaLaunchHostFunc or the memops dispatcher calls), back to back over `layers` layers whose weights
are distinct (views of one buffer of layers x E experts), so each call's experts come from DRAM as in
a decode step; fresh random routing per call. No Python between submit and wait; the caller is
pinned to a CPU the workers do not use when there is one (as the memops dispatcher is). Both native
waits are timed: "futex" (hmoe_wait_job: spins briefly, then sleeps until the last worker wakes it)
and "spin" (hmoe_wait_job_spin: spins ~10 ms first). Variants (sweep.VARIANTS) and waits run
round-robin in rounds, so they see the same machine state. Per row: median / mean / p90 us per call,
GB/s of the experts touched, % of the read bandwidth (same CPUs, before and after; the larger), and
from the pool's rdtsc stamps the mean time from submit to the last worker out; profiling variants add
the workers' phase times, start and end (all per call, us). A variant name ending in "@shared" runs
every layer on the first layer's scratch (routing, activations, h), which then stays in cache; plain
names give each layer its own, as CPUExperts does.
"""
import argparse
import dataclasses
import json
import os
import socket
import time

import numpy as np

from .bandwidth import measure_read_bandwidth
from .bench import SHAPES, _commit, cpu_model, routing
from .codegen.fields import J
from .experts import CPUExperts, default_threads
from .numa import physical_cpus
from .pool import NATIVE_FN, tsc_hz
from .sweep import PHASES, VARIANTS



def layer_views(base: CPUExperts, tiles, num_experts: int, layers: int) -> list[CPUExperts]:
    """`layers` engines of num_experts experts each over base's layers x num_experts experts (layer l:
    experts l*E .. (l+1)*E - 1), with `tiles`. Close only base."""
    if base.E != num_experts * layers:
        raise ValueError(f"layer_views: base has {base.E} experts, not {layers} x {num_experts}")
    views = []
    for layer in range(layers):
        v = base.retiled(tiles)
        v.E = num_experts
        v._write_static_fields()
        for prefix, mat in (("G", base.gate), ("U", base.up), ("D", base.down)):
            first = layer * num_experts
            v.job[J[prefix + "P"]] += first * mat.pay_e
            v.job[J[prefix + "S"]] += first * mat.sc_e
            v.job[J[prefix + "B"]] += first * mat.sc_e
            v.job[J[prefix + "RB"]] += first * mat.rows * 4
        views.append(v)
    return views


def spare_cpu(workers: list[int] | None) -> int | None:
    """A physical CPU no worker is pinned to (the memops dispatcher's kind of CPU), else None."""
    free = [c for c in physical_cpus() if workers and c not in workers and c in os.sched_getaffinity(0)]
    return free[0] if free else None


def run(shape: str, fmt: str, threads: int, tokens: list[int], variants: list[str], layers: int = 26,
        steps: int = 20, rounds: int = 5, waits=("futex", "spin"), seed: int = 0, log=print,
        down_fmt: str | None = None, experts: int | None = None) -> dict:
    """experts: fewer experts per layer than the shape has (a small box; the job's work per call is the
    same while experts >= topk x tokens, but routing then repeats experts more often)."""
    s = SHAPES[shape]
    E, k, H, I = experts or s["num_experts"], s["topk"], s["hidden"], s["inter"]
    t0 = time.perf_counter()
    base = CPUExperts.random(fmt=fmt, num_experts=E * layers, hidden=H, inter=I, threads=threads, seed=seed,
                             down_fmt=down_fmt)
    build_s = time.perf_counter() - t0
    engines = {}
    for name in variants:
        fields = VARIANTS[name.partition("@")[0]]
        if any(f.startswith("amx") for f in fields) and not base.tiles.amx:
            continue
        engines[name] = layer_views(base, dataclasses.replace(base.tiles, **fields), E, layers)
    pool = base.pool
    caller = spare_cpu(pool.cpus)
    mask = os.sched_getaffinity(0)
    bw0 = measure_read_bandwidth(threads, cpus=pool.cpus)
    log(f"# {shape} {fmt} threads={threads} isa={base.isa.name} amx={base.tiles.amx} layers={layers} "
        f"read bandwidth {bw0:.1f} GB/s (weights {base.bytes_per_expert() * E * layers / 1e9:.1f} GB in "
        f"{build_s:.1f} s; caller on CPU {caller}; variants {', '.join(engines)})")
    hz = tsc_hz()
    rng = np.random.default_rng(seed)
    addr = {"futex": pool.wait_job_address, "spin": pool.wait_job_spin_address}
    submit = NATIVE_FN(pool.submit_job_address)
    rows = []
    if caller is not None:
        os.sched_setaffinity(0, {caller})
    try:
        for T in tokens:
            hidden = rng.standard_normal((T, H)).astype(np.float32)
            ids = np.zeros((T, k), np.int64)
            weights = np.full((T, k), 1.0 / k, np.float32)
            out = np.zeros((T, H), np.float32)
            jobs = {n: [v.bind(hidden, ids, weights, out)[2] for v in views] for n, views in engines.items()}
            for n, views in engines.items():
                if n.endswith("@shared"):
                    for v in views[1:]:
                        for key in views[0]._scratch:
                            v.job[J[key]] = views[0].job[J[key]]
            acc = {(n, w): dict(ts=[], touched=[], prof=[]) for n in engines for w in waits}
            for _ in range(rounds):
                for (name, wname), a in acc.items():
                    wait = NATIVE_FN(addr[wname])
                    chosen = [[routing(rng, T, E, k) for _ in range(layers)] for _ in range(steps + 1)]
                    ts = np.empty(steps * layers, np.int64)
                    for step in range(steps + 1):   # step 0 warms (the caller and workers spin from here on)
                        if step == 1:
                            pool.profile()   # reset
                        for layer, job in enumerate(jobs[name]):
                            ids[:] = chosen[step][layer]
                            c0 = time.perf_counter_ns()
                            submit(job)
                            wait(job)
                            if step:
                                ts[(step - 1) * layers + layer] = time.perf_counter_ns() - c0
                    a["prof"].append(pool.profile())
                    a["ts"].append(ts)
                    a["touched"] += [len(np.unique(c)) for st in chosen[1:] for c in st]
            for (name, wname), a in acc.items():
                rows.append(_row(name, wname, T, a, engines[name][0], base, hz, threads, log))
    finally:
        os.sched_setaffinity(0, mask)
    bw1 = measure_read_bandwidth(threads, cpus=pool.cpus)
    bw = max(bw0, bw1)
    for r in rows:
        r["pct_bandwidth"] = round(100 * r["gbs"] / bw, 2)
    log(f"read bandwidth after: {bw1:.1f} GB/s; % below of the larger")
    for r in rows:
        log(f"{r['variant']:18s} {r['wait']:5s} T={r['tokens']:3d} median {r['us_median']:7.1f} us  mean "
            f"{r['us_mean']:7.1f}  p90 {r['us_p90']:7.1f}  {r['gbs']:6.1f} GB/s {r['pct_bandwidth']:5.1f}%  "
            f"last worker out {r['last_out_us']:7.1f} us" + (f"  {r['profile_us']}" if "profile_us" in r else ""))
    res = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=cpu_model(), host=socket.gethostname(),
               isa=base.isa.name, cpu=base.isa.cpu, threads=threads, cpus=pool.cpus, caller_cpu=caller, shape=shape,
               fmt=fmt, down_fmt=base.down_fmt, experts=E, layers=layers, steps=steps, rounds=rounds,
               read_bandwidth_gbs=bw,
               read_bandwidth_before_after_gbs=[bw0, bw1], bytes_per_expert=base.bytes_per_expert(),
               commit=_commit(),
               tiles={n: dataclasses.asdict(v[0].tiles) for n, v in engines.items()}, results=rows)
    base.close()
    return res


def _row(name, wname, T, a, engine, base, hz, threads, log) -> dict:
    ts = np.concatenate(a["ts"]) / 1e3   # us
    calls = ts.size
    prof = {key: sum(p[key] for p in a["prof"]) for key in a["prof"][0]}
    touched = float(np.mean(a["touched"]))
    nbytes = touched * base.bytes_per_expert()
    med = float(np.median(ts))
    r = dict(variant=name, wait=wname, tokens=T, calls=calls, us_median=round(med, 2), us_mean=round(float(ts.mean()), 2),
             us_p10=round(float(np.percentile(ts, 10)), 2), us_p90=round(float(np.percentile(ts, 90)), 2),
             experts_touched=touched, weight_mb=round(nbytes / 1e6, 3), gbs=round(nbytes / med / 1e3, 2),
             last_out_us=round(prof["last_out"] / calls / hz * 1e6, 2))
    if engine.tiles.profile:   # per call, per worker (mean over workers), us
        per = calls * threads * hz / 1e6
        r["profile_us"] = {key: round(prof[key] / per, 2) for key in PHASES + ("run_job", "start", "end")}
    log(f"  {name:18s} {wname:5s} T={T:3d} median {med:7.1f} us, {r['gbs']:6.1f} GB/s, last worker out "
        f"{r['last_out_us']:7.1f} us" + (f", {r['profile_us']}" if "profile_us" in r else ""))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpu_experts.native_timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2-lite")
    p.add_argument("--fmt", default="q8_0")
    p.add_argument("--down-fmt", default=None, help="format of down_proj (default: --fmt; V2-Lite q4_k: q4_0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: the shape's)")
    p.add_argument("--tokens", default="1")
    p.add_argument("--variants", default="base", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=26, help="distinct layers' weights, called in turn")
    p.add_argument("--steps", type=int, default=20, help="decode steps (x layers calls) per variant and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--waits", default="futex,spin")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v.partition("@")[0] not in VARIANTS or v.partition("@")[2] not in ("", "shared")]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    waits = [w for w in a.waits.split(",") if w]
    if not waits or set(waits) - {"futex", "spin"}:
        p.error(f"--waits takes futex and/or spin, got {a.waits!r}")
    command = "python -m cpu_experts.native_timing " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k != "out")
    res = run(a.shape, a.fmt, a.threads or default_threads(), [int(t) for t in a.tokens.split(",")], names,
              layers=a.layers, steps=a.steps, rounds=a.rounds, waits=waits, down_fmt=a.down_fmt,
              experts=a.experts)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**res, "command": command}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
