"""Persistent native worker threads.

Each worker is a Python thread that pins itself to one CPU and then calls the JIT-compiled
`hmoe_worker` loop through ctypes (which releases the GIL) and stays there until shutdown: no
Python runs on the hot path. We start threads from Python rather than pthread_create from JIT code
because Python then owns their lifetime (join on close, no leaked threads on error) and ctypes
already gives a GIL-free native call; the cost is only paid once, at start.

`submit_job_address` / `wait_job_address` are native `void f(void *job)` functions: the orchestrator
passes them to cudaLaunchHostFunc with a layer's job address (CPUExperts.bind) as userData.
`wait_job_spin_address` waits the same way but spins far longer before sleeping: for a hand-over
thread pinned to a core no worker uses (the memops dispatcher), where a futex wake-up per layer
would cost more than the spinning.

A pool runs the jobs of any library, not only of the one whose worker loop it runs: the loop calls
the `hmoe_run_job` that job[RUN] names (every library's loop, submit and wait are the same code), so
the layers of a model with several format pairs (Q4_K_M: q4_k/q4_k and q4_k/q6_k) share one pool.
"""
import ctypes
import functools
import os
import threading
import time

import numpy as np

from .codegen.fields import J, JOB_FIELDS, POOL_FIELDS, POOL_SLOTS, PROF_COUNTERS, PROF_THREADS

# void f(void *): the native submit / wait (of a pool or of a bound job); ctypes drops the GIL around the call
NATIVE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_WORKER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)


def aligned_zeros(n: int, dtype, align: int = 64) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n * itemsize].view(dtype)


class WorkerPool:
    def __init__(self, lib, threads: int, cpus: list[int] | None = None, spin: int = 20000, wait_spin: int = 2000,
                 yield_every: int = 0, handover_spin: int = 200_000):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.cpus = cpus
        self.ctrl = aligned_zeros(POOL_SLOTS, np.int64)
        self.ctrl[POOL_FIELDS["NTHREADS"]] = threads
        self.ctrl[POOL_FIELDS["SPIN"]] = spin
        self.ctrl[POOL_FIELDS["WAIT_SPIN"]] = wait_spin
        self.ctrl[POOL_FIELDS["YIELD"]] = yield_every   # sched_yield every n idle spins (0: never)
        # the spin-waiting form's bound (~10 ms of pause steps): for a hand-over thread on a core of its own
        self.ctrl[POOL_FIELDS["HANDOVER_SPIN"]] = handover_spin
        self.control_address = self.ctrl.ctypes.data
        self.submit_address = lib.address("hmoe_submit")
        self.wait_address = lib.address("hmoe_wait")
        # void f(void *job): what cudaLaunchHostFunc takes, userData = a layer's bound job
        self.submit_job_address = lib.address("hmoe_submit_job")
        self.wait_job_address = lib.address("hmoe_wait_job")
        self.wait_job_spin_address = lib.address("hmoe_wait_job_spin")  # spins HANDOVER_SPIN steps, not WAIT_SPIN
        self._submit = NATIVE_FN(self.submit_address)
        self._wait = NATIVE_FN(self.wait_address)
        self._worker = _WORKER(lib.address("hmoe_worker"))
        self._lib = lib  # keeps the worker loop's code alive as long as the pool
        self._empty = aligned_zeros(len(JOB_FIELDS), np.int64)   # N0 = N1 = N2 = 0: no tasks
        self._empty[J["RUN"]] = lib.address("hmoe_run_job")
        self._threads = [threading.Thread(target=self._run, args=(t,), name=f"hmoe-worker-{t}", daemon=True)
                         for t in range(threads)]
        for th in self._threads:
            th.start()
        self.closed = False

    def _run(self, tid: int):
        if self.cpus:
            os.sched_setaffinity(0, {self.cpus[tid % len(self.cpus)]})
        self._worker(self.control_address, tid)

    def submit(self, job: np.ndarray):
        """Start a job (int64 job array); returns at once."""
        assert not self.closed, "pool is closed"
        assert job[J["RUN"]], "job[RUN] is not set: the workers would call address 0"
        job[J["POOL"]] = self.control_address   # its native submit/wait (bind) then name this pool too
        self.ctrl[POOL_FIELDS["JOB"]] = job.ctypes.data
        self._submit(self.control_address)

    def wait(self):
        self._wait(self.control_address)

    def wake(self):
        """Run an empty job: afterwards every worker is spinning (not asleep on the futex), as in a
        decode loop where layers follow each other faster than the spin window."""
        self.submit(self._empty)
        self.wait()

    def profile(self, reset: bool = True) -> dict:
        """Cycle counters summed over the workers since the last reset (only a library built with
        Tiles(profile=True) writes them): {counter: cycles}, see fields.PROF_COUNTERS; and
        last_out: over the jobs, cycles from submit to the last worker's exit (every library)."""
        lines = self.ctrl[POOL_FIELDS["PROF"]:].reshape(PROF_THREADS, 8)
        out = {name: int(lines[:, i].sum()) for i, name in enumerate(PROF_COUNTERS)}
        # written by every library's worker loop, also without the profile
        out["last_out"] = int(self.ctrl[POOL_FIELDS["T_LAST"]])   # sum over jobs: last worker out - submit
        if reset:
            lines[:] = 0
            self.ctrl[POOL_FIELDS["T_LAST"]] = 0
        return out

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.ctrl[POOL_FIELDS["STOP"]] = 1
        self._submit(self.control_address)  # bumps the generation and wakes sleepers
        for th in self._threads:
            th.join()

    def __del__(self):
        self.close()


@functools.cache
def tsc_hz() -> float:
    """rdtsc ticks per second (llvm.readcyclecounter around a 50 ms sleep): converts the cycles that
    WorkerPool.profile and the profiling tools count to time."""
    from llvmlite import ir
    from .codegen.irutil import I64, define, intrinsic
    from .isa import host_isa
    from .jit import Library
    m = ir.Module(name="hmoe_tsc")
    fn, b = define(m, "hmoe_tsc", I64, [])
    b.ret(b.call(intrinsic(m, "llvm.readcyclecounter", I64, []), []))
    lib = Library(str(m), host_isa())
    tsc = ctypes.CFUNCTYPE(ctypes.c_int64)(lib.address("hmoe_tsc"))
    t0, c0 = time.perf_counter(), tsc()
    time.sleep(0.05)
    t1, c1 = time.perf_counter(), tsc()
    return (c1 - c0) / (t1 - t0)
