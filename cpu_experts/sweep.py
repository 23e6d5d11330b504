"""Kernel variants on one copy of a layer: `python -m cpu_experts.sweep --shape v3 --fmt q4_k
--variants base,pfall --tokens 1,8 [--out FILE]`.

Each variant is the default tiling with a few fields changed (VARIANTS); all share the weights
(CPUExperts.retiled) and are timed round-robin, so they see the same machine state. Every run gets
fresh random routing, after a 512 MiB parallel read that evicts the LLC; then the workers are woken
with an empty job (in a decode loop layers follow each other within their spin window), except for
the "cold" variant, whose job finds them asleep. Per variant and token count: median ms, GB/s of
weights touched, % of the read bandwidth measured in the same run (before and after the timed runs;
the larger is the yardstick) and GFLOP/s, the same fields as `hmoe bench-moe --json`.
"""
import argparse
import dataclasses
import json
import time

import numpy as np

from .bandwidth import Flusher, measure_read_bandwidth
from .bench import SHAPES, _commit, cpu_model, routing
from .experts import CPUExperts, default_threads
from .numa import anon_huge_gb
from .pool import WorkerPool, tsc_hz

VARIANTS = {   # changes to the default tiling (codegen/moe.py Tiles; AMX fields spelled out, so a name keeps
    #            its meaning when the defaults move: base = mixed_v8_24 in sessions 3-7, row8_dn for 4-bit
    #            formats since session 8)
    "base": {},
    "bf16amx": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 24, "amx_row": False,
                "amx_row_down": False},   # the AMX default of sessions 3-7 (base for q8_0 and bf16 weights)
    "cold": {},   # base, but the workers are asleep (futex) when the job arrives
    "old_pf": {"prefetch_all": False, "prefetch_next": False, "rows_down": 32},   # session 1's vector tiling
    "pf1k": {"prefetch": 1024},
    "pf2k": {"prefetch": 2048},   # the vector kernels' default before session 8
    "pf4k": {"prefetch": 4096},
    "pf8k": {"prefetch": 8192},
    "t1": {"prefetch_locality": 2},   # the default on AMX hosts since session 9
    "t0": {"prefetch_locality": 3},   # prefetcht0: the default before it (and on hosts without AMX)
    "nta": {"prefetch_locality": 0},
    "rd32": {"rows_down": 32},
    "nonext": {"prefetch_next": False},
    "int8": {"amx_mode": "int8", "amx_min_slots": 16},
    "int8_min1": {"amx_mode": "int8", "amx_min_slots": 1},
    "min4": {"amx_mode": "bf16", "amx_min_slots": 4},   # min*, max64: the bf16 kernel (session 2's mode)
    "min8": {"amx_mode": "bf16", "amx_min_slots": 8},
    "min32": {"amx_mode": "bf16", "amx_min_slots": 32},
    "max64": {"amx_mode": "bf16", "amx_min_slots": 16, "amx_max_slots": 64},
    "bf16_min16": {"amx_mode": "bf16", "amx_min_slots": 16},   # session 2's default (bf16 kernel from 16 slots)
    "ru64": {"rows_up": 64},
    "mixed": {"amx_mode": "mixed", "amx_min_slots": 1, "amx_bf16_min_slots": 32},   # int8 AMX below 32 slots
    "mixed16": {"amx_mode": "mixed", "amx_min_slots": 1, "amx_bf16_min_slots": 16},
    "mixed_v16": {"amx_mode": "mixed", "amx_min_slots": 16, "amx_bf16_min_slots": 32},   # vector < 16, int8 16-31
    "mixed_v8": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 32},
    "mixed_v8_24": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 24},
    "mixed_v8_48": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 48},
    "int8_min8": {"amx_mode": "int8", "amx_min_slots": 8},
    "ru128": {"rows_up": 128},     # session 4: activation rows read once per 4 AMX calls in gate/up (2 at 32 rows)
    "rd256": {"rows_down": 256},   # ... and per 8 calls in down (2 at 64 rows)
    "big": {"rows_up": 128, "rows_down": 256},
    "ru512": {"rows_up": 512},
    "huge": {"rows_up": 512, "rows_down": 448},   # V3: 16 down tasks, one per worker at 16 threads
    "prof": {"profile": True},   # base + rdtsc counters per phase (no cost above noise measured): where the time goes
    "ready": {"expert_ready": True},   # no barrier 1: down tasks wait per expert for its gate/up tasks
    "old_sched": {"expert_ready": False, "tail_rows": 0},   # barrier 1 and even down tasks (the default before)
    "tail256": {"tail_rows": 256},     # the last 256 rows of H in 16-row down tasks (V2-Lite, 15 workers: ~1 each)
    "tail512": {"tail_rows": 512},
    "ready_tail256": {"expert_ready": True, "tail_rows": 256},
    "ready_tail512": {"expert_ready": True, "tail_rows": 512},
    "ready_tail1024": {"expert_ready": True, "tail_rows": 1024},   # V3 (H 7168): the V2-Lite default's options,
    "ready_tail1792": {"expert_ready": True, "tail_rows": 1792},   # tail = H/8 or H/4 in 16-row tasks
    "ready_tail1792_prof": {"expert_ready": True, "tail_rows": 1792, "profile": True},
    "q1": {"quant_rows": 1},    # one x row per phase-0 task: T rows quantized (and copied to their k slots) in parallel
    "q1_prof": {"quant_rows": 1, "profile": True},
    "ready_prof": {"expert_ready": True, "profile": True},
    "pf_first": {"prefetch_first": True},   # workers waiting for phase 0 prefetch their first gate/up task
    "ready_tail512_pf": {"expert_ready": True, "tail_rows": 512, "prefetch_first": True},
    "ready_tail512_pf_prof": {"expert_ready": True, "tail_rows": 512, "prefetch_first": True, "profile": True},
    "ready_tail512_prof": {"expert_ready": True, "tail_rows": 512, "profile": True},
    "ready_tail256_prof": {"expert_ready": True, "tail_rows": 256, "profile": True},
    "w15": {},       # base tiling, a pool of threads-1 workers: one CPU left to the caller
    "w15spin": {},   # w15, and the caller spins in wait() for the whole job (no futex wake)
    "yield64": {},   # base, idle spinners (workers, caller) sched_yield every 64 pauses
    # session 8: gate/up of experts with >= amx_bf16_min_slots slots on the i8row kernel (int8 tiles, one
    # scale per weight row and per token) instead of bf16
    "row": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 24, "amx_row": True},
    "row16": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 16, "amx_row": True},
    "row8": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 8, "amx_row": True},
    "noamx": {"amx": False},   # vector kernels only (exact per-block scales at every size)
    "row_cold": {"amx_row_warm": False},   # i8row without its head / scale-stream prefetches
    "row_nokeep": {"amx_row_bounds": False},   # i8row computes its row bounds on every call (before session 9)
    # ... and down too (the last gate/up task of such an expert quantizes its h rows per slot)
    "row_dn": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 24, "amx_row": True, "amx_row_down": True},
    "row16_dn": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 16, "amx_row": True,
                 "amx_row_down": True},
    "row8_dn": {"amx_mode": "mixed", "amx_min_slots": 8, "amx_bf16_min_slots": 8, "amx_row": True, "amx_row_down": True},
    # session 9: q4_k's factors as f16 per 32 weights (0.625 bytes per weight; the layout before it)
    "f16q4k": {"q4k_superblock": False},
}
LAYOUT_FIELDS = {"q4k_superblock"}   # variants changing these get random weights of their own (timing only)
COLD = {"cold"}
PHASES = ("task0", "task1", "task2", "bar0", "bar1")   # the profile's shares of run_job
POOL_OPTS = {"w15": dict(spare=1), "w15spin": dict(spare=1, wait_spin=1 << 40),   # private pools
             "yield64": dict(spare=0, yield_every=64)}


