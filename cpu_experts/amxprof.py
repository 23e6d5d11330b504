"""Where one AMX-BF16 call's time goes: `python -m cpu_experts.amxprof [--fmt q4_k] [--out FILE]`.

Times the kernel alone (no MoE job around it) on synthetic weights, one call = M slots x 2 weight
groups (32 rows) x K = H (gate/up shape), in three builds of the same kernel (amx_bf16.PARTS):
"all", "dequant" (no tile instructions) and "tiles" (no dequantization). Per case on 1 thread and on every thread at once (each on its
own CPU and data), with the operands
    hot:    the same A and weights every call (both in L2)
    stream: weights streamed from a 1 GiB pool (DRAM), A hot
    moe:    weights streamed, A rotating over 8 buffers per thread (L3, as in a MoE task that
            reads an expert's activation rows once per call)
and reports rdtsc cycles per call and per 32-weight block, and GFLOP/s per core. Overlapped work
does not add up: all < dequant + tiles says how much the two halves overlap.
"""
import argparse
import ctypes
import os
import threading
import time

import numpy as np
from llvmlite import ir

from .bench import _commit, cpu_model, save_result
from .codegen.amx_bf16 import BF16_BLOCK_BYTES, PARTS, amx_bf16_name, emit_amx_bf16_mm
from .codegen.irutil import I64, PTR, define, for_range, gep, i64, intrinsic, load
from .experts import _geometry, enable_amx
from .isa import host_isa
from .jit import Library
from .pool import aligned_zeros

NSET = 7   # pointers per operand set: A, pay0, sc0, bias0, pay1, sc1, bias1


def build_ir(geo, parts: str, emulate: bool = False) -> str:
    """i64 prof_run(ncalls, nblocks, M, lda, sets i64[nsets][7], nsets, acc, acc_stride, bbuf): ncalls
    kernel calls rotating over the operand sets; returns the rdtsc cycles they took."""
    m = ir.Module(name=f"hmoe_amxprof_{geo.fmt}_{parts}")
    kern = emit_amx_bf16_mm(m, geo, 2048, emulate=emulate, parts=parts)
    assert kern.name == amx_bf16_name()
    fn, b = define(m, "prof_run", I64, [I64, I64, I64, I64, PTR, I64, PTR, I64, PTR])
    ncalls, nblocks, M, lda, sets, nsets, acc, acc_stride, bbuf = fn.args
    tsc = intrinsic(m, "llvm.readcyclecounter", I64, [])
    t0 = b.call(tsc, [])
    with for_range(b, 0, ncalls, name="call") as i:
        base = gep(b, sets, b.mul(b.urem(i, nsets), i64(NSET * 8)))
        ptrs = [b.inttoptr(load(b, base, I64, j, align=8), PTR) for j in range(NSET)]
        b.call(kern, [nblocks, M, ptrs[0], lda, *ptrs[1:], acc, acc_stride, bbuf])
    b.ret(b.sub(b.call(tsc, []), t0))
    return str(m)


