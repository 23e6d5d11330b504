"""The memops hand-over's CPU side: a mailbox in page-locked host memory and a native dispatcher.

The GPU stream rings the bell (writes a job's table index, `cuStreamWriteValue32`) after the
hidden-state copy, and waits for DONE (`cuStreamWaitValue32`) before the output copy. A dispatcher
thread spins on the bell in native code, runs the job through its engine's native submit and wait
(the same functions the host-function path queues) and then writes DONE. Protocol, and why the
values are constants (a CUDA graph bakes them at capture): orchestrator/NOTES.md, "The memops
hand-over".

Mailbox: int64 slots, hot words on their own cache lines. The GPU writes 32-bit values into the
low half of BELL and DONE (x86 is little-endian; the high halves stay 0).
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import lru_cache

import numpy as np

from runtime.errors import HmoeError

BELL, DONE, STOP, SPIN, YIELD, SLEEP_NS, RUNS, BAD, COUNT, TABLE = 0, 8, 16, 24, 25, 26, 32, 33, 40, 64
ENTRY = 3  # table entry: job address, native submit(job), native wait(job)
CAPACITY = 4096  # jobs per mailbox (a model's MoE layers x the token counts it has run)
SLOTS = TABLE + ENTRY * CAPACITY

_LOOP = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # ctypes drops the GIL for the whole loop


def _emit(m):
    """void hmoe_doorbell(i64 *mb): until STOP, take a rung bell, run its job, write DONE = 1."""
    from llvmlite import ir

    from cpu_experts.codegen.irutil import I64, PTR, SYS_SCHED_YIELD, VOID, define, gep, i64, local, pause, syscall
    from cpu_experts.codegen.sched import aload, astore

    SYS_NANOSLEEP = 35
    job_fn = ir.FunctionType(VOID, [PTR])
    fn, b = define(m, "hmoe_doorbell", VOID, [PTR])
    mb = fn.args[0]
    spins = local(b, I64, i64(0))
    ts = local(b, ir.ArrayType(I64, 2))  # struct timespec for the sleep
    head, ring, idle, quit_ = (b.append_basic_block(n) for n in ("head", "ring", "idle", "quit"))
    b.branch(head)

    b.position_at_end(head)
    with b.if_then(b.icmp_signed("!=", aload(b, mb, STOP), i64(0))):
        b.branch(quit_)
    bell = aload(b, mb, BELL)
    b.cbranch(b.icmp_signed("!=", bell, i64(0)), ring, idle)

    b.position_at_end(ring)
    astore(b, mb, BELL, 0)  # before DONE: the GPU rings again only after it has seen DONE
    count = aload(b, mb, COUNT)
    valid = b.and_(b.icmp_signed(">", bell, i64(0)), b.icmp_signed("<=", bell, count))
    with b.if_else(valid) as (ok, bad):
        with ok:
            entry = b.add(i64(TABLE), b.mul(b.sub(bell, i64(1)), i64(ENTRY)))
            job = b.inttoptr(aload(b, mb, entry), PTR)
            for k in (1, 2):  # submit, then wait: the host-function path's two calls, back to back
                # an indirect call: the pointer's type names the function type (printed as `ptr`)
                b.call(b.inttoptr(aload(b, mb, b.add(entry, i64(k))), job_fn.as_pointer()), [job])
            b.atomic_rmw("add", gep(b, mb, RUNS, I64), i64(1), "seq_cst")
        with bad:  # a bell no table entry answers: recorded, and DONE still written so the GPU goes on
            astore(b, mb, BAD, bell)
    astore(b, mb, DONE, 1)
    b.store(i64(0), spins)
    b.branch(head)

    b.position_at_end(idle)
    n = b.load(spins, typ=I64)
    b.store(b.add(n, i64(1)), spins)
    with b.if_else(b.icmp_signed("<", n, aload(b, mb, SPIN))) as (spin, sleep):
        with spin:
            pause(b)
            y = aload(b, mb, YIELD)
            every = b.select(b.icmp_signed(">", y, i64(0)), y, i64(1))
            due = b.and_(b.icmp_signed(">", y, i64(0)), b.icmp_signed("==", b.urem(n, every), b.sub(y, i64(1))))
            with b.if_then(due):
                syscall(b, [SYS_SCHED_YIELD])
        with sleep:  # the GPU cannot wake a futex: past the spin budget, poll every SLEEP_NS
            b.store(i64(0), gep(b, ts, 0, I64))
            b.store(aload(b, mb, SLEEP_NS), gep(b, ts, 1, I64))
            syscall(b, [SYS_NANOSLEEP, b.ptrtoint(ts, I64), 0])
    b.branch(head)

    b.position_at_end(quit_)
    b.ret_void()


@lru_cache(maxsize=None)
def _library():
    from llvmlite import ir

    from cpu_experts.isa import host_isa
    from cpu_experts.jit import Library

    m = ir.Module(name="hmoe_doorbell")
    _emit(m)
    return Library(str(m), host_isa())


class Mailbox:
    """One model's hand-over mailbox and its dispatcher thread (started on first use).

    spin: idle polls (each one `pause`) before the dispatcher falls back to sleeping `sleep_us`
    between polls; yield_every: a sched_yield every n polls while spinning (0: never), so that a
    worker sharing its core runs. start(cpus) pins the dispatcher to CPUs no worker uses, where
    it never yields: a dispatcher sharing a worker's core would stall that worker's tasks."""

    def __init__(self, *, spin: int = 200_000, yield_every: int = 64, sleep_us: int = 50):
        from cpu_experts.pool import aligned_zeros

        self.closed, self._thread = True, None  # until built: nothing for __del__ to stop
        if spin < 0 or yield_every < 0 or not 1 <= sleep_us < 1_000_000:  # nanosleep's tv_nsec < 1e9
            raise HmoeError(f"the hand-over mailbox (HMOE_DOORBELL_*) needs spin >= 0, yield_every >= 0, 1 <= sleep_us < 1000000; got {spin}, "
                             f"{yield_every}, {sleep_us}")
        self.slots = aligned_zeros(SLOTS, np.int64, align=4096)  # page-aligned: registered on its own
        self.slots[SPIN], self.slots[YIELD], self.slots[SLEEP_NS] = spin, yield_every, sleep_us * 1000
        self.address = self.slots.ctypes.data
        self._index: dict[int, int] = {}  # job address -> bell value (table row + 1)
        self.cpus: list[int] = []  # where the dispatcher is pinned (empty: where the OS puts it)
        self.closed = False

    @classmethod
    def from_env(cls) -> "Mailbox":
        """Settings from $HMOE_DOORBELL_SPIN / _YIELD / _SLEEP_US where set (for measuring)."""
        names = {"spin": "HMOE_DOORBELL_SPIN", "yield_every": "HMOE_DOORBELL_YIELD",
                 "sleep_us": "HMOE_DOORBELL_SLEEP_US"}
        settings = {}
        for key, name in names.items():
            if os.environ.get(name):
                try:
                    settings[key] = int(os.environ[name])
                except ValueError:
                    raise HmoeError(f"{name} must be an integer, got {os.environ[name]!r}") from None
        return cls(**settings)

    def bell_for(self, job: np.ndarray, submit: int, wait: int) -> int:
        """The bell value that runs `job` (native submit, then wait); one table row per job. A row
        rewritten for new functions must not be in flight (callers bind before launching)."""
        address = job.ctypes.data
        bell = self._index.get(address)
        if bell is None:
            n = len(self._index)
            if n == CAPACITY:
                raise RuntimeError(f"hand-over mailbox full: {CAPACITY} jobs (MoE layers x token counts)")
            row = TABLE + n * ENTRY
            self.slots[row:row + ENTRY] = (address, submit, wait)
            bell = self._index[address] = n + 1
            self.slots[COUNT] = n + 1  # published after the row: the dispatcher reads COUNT first
        else:  # the job's engine may have rebound its functions: keep the row current
            row = TABLE + (bell - 1) * ENTRY
            if self.slots[row + 1] != submit or self.slots[row + 2] != wait:
                self.slots[row + 1:row + ENTRY] = (submit, wait)
        return bell

    def start(self, cpus: list[int] | None = None) -> None:
        """Start the dispatcher (once), pinned to `cpus` if given (then with no sched_yield while it
        spins, unless HMOE_DOORBELL_YIELD says otherwise)."""
        if self.closed:
            raise RuntimeError("hand-over mailbox is closed")
        if self._thread is None:
            loop = _LOOP(_library().address("hmoe_doorbell"))
            if cpus and not os.environ.get("HMOE_DOORBELL_YIELD"):
                self.slots[YIELD] = 0  # nothing else is meant to run there

            def run():
                if cpus:
                    os.sched_setaffinity(0, set(cpus))
                loop(self.address)

            self.cpus = list(cpus or [])
            self._thread = threading.Thread(target=run, name="hmoe-doorbell", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def runs(self) -> int:
        return int(self.slots[RUNS])

    def close(self) -> None:
        """Stop the dispatcher (it sees STOP within one poll, or one sleep); DONE is written so a
        stream still waiting on it goes on instead of hanging (its result is then not computed)."""
        if self.closed:
            return
        self.closed = True
        self.slots[STOP] = 1
        if self._thread is not None:
            self._thread.join()
        self.slots[DONE] = 1

    def __del__(self):
        self.close()
