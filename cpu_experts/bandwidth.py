"""Measured DRAM read bandwidth: a JIT-compiled streaming read over a large buffer, all threads.

This is the yardstick of the decode kernels (GB/s of weights streamed / this number, same run).
`PoolFlusher` runs the same read as a job of an expert pool, on its own workers: it evicts the
last-level cache before a timed call and measures the bandwidth the memory system gives at that
moment, so every timed call has readings taken right before and right after it (the machines here
move by 10-40% between readings seconds apart: neighbours share the memory channels).
"""
import ctypes
import os
import threading
import time

import numpy as np

from .codegen.fields import J, JOB_FIELDS
from .codegen.irutil import I32, I64, PTR, VOID, define, field, for_range, gep, i64, prefetch, splat, store, vec
from .isa import host_isa
from .jit import Library
from llvmlite import ir

_READ = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def _read_ir(vector_bytes: int, prefetch_bytes: int) -> str:
    """i64 hmoe_read(ptr, nbytes): xor of every 4-byte word, 4 independent vector accumulators,
    optionally with a software prefetch of every line prefetch_bytes ahead."""
    m = ir.Module(name="hmoe_read")
    lanes = vector_bytes // 4
    fn, b = define(m, "hmoe_read", I64, [PTR, I64])
    ptr, nbytes = fn.args
    vt = vec(I32, lanes)
    accs = [b.alloca(vt) for _ in range(4)]
    for a in accs:
        b.store(splat(I32, lanes, 0), a)
    step = 4 * vector_bytes
    with for_range(b, 0, b.udiv(nbytes, i64(step)), name="i") as i:
        base = b.mul(i, i64(step))
        for u, a in enumerate(accs):
            if prefetch_bytes and u % (64 // vector_bytes or 1) == 0:
                prefetch(b, gep(b, ptr, b.add(base, i64(u * vector_bytes + prefetch_bytes))))
            v = b.load(gep(b, ptr, b.add(base, i64(u * vector_bytes))), typ=vt, align=64)
            b.store(b.xor(b.load(a, typ=vt), v), a)
    tot = b.load(accs[0], typ=vt)
    for a in accs[1:]:
        tot = b.xor(tot, b.load(a, typ=vt))
    r = b.extract_element(tot, ir.Constant(I32, 0))
    b.ret(b.zext(r, I64))
    read = fn
    # void hmoe_read_job(pool, job, tid): a worker pool's job (the type of hmoe_run_job): worker tid reads
    # job[H] bytes from job[X] + tid * job[H]; the xor lands in job[OUT] so that the loads stay
    fn, b = define(m, "hmoe_read_job", VOID, [PTR, PTR, I64])
    _, job, tid = fn.args
    per = field(b, job, J["H"])
    r = b.call(read, [gep(b, field(b, job, J["X"], True), b.mul(tid, per)), per])
    store(b, r, job, J["OUT"], align=8)
    b.ret_void()
    return str(m)


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 31, repeats: int = 3, cpus=None) -> float:
    """Best GB/s of `repeats` parallel reads of an nbytes buffer split over `threads` pinned threads,
    over a plain streaming read and one with software prefetch (the stricter yardstick of the two)."""
    isa = host_isa()
    reads = [_READ(Library(_read_ir(isa.vector_bytes, pf), isa).address("hmoe_read")) for pf in (0, 2048)]
    buf = np.ones(nbytes // 8 + 512, np.int64)
    base = buf.ctypes.data + (-buf.ctypes.data) % 4096
    per = (nbytes // threads) // 4096 * 4096
    best = 0.0
    for read in [r for r in reads for _ in range(repeats)]:
        start = threading.Barrier(threads + 1)
        done = threading.Barrier(threads + 1)

        def work(t):
            if cpus:
                os.sched_setaffinity(0, {cpus[t % len(cpus)]})
            start.wait()
            read(base + t * per, per)
            done.wait()

        ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in ths:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        done.wait()
        dt = time.perf_counter() - t0
        for th in ths:
            th.join()
        best = max(best, per * threads / dt / 1e9)
    return best


class Flusher:
    """Evicts the last-level cache between timed runs: a parallel streaming read of nbytes (default
    512 MiB, more than the LLC of the machines measured here) on the given CPUs."""

    def __init__(self, threads: int, cpus=None, nbytes: int = 1 << 29):
        isa = host_isa()
        self._read = _READ(Library(_read_ir(isa.vector_bytes, 0), isa).address("hmoe_read"))
        self._buf = np.ones(nbytes // 8 + 512, np.int64)
        self._base = self._buf.ctypes.data + (-self._buf.ctypes.data) % 4096
        self._per = (nbytes // threads) // 4096 * 4096
        self.threads, self.cpus = threads, cpus

    def __call__(self):
        def work(t):
            if self.cpus:
                os.sched_setaffinity(0, {self.cpus[t % len(self.cpus)]})
            self._read(self._base + t * self._per, self._per)

        ths = [threading.Thread(target=work, args=(t,)) for t in range(self.threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()


class PoolFlusher:
    """The Flusher's read as a job of `pool` (its workers, each reading nbytes / threads), timed from
    submit to wait: call it to evict the last-level cache; it returns the GB/s it read at. The workers
    are left spinning afterwards, as between the layers of a decode step."""

    def __init__(self, pool, nbytes: int = 1 << 29):
        from .pool import aligned_zeros
        isa = host_isa()
        # the read with software prefetch 2 KiB ahead, as the decode kernels prefetch: on the GPU machine
        # the plain read trailed the kernels (bench-moe rows at 100-120% of it)
        self._lib = Library(_read_ir(isa.vector_bytes, 2048), isa)
        self._buf = np.ones(nbytes // 8 + 512, np.int64)
        per = (nbytes // pool.threads) // 4096 * 4096
        self.nbytes = per * pool.threads
        self.job = aligned_zeros(len(JOB_FIELDS), np.int64)
        self.job[J["RUN"]] = self._lib.address("hmoe_read_job")
        self.job[J["X"]] = self._buf.ctypes.data + (-self._buf.ctypes.data) % 4096
        self.job[J["H"]] = per
        self.pool = pool

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.pool.submit(self.job)
        self.pool.wait()
        return self.nbytes / (time.perf_counter() - t0) / 1e9