def run(shape: str, fmt: str, threads: int, tokens: list[int], variants: list[str], repeats: int = 20,
        seed: int = 0, prefill_variants: list[str] | None = None, log=print, partial=None,
        down_fmt: str | None = None) -> dict:
    """variants are timed at <= 64 tokens, prefill_variants (default: the same) above. partial(result)
    is called after each token count (percentages against the first bandwidth reading until the end)."""
    s = SHAPES[shape]
    E, k, H, I = s["num_experts"], s["topk"], s["hidden"], s["inter"]
    t0 = time.perf_counter()
    base = CPUExperts.random(fmt=fmt, num_experts=E, hidden=H, inter=I, threads=threads, seed=seed,
                             down_fmt=down_fmt)
    build_s = time.perf_counter() - t0
    engines, own = {}, []
    prefill_variants = variants if prefill_variants is None else prefill_variants
    for name in dict.fromkeys(variants + prefill_variants):
        fields = VARIANTS[name]
        if any(f.startswith("amx") for f in fields) and not base.tiles.amx:
            continue
        tiles = dataclasses.replace(base.tiles, **fields)
        if LAYOUT_FIELDS & set(fields):
            engines[name] = CPUExperts.random(fmt=fmt, num_experts=E, hidden=H, inter=I, threads=threads, seed=seed,
                                              down_fmt=down_fmt, tiles=tiles)
            own.append(engines[name])
        else:
            engines[name] = base.retiled(tiles)
        if name in POOL_OPTS:
            opt, ex = POOL_OPTS[name], engines[name]
            cpus = base.pool.cpus or list(range(threads))
            ex.pool = WorkerPool(ex.lib, threads - opt["spare"], cpus=cpus[opt["spare"]:],
                                 wait_spin=opt.get("wait_spin", 2000), yield_every=opt.get("yield_every", 0))
    bw0 = measure_read_bandwidth(threads, cpus=base.pool.cpus)
    huge = anon_huge_gb()
    log(f"# {shape} {fmt} threads={threads} isa={base.isa.name} amx={base.tiles.amx} read bandwidth {bw0:.1f} GB/s "
        f"(weights {build_s:.1f} s, {base.bytes_per_expert() * E / 1e9:.1f} GB, on huge pages {huge} GB; "
        f"variants {', '.join(engines)})")
    rng = np.random.default_rng(seed)
    flush = Flusher(threads, base.pool.cpus)
    hz = tsc_hz() if any(e.tiles.profile for e in engines.values()) else None
    rows = {name: [] for name in engines}
    for T in tokens:
        x = rng.standard_normal((T, H)).astype(np.float32)
        w = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
        active = {n: e for n, e in engines.items() if n in (variants if T <= 64 else prefill_variants)}
        for ex in active.values():
            ex.forward(x, routing(rng, T, E, k), w)   # warm: scratch, pages, code
        times = {name: [] for name in active}
        touched = {name: [] for name in active}
        for ex in active.values():
            ex.pool.profile()   # reset
        for _ in range(repeats if T <= 64 else max(2, repeats // 6)):
            for name, ex in active.items():   # fresh routing per run: no weights left in the LLC by the last
                ids = routing(rng, T, E, k)
                touched[name].append(len(np.unique(ids)))
                flush()
                if name not in COLD:
                    ex.pool.wake()
                t1 = time.perf_counter()
                ex.forward(x, ids, w)
                times[name].append(time.perf_counter() - t1)
        for name, ts in times.items():
            dt = float(np.median(ts))
            nbytes = float(np.mean(touched[name])) * engines[name].bytes_per_expert()
            r = dict(tokens=T, ms=dt * 1e3, ms_min=min(ts) * 1e3, experts_touched=float(np.mean(touched[name])),
                     weight_gb=nbytes / 1e9, gbs=nbytes / dt / 1e9, gflops=2.0 * 3 * T * k * H * I / dt / 1e9,
                     pct_bandwidth=100 * nbytes / dt / 1e9 / bw0)
            if engines[name].tiles.profile:   # fractions of the workers' run_job cycles
                pc = engines[name].pool.profile()
                total = max(pc["run_job"], 1)
                r["profile"] = {k: round(pc[k] / total, 4) for k in PHASES}
                r["profile"]["claim_other"] = round(1 - sum(r["profile"].values()), 4)
                # mean span of a worker's run_job per timed run, as a share of the measured median ms
                span_ms = pc["run_job"] / len(times[name]) / engines[name].pool.threads / hz * 1e3
                r["profile"]["run_job_ms"] = round(span_ms, 4)
                log(f"  {name:12s} tokens {T:5d} share of run_job cycles: {r['profile']}")
            rows[name].append(r)
            log(f"  {name:12s} tokens {T:5d} {r['ms']:9.3f} ms {r['gbs']:7.1f} GB/s {r['pct_bandwidth']:5.1f}% of "
                f"the first reading  {r['gflops']:8.1f} GFLOP/s")
        if partial:
            partial(_result(base, engines, rows, shape, fmt, threads, [bw0]))
    bw1 = measure_read_bandwidth(threads, cpus=base.pool.cpus)
    bw = max(bw0, bw1)
    for name, rs in rows.items():
        for r in rs:
            r["pct_bandwidth"] = 100 * r["gbs"] / bw
            log(f"{name:12s} tokens {r['tokens']:5d} {r['ms']:9.3f} ms {r['gbs']:7.1f} GB/s {r['pct_bandwidth']:5.1f}% "
                f"{r['gflops']:8.1f} GFLOP/s")
    res = _result(base, engines, rows, shape, fmt, threads, [bw0, bw1])
    for name in POOL_OPTS:
        if name in engines:
            engines[name].pool.close()
    for ex in own + [base]:
        ex.close()
    return res


def _result(base, engines, rows, shape, fmt, threads, bws) -> dict:
    out = {name: dict(tiles=dataclasses.asdict(engines[name].tiles), workers=engines[name].pool.threads,
                      bytes_per_expert=engines[name].bytes_per_expert(), results=rs) for name, rs in rows.items()}
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=cpu_model(), isa=base.isa.name,
                cpu=base.isa.cpu, threads=threads, cpus=base.pool.cpus, numa=base.numa, shape=shape, fmt=fmt,
                down_fmt=base.down_fmt, read_bandwidth_gbs=max(bws), read_bandwidth_before_after_gbs=bws,
                bytes_per_expert=base.bytes_per_expert(), commit=_commit(), variants=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpu_experts.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2-lite")
    p.add_argument("--fmt", default="q8_0")
    p.add_argument("--down-fmt", default=None, help="format of down_proj (default: --fmt; V2-Lite q4_k: q4_0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--variants", default="base", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--prefill-variants", default=None, help="variants above 64 tokens (default: --variants)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    pnames = names if a.prefill_variants is None else [v for v in a.prefill_variants.split(",") if v]
    unknown = [v for v in names + pnames if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    command = "python -m cpu_experts.sweep " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k != "out")

    def write(res):
        if a.out:
            with open(a.out, "w") as f:
                json.dump({**res, "command": command}, f, indent=1)
    write(run(a.shape, a.fmt, a.threads or default_threads(), [int(t) for t in a.tokens.split(",")], names,
              repeats=a.repeats, prefill_variants=pnames, partial=write, down_fmt=a.down_fmt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
