"""Per-core rate of the vector decode kernels alone: `python -m cpu_experts.dotprof [--fmts q4_k,q8_0]`.

Times `dot_q_n{nt}` (codegen/dot.py) without the MoE job around it, on synthetic weights: one call =
one row group (R rows) x K, and the calls go in gate/up pairs (two matrices alternating, as a phase-1
task streams them; the head of the next call's streams is prefetched before each call, as the MoE's
`prefetch_next` does). Scenarios:
    hot:    the same pair of row groups every call (weights in L2: the kernel's compute rate)
    l3:     96 row-group pairs per thread, re-read (L3-resident: 14 MiB per thread for q4_k, K 7168)
    stream: consecutive row groups of a region of DRAM of its own per thread, never re-read
on 1, 2, 4, 8, ... threads at once (pinned, one per CPU, started together behind a barrier).
Reports rdtsc cycles per 32-weight block of one row group, bytes per cycle and GB/s per core (median
thread), and the sum over threads (bytes / slowest thread's time). Layouts: "default" and, for q4_k,
"f16" (its factors as f16 per 32 weights, the form before session 9; layout.py).
"""
import argparse
import ctypes
import dataclasses
import os
import threading
import time

import numpy as np
from llvmlite import ir

from .bench import _commit, cpu_model, save_result
from .codegen.dot import emit_quant_dot, quant_dot_name
from .codegen.irutil import I64, PTR, define, for_range, gep, i64, intrinsic, load, prefetch
from .experts import _geometry
from .formats import get_format
from .isa import host_isa
from .jit import Library
from .layout import BLOCK
from .numa import Buffer

SCENARIOS = ("hot", "l3", "stream")
L3_PAIRS = 96          # row-group pairs per thread in the l3 scenario (q4_k K 7168: 14 MiB per thread)
LAYOUTS = ("default", "f16")   # f16: q4_k's factors as f16 per 32 weights (other formats have one form)