class _Operands:
    """Per-thread operand sets for one scenario (pointers into shared pools)."""

    def __init__(self, geo, K, M, scenario, tid, pools):
        nb = K // 32
        pay_b, sc_b = nb * geo.block_payload_bytes, geo.scale_bytes(geo.group_rows, K)
        a_bytes = (M + 32) * K * 2
        wpool, spool, apool = pools
        n_w = len(wpool) // (2 * pay_b)
        n_a = 8 if scenario == "moe" else 1
        w_sets = 1 if scenario == "hot" else min(n_w, 4096)
        self.keep = []   # own A buffers (written: untouched zero pages would all map to one page)
        for i in range(n_a if scenario == "moe" else 0):
            a = aligned_zeros(a_bytes // 2, np.uint16)
            a[:] = apool[(i * 4099) % (len(apool) - a.size):][:a.size]
            self.keep.append(a)
        a_ptrs = [x.ctypes.data for x in self.keep] or [apool.ctypes.data + tid * a_bytes]
        rows = []
        for s in range(max(w_sets, n_a)):
            w = (tid * 997 + s) % n_w if scenario != "hot" else tid % n_w
            pay0 = wpool.ctypes.data + 2 * w * pay_b
            sc0 = spool.ctypes.data + (2 * w % (len(spool) // sc_b - 1)) * sc_b
            rows.append([a_ptrs[s % n_a], pay0, sc0, sc0, pay0 + pay_b, sc0 + sc_b, sc0 + sc_b])
        self.sets = np.array(rows, np.int64)
        self.acc = aligned_zeros(2 * 128 * 16, np.float32)
        self.bbuf = aligned_zeros(nb * 2 * BF16_BLOCK_BYTES, np.uint8)


_SIG = ctypes.CFUNCTYPE(ctypes.c_int64, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_void_p)


def _time_calls(f, ops, cpus, nb, M, K, calls) -> float:
    """Median over threads (one per operand set, each pinned to its CPU, all at once) of rdtsc cycles
    per call, after a warm-up."""
    cyc = [0] * len(ops)

    def work(t):
        os.sched_setaffinity(0, {cpus[t]})
        o = ops[t]
        args = (nb, M, K * 2, o.sets.ctypes.data, len(o.sets), o.acc.ctypes.data, 128 * 16 * 4, o.bbuf.ctypes.data)
        f(max(calls // 10, 2), *args)
        cyc[t] = f(calls, *args)
    th = [threading.Thread(target=work, args=(t,)) for t in range(len(ops))]
    for x in th:
        x.start()
    for x in th:
        x.join()
    return float(np.median(cyc)) / calls


def run(fmt="q4_k", K=7168, slots=(32, 64), threads=None, calls=200, log=print, emulate=False,
        pool_bytes=1 << 30) -> dict:
    """emulate: tile instructions in plain IR (tests of this harness on hosts without AMX; no timing value)."""
    isa = host_isa("avx512vnni" if not emulate else None)
    if not emulate and not (isa.amx and enable_amx()):
        raise SystemExit("amxprof needs an AMX host")
    threads = threads or len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    geo = _geometry(fmt, isa, None)
    nb = K // 32
    rng = np.random.default_rng(0)
    wpool = aligned_zeros(pool_bytes, np.uint8)   # the kernels load payload vectors 64-byte aligned
    wpool[:] = rng.integers(0, 256, pool_bytes, dtype=np.uint8)
    spool = (rng.uniform(0.001, 0.01, 1 << 22)).astype(np.float16).view(np.uint16)
    apool = (rng.standard_normal(threads * (max(slots) + 32) * K).astype(np.float32).view(np.uint32) >> 16) \
        .astype(np.uint16)
    pools = (wpool, spool, apool)
    from .pool import tsc_hz
    hz = tsc_hz()
    fns = {}
    for parts in PARTS:
        lib = Library(build_ir(geo, parts, emulate), isa)
        fns[parts] = (lib, _SIG(lib.address("prof_run")))
    rows = []
    for scenario in ("hot", "stream", "moe"):
        for M in slots:
            ops = [_Operands(geo, K, M, scenario, t, pools) for t in range(threads)]
            for nthr in (1, threads):
                for parts in PARTS:
                    per_call = _time_calls(fns[parts][1], ops[:nthr], cpus, nb, M, K, calls)
                    r = dict(scenario=scenario, slots=M, threads=nthr, parts=parts,
                             cycles_per_call=round(per_call), cycles_per_block=round(per_call / nb, 1),
                             gflops_per_core=round(2.0 * M * 32 * K / (per_call / hz) / 1e9, 1))
                    rows.append(r)
                    log(f"{scenario:6s} M={M:3d} thr={nthr:2d} {parts:7s} {r['cycles_per_call']:9d} "
                        f"cyc/call {r['cycles_per_block']:7.1f} cyc/block {r['gflops_per_core']:7.1f} GFLOP/s/core")
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=cpu_model(), cpu=isa.cpu, fmt=fmt,
                K=K, tsc_hz=hz, threads=threads, calls=calls, commit=_commit(), results=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpu_experts.amxprof", description=__doc__.split("\n\n")[0])
    p.add_argument("--fmt", default="q4_k")
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--slots", default="32,64")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(a.fmt, a.k, [int(s) for s in a.slots.split(",")], a.threads, a.calls)
    save_result(res, "cpu_experts.amxprof", a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