def build_ir(geo, isa, nt: int, prefetch_bytes: int = 2048) -> str:
    """i64 prof_run(sets i64[n][3] (pay, sc, bias), n, nblocks, acts i64[4*nt], out): n kernel calls,
    each after prefetching the next set's first prefetch_bytes; returns the rdtsc cycles they took."""
    m = ir.Module(name=f"hmoe_dotprof_{geo.fmt}_{'sb' if geo.superblock else 'f16'}_n{nt}")
    kern = emit_quant_dot(m, geo, isa, nt, prefetch_bytes, True, 3)
    assert kern.name == quant_dot_name(nt)
    fn, b = define(m, "prof_run", I64, [PTR, I64, I64, PTR, PTR])
    sets, n, nblocks, acts, out = fn.args
    tsc = intrinsic(m, "llvm.readcyclecounter", I64, [])
    act = [b.inttoptr(load(b, acts, I64, j, align=8), PTR) for j in range(4 * nt)]
    t0 = b.call(tsc, [])
    with for_range(b, 0, n, name="call") as i:
        row = [b.inttoptr(load(b, sets, I64, b.add(b.mul(i, i64(3)), i64(j)), align=8), PTR) for j in range(3)]
        nxt = b.mul(b.urem(b.add(i, i64(1)), n), i64(3))
        npay, nsc, nbias = (b.inttoptr(load(b, sets, I64, b.add(nxt, i64(j)), align=8), PTR) for j in range(3))
        for off in range(0, prefetch_bytes, 64):
            prefetch(b, gep(b, npay, i64(off)))
        for off in range(0, max(prefetch_bytes // 8, 64), 64):
            prefetch(b, gep(b, nsc, i64(off)))
            if geo.bias:
                prefetch(b, gep(b, nbias, i64(off)))
        b.call(kern, [row[0], row[1], row[2], nblocks] + act + [out])
    b.ret(b.sub(b.call(tsc, []), t0))
    return str(m)


def group_bytes(geo, K: int) -> tuple[int, int]:
    """(payload-stream bytes, scale-stream bytes per stream) of one row group x K."""
    return K // BLOCK * geo.block_payload_bytes, geo.scale_bytes(geo.group_rows, K)


def _sets(geo, K, base, nbytes, scenario) -> tuple[np.ndarray, int]:
    """Row-group pointer triples (payload, scales, bias) in a region [base, base+nbytes), and the bytes
    one call streams: the three streams in three sub-regions (offset by odd multiples of 4 KiB: no
    aliasing of equal low address bits)."""
    gp, gs = group_bytes(geo, K)
    nsc = 2 if geo.bias else 1
    per = gp + nsc * gs
    count = max(2, (nbytes - 3 * 12288) // per)
    if scenario == "hot":
        count = 2
    elif scenario == "l3":
        count = min(count, 2 * L3_PAIRS)
    count -= count % 2   # gate/up pairs
    pay0 = base
    sc0 = pay0 + count * gp + 4096 * 3
    bi0 = sc0 + count * gs + 4096 * 5
    rows = [[pay0 + i * gp, sc0 + i * gs, (bi0 + i * gs) if geo.bias else sc0 + i * gs] for i in range(count)]
    return np.array(rows, np.int64), per


_SIG = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_void_p)


class _Acts:
    def __init__(self, K, nt, rng):
        nb = K // BLOCK
        self.arrays = []
        for _ in range(nt):
            self.arrays += [rng.integers(-127, 128, K, dtype=np.int8), rng.uniform(0.01, 0.02, nb).astype(np.float32),
                            rng.integers(-500, 500, 2 * nb).astype(np.int32), rng.uniform(-1, 1, nb).astype(np.float32)]
        order = [self.arrays[4 * n + j] for j in range(4) for n in range(nt)]   # aq[nt], ad[nt], asum[nt], aterm[nt]
        self.ptrs = np.array([a.ctypes.data for a in order], np.int64)
        self.out = np.zeros(nt * 16, np.float32)


def _run_threads(f, cpus, jobs, nblocks, acts, repeat):
    """jobs[t] = sets of thread t; all threads start behind a barrier; cycles per thread (min over repeat)."""
    cyc = [0] * len(jobs)
    bar = threading.Barrier(len(jobs))

    def work(t):
        os.sched_setaffinity(0, {cpus[t]})
        s = jobs[t]
        best = None
        for _ in range(repeat):
            bar.wait()
            c = f(s.ctypes.data, len(s), nblocks, acts[t].ptrs.ctypes.data, acts[t].out.ctypes.data)
            best = c if best is None else min(best, c)
        cyc[t] = best
    th = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
    for x in th:
        x.start()
    for x in th:
        x.join()
    return cyc


def check_args(fmts, Ks, nt, layouts):
    """One-line errors for what the command line can get wrong."""
    for fmt in fmts:
        get_format(fmt)   # unknown names raise its one-line error
        if fmt == "bf16":
            raise ValueError("dotprof times the quantized kernels (q8_0, q4_0, q4_k, q6_k), not bf16")
    bad = [k for k in Ks if k <= 0 or k % BLOCK]
    if bad:
        raise ValueError(f"K must be a positive multiple of {BLOCK}, got {bad}")
    if not 1 <= nt <= 8:
        raise ValueError(f"nt (activation rows per call) must be 1-8, got {nt}")
    if set(layouts) - set(LAYOUTS) or not layouts:
        raise ValueError(f"layouts are {' and/or '.join(LAYOUTS)}, got {list(layouts)}")


def run(fmts=("q4_k", "q8_0"), Ks=(7168, 2048), threads=None, nt=1, pool_bytes=2 << 30, layouts=("default",),
        log=print) -> dict:
    check_args(fmts, Ks, nt, layouts)
    isa = host_isa()
    ncpu = threads or len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))[:ncpu]
    counts = sorted({1, 2, 4, 8, ncpu} & set(range(1, ncpu + 1)))
    from .pool import tsc_hz
    hz = tsc_hz()
    pool = Buffer(pool_bytes, "interleave")
    view = pool.array(np.uint8, 0, pool_bytes)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0x10, 0x40, 1 << 20, dtype=np.uint8)   # as f16: normal numbers; as codes: any
    view.reshape(-1, 1 << 20)[:] = pattern
    acts = [_Acts(max(Ks), nt, np.random.default_rng(t)) for t in range(ncpu)]
    rows = []
    for fmt in fmts:
        base_geo = _geometry(fmt, isa, None)
        for layout in layouts:
            if layout == "f16" and not base_geo.superblock:
                continue
            geo = dataclasses.replace(base_geo, superblock=False) if layout == "f16" else base_geo
            f = _SIG(Library(build_ir(geo, isa, nt), isa).address("prof_run"))
            for K in Ks:
                nb = K // BLOCK
                for scenario in SCENARIOS:
                    for nthr in counts:
                        region = pool_bytes // nthr if scenario == "stream" else pool_bytes // ncpu
                        jobs, per = zip(*[_sets(geo, K, pool.address + t * region, region, scenario)
                                          for t in range(nthr)])
                        per = per[0]
                        if scenario == "stream":
                            # warm-up on one set each (code, TLB), then one pass that never re-reads
                            _run_threads(f, cpus, [j[:2] for j in jobs], nb, acts, 1)
                            cyc = _run_threads(f, cpus, [j[2:] for j in jobs], nb, acts, 1)
                            ncalls = len(jobs[0]) - 2
                        else:
                            reps = max(2, 4000 // len(jobs[0]))
                            cyc = _run_threads(f, cpus, list(jobs), nb, acts, reps)
                            ncalls = len(jobs[0])
                        med = float(np.median(cyc))
                        byt = ncalls * per
                        r = dict(fmt=fmt, layout=layout, K=K, scenario=scenario, threads=nthr,
                                 cycles_per_block=round(med / (ncalls * nb), 2),
                                 bytes_per_cycle=round(byt / med, 2),
                                 gbs_per_core=round(byt / (med / hz) / 1e9, 2),
                                 gbs_total=round(nthr * byt / (max(cyc) / hz) / 1e9, 1))
                        rows.append(r)
                        log(f"{fmt:5s} {layout:5s} K={K:5d} {scenario:6s} thr={nthr:2d} {r['cycles_per_block']:7.2f} "
                            f"cyc/block {r['bytes_per_cycle']:6.2f} B/cyc {r['gbs_per_core']:6.2f} GB/s/core "
                            f"{r['gbs_total']:6.1f} GB/s all")
    del view
    pool.close()
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=cpu_model(), cpu=isa.cpu,
                isa=isa.name, tsc_hz=hz, nt=nt, threads=ncpu, pool_bytes=pool_bytes, commit=_commit(), results=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpu_experts.dotprof", description=__doc__.split("\n\n")[0])
    p.add_argument("--fmts", default="q4_k,q8_0")
    p.add_argument("--k", default="7168,2048")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--nt", type=int, default=1)
    p.add_argument("--pool-mib", type=int, default=2048)
    p.add_argument("--layouts", default="default", help="default and/or f16 (q4_k's factors as f16 per 32 weights)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        check_args(a.fmts.split(","), [int(k) for k in a.k.split(",")], a.nt, a.layouts.split(","))
    except ValueError as e:
        p.error(str(e))
    res = run(a.fmts.split(","), [int(k) for k in a.k.split(",")], a.threads, a.nt, a.pool_mib << 20,
              a.layouts.split(","))
    save_result(res, "cpu_experts.dotprof", a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
