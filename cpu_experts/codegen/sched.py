"""The native scheduler: the worker loop, the task claim loop with its phase barriers, submit/wait.

Pool control block: int64 slots, hot words on separate cache lines. A job is claimed task by task
from one atomic counter; `hmoe_worker` waits for a new generation (spin, then futex), runs the job
through the function pointer it carries (job[RUN] = its library's `hmoe_run_job`, so one pool runs the
jobs of every library), and the last worker out publishes FINISHED (and wakes a sleeping waiter).
"""
from contextlib import contextmanager

from llvmlite import ir

from .fields import J, POOL_FIELDS, PROF_COUNTERS, PROF_THREADS
from .irutil import SYS_SCHED_YIELD, I32, I64, PTR, VOID, define, field, futex_wait, futex_wake_all, gep, i64, intrinsic, \
    local, pause, syscall

def _slot(b, base, idx):
    return gep(b, base, idx, I64)


def aload(b, base, idx):
    """Acquire load of the i64 slot base[idx]."""
    return b.load_atomic(_slot(b, base, idx), "acquire", 8, typ=I64)


def astore(b, base, idx, val):
    """Sequentially consistent store to base[idx] (an xchg: llvmlite's store_atomic cannot take an
    opaque pointer)."""
    b.atomic_rmw("xchg", _slot(b, base, idx), val if not isinstance(val, int) else i64(val), "seq_cst")


_aload, _astore = aload, astore


def _aadd(b, base, idx, val=1):
    return b.atomic_rmw("add", _slot(b, base, idx), i64(val), "seq_cst")


def spin_until_equal(b, base, idx, value, name):
    """while (atomic load base[idx] != value) pause;"""
    head = b.append_basic_block(f"{name}.head")
    body = b.append_basic_block(f"{name}.body")
    end = b.append_basic_block(f"{name}.end")
    b.branch(head)
    b.position_at_end(head)
    b.cbranch(b.icmp_signed("==", _aload(b, base, idx), value), end, body)
    b.position_at_end(body)
    pause(b)
    b.branch(head)
    b.position_at_end(end)


class _Profile:
    """Cycle counters of one worker (Tiles.profile): `with prof(b, "task1"):` adds the rdtsc
    difference around the block to the worker's counter. No code at all when off."""

    def __init__(self, b, pool, tid, on: bool):
        self.on = on
        if on:
            self.b, self.pool = b, pool
            self.line = b.add(i64(POOL_FIELDS["PROF"]), b.mul(b.urem(tid, i64(PROF_THREADS)), i64(8)))

    def add(self, b, name, cycles):
        slot = gep(b, self.pool, b.add(self.line, i64(PROF_COUNTERS.index(name))), I64)
        b.store(b.add(b.load(slot, typ=I64), cycles), slot)

    @contextmanager
    def __call__(self, b, name):
        if not self.on:
            yield
            return
        t0 = rdtsc(b)
        yield
        self.add(b, name, b.sub(rdtsc(b), t0))


def rdtsc(b):
    return b.call(intrinsic(b.module, "llvm.readcyclecounter", I64, []), [])


def spin_pause(b, pool, n):
    """One idle spin step: pause, and every pool[YIELD]-th step (0 = never) a sched_yield, so that a
    thread sharing this CPU (the caller woken from its futex, or a worker) runs now rather than at
    the end of our time slice."""
    pause(b)
    y = field(b, pool, POOL_FIELDS["YIELD"])
    due = b.and_(b.icmp_signed(">", y, i64(0)), b.icmp_signed("==", b.urem(n, b.select(
        b.icmp_signed(">", y, i64(0)), y, i64(1))), b.sub(y, i64(1))))
    with b.if_then(due):
        syscall(b, [SYS_SCHED_YIELD])


# void hmoe_run_job(pool, job, tid): one worker's share of a job, on the pool that runs it
RUN_JOB_TYPE = ir.FunctionType(VOID, [PTR, PTR, I64])


def emit_run_job(m, route, quant_x, gateup, down, profile: bool = False, expert_ready: bool = False,
                 prefetch_gateup=None):
    """hmoe_run_job(pool, job, tid): exported, not inlined into the worker loop: a job carries its
    library's address of it (job[RUN], CPUExperts._write_static_fields) and any library's worker loop
    calls it through that pointer, so one pool serves layers of every format pair.
    expert_ready: no barrier 1; a down task waits per expert (moe.py) and gets the pool to count
    that wait as bar1 in the profile. prefetch_gateup(job, j): called by a worker whose claim is
    phase-1 task j while phase 0 still runs, once routing is done (counted as bar0)."""
    fn, b = define(m, "hmoe_run_job", VOID, [PTR, PTR, I64])
    pool, job, tid = fn.args
    prof = _Profile(b, pool, tid, profile)
    n0, n2 = field(b, job, J["N0"]), field(b, job, J["N2"])
    t_all = rdtsc(b) if profile else None
    if profile:
        prof.add(b, "start", b.sub(t_all, field(b, pool, POOL_FIELDS["T_SUBMIT"])))
    loop = b.append_basic_block("claim")
    done = b.append_basic_block("done")
    b.branch(loop)
    b.position_at_end(loop)
    idx = _aadd(b, pool, POOL_FIELDS["CLAIM"])
    with b.if_else(b.icmp_signed("<", idx, n0)) as (p0, rest):
        with p0:
            with prof(b, "task0"):
                with b.if_else(b.icmp_signed("==", idx, i64(0))) as (r, q):
                    with r:
                        b.call(route, [job, pool])
                    with q:
                        if quant_x is not None:
                            b.call(quant_x, [job, b.sub(idx, i64(1)), pool])
            _aadd(b, pool, POOL_FIELDS["DONE0"])
        with rest:
            with prof(b, "bar0"):
                if prefetch_gateup is not None:
                    with b.if_then(b.icmp_signed("!=", _aload(b, pool, POOL_FIELDS["DONE0"]), n0)):
                        spin_until_equal(b, pool, POOL_FIELDS["ROUTED"], i64(1), "routed_pf")
                        i1e = b.sub(idx, n0)
                        with b.if_then(b.icmp_signed("<", i1e, b.load_atomic(_slot(b, job, J["N1"]), "acquire", 8,
                                                                               typ=I64))):
                            b.call(prefetch_gateup, [job, i1e])
                spin_until_equal(b, pool, POOL_FIELDS["DONE0"], n0, "bar0")
            n1 = b.load_atomic(_slot(b, job, J["N1"]), "acquire", 8, typ=I64)
            i1 = b.sub(idx, n0)
            with b.if_else(b.icmp_signed("<", i1, n1)) as (p1, rest2):
                with p1:
                    with prof(b, "task1"):
                        b.call(gateup, [job, i1, tid])
                    _aadd(b, pool, POOL_FIELDS["DONE1"])
                with rest2:
                    if not expert_ready:
                        with prof(b, "bar1"):
                            spin_until_equal(b, pool, POOL_FIELDS["DONE1"], n1, "bar1")
                    i2 = b.sub(i1, n1)
                    with b.if_then(b.icmp_signed(">=", i2, n2)):
                        b.branch(done)
                    with prof(b, "task2"):
                        b.call(down, [job, i2, tid] + ([pool] if expert_ready else []))
                    _aadd(b, pool, POOL_FIELDS["DONE2"])
    b.branch(loop)
    b.position_at_end(done)
    if profile:
        t1 = rdtsc(b)
        prof.add(b, "run_job", b.sub(t1, t_all))
        prof.add(b, "end", b.sub(t1, field(b, pool, POOL_FIELDS["T_SUBMIT"])))
    b.ret_void()
    return fn

def emit_worker(m):
    """void hmoe_worker(pool, tid): wait for a new generation (spin, then futex), run it, repeat.
    The job is run by the function its job[RUN] names (its own library's hmoe_run_job): the loop
    itself is the same code in every library, so a pool started from one library runs any job."""
    fn, b = define(m, "hmoe_worker", VOID, [PTR, I64])
    pool = fn.args[0]
    P = POOL_FIELDS
    gen_word = _slot(b, pool, P["GEN"])
    my_gen = local(b, I64, i64(0))
    spin_max = field(b, pool, P["SPIN"])
    top = b.append_basic_block("top")
    wait = b.append_basic_block("wait")
    work = b.append_basic_block("work")
    quit_ = b.append_basic_block("quit")
    b.branch(top)
    b.position_at_end(top)
    spins = local(b, I64)
    b.store(i64(0), spins)
    b.branch(wait)
    b.position_at_end(wait)
    g = _aload(b, pool, P["GEN"])
    # STOP is read after GEN: close() writes STOP before bumping GEN, so a new GEN is never
    # mistaken for a job (which would re-run the previous one)
    with b.if_then(b.icmp_signed("!=", _aload(b, pool, P["STOP"]), i64(0))):
        b.branch(quit_)
    with b.if_then(b.icmp_signed("!=", g, b.load(my_gen, typ=I64))):
        b.store(g, my_gen)
        b.branch(work)
    n = b.load(spins, typ=I64)
    b.store(b.add(n, i64(1)), spins)
    with b.if_else(b.icmp_signed("<", n, spin_max)) as (spin, sleep):
        with spin:
            spin_pause(b, pool, n)
        with sleep:
            _aadd(b, pool, P["SLEEPERS"], 1)
            g2 = _aload(b, pool, P["GEN"])
            stop = _aload(b, pool, P["STOP"])
            same = b.and_(b.icmp_signed("==", g2, b.load(my_gen, typ=I64)), b.icmp_signed("==", stop, i64(0)))
            with b.if_then(same):
                futex_wait(b, gen_word, b.trunc(g2, I32))
            _aadd(b, pool, P["SLEEPERS"], -1)
            b.store(i64(0), spins)
    b.branch(wait)

    b.position_at_end(work)
    job = field(b, pool, P["JOB"], True)
    run_job = b.inttoptr(field(b, job, J["RUN"]), RUN_JOB_TYPE.as_pointer())   # an indirect call
    b.call(run_job, [pool, job, fn.args[1]])
    exited = _aadd(b, pool, P["EXITED"])
    last = b.icmp_signed("==", b.add(exited, i64(1)), field(b, pool, P["NTHREADS"]))
    with b.if_then(last):   # the job's last worker out: its span for WorkerPool.profile, then FINISHED
        t_last = gep(b, pool, i64(P["T_LAST"]), I64)
        b.store(b.add(b.load(t_last, typ=I64), b.sub(rdtsc(b), field(b, pool, P["T_SUBMIT"]))), t_last)
        _astore(b, pool, P["FINISHED"], b.load(my_gen, typ=I64))
        with b.if_then(b.icmp_signed("!=", b.load_atomic(_slot(b, pool, P["WAITER"]), "seq_cst", 8, typ=I64),
                                     i64(0))):
            futex_wake_all(b, _slot(b, pool, P["FINISHED"]))
    b.branch(top)

    b.position_at_end(quit_)
    b.ret_void()

def emit_submit_wait(m):
    P = POOL_FIELDS
    fn, b = define(m, "hmoe_submit", VOID, [PTR])
    pool = fn.args[0]
    b.store(rdtsc(b), gep(b, pool, i64(P["T_SUBMIT"]), I64))   # published by the seq_cst stores below
    for name in ("CLAIM", "DONE0", "DONE1", "DONE2", "EXITED", "ROUTED"):
        _astore(b, pool, P[name], 0)
    b.atomic_rmw("add", _slot(b, pool, P["GEN"]), i64(1), "seq_cst")
    with b.if_then(b.icmp_signed(">", b.load_atomic(_slot(b, pool, P["SLEEPERS"]), "seq_cst", 8, typ=I64),
                                 i64(0))):
        futex_wake_all(b, _slot(b, pool, P["GEN"]))
    b.ret_void()

    submit = fn
    # job-addressed forms for cudaLaunchHostFunc (userData = the layer's job; job[POOL] = its pool)
    fn, b = define(m, "hmoe_submit_job", VOID, [PTR])
    job = fn.args[0]
    pool = field(b, job, J["POOL"], True)
    _astore(b, pool, P["JOB"], b.ptrtoint(job, I64))
    b.call(submit, [pool])
    b.ret_void()

    wait = _emit_wait(m, "hmoe_wait", "WAIT_SPIN")
    wait_spin = _emit_wait(m, "hmoe_wait_spin", "HANDOVER_SPIN")

    for name, target in (("hmoe_wait_job", wait), ("hmoe_wait_job_spin", wait_spin)):
        fn, b = define(m, name, VOID, [PTR])
        b.call(target, [field(b, fn.args[0], J["POOL"], True)])
        b.ret_void()


def _emit_wait(m, name: str, spin_field: str):
    """void name(pool): until the generation submitted last has FINISHED, spin up to pool[spin_field]
    pause steps, then sleep on the FINISHED futex (the last worker out wakes it). WAIT_SPIN (short)
    suits a caller that may share a core with a worker; HANDOVER_SPIN (long) a hand-over thread
    pinned to a core of its own, where a futex wake-up per layer would be the slowest part."""
    P = POOL_FIELDS
    fn, b = define(m, name, VOID, [PTR])
    pool = fn.args[0]
    gen = _aload(b, pool, P["GEN"])
    spin_max = field(b, pool, P[spin_field])
    spins = local(b, I64, i64(0))
    head = b.append_basic_block("head")
    sleep = b.append_basic_block("sleep")
    done = b.append_basic_block("done")
    b.branch(head)
    b.position_at_end(head)
    with b.if_then(b.icmp_signed("==", _aload(b, pool, P["FINISHED"]), gen)):
        b.branch(done)
    n = b.load(spins, typ=I64)
    b.store(b.add(n, i64(1)), spins)
    with b.if_then(b.icmp_signed(">=", n, spin_max)):
        b.branch(sleep)
    spin_pause(b, pool, n)
    b.branch(head)

    b.position_at_end(sleep)
    _astore(b, pool, P["WAITER"], 1)
    fin = b.load_atomic(_slot(b, pool, P["FINISHED"]), "seq_cst", 8, typ=I64)
    with b.if_then(b.icmp_signed("!=", fin, gen)):
        futex_wait(b, _slot(b, pool, P["FINISHED"]), b.trunc(fin, I32))
        b.branch(sleep)
    _astore(b, pool, P["WAITER"], 0)
    b.branch(done)
    b.position_at_end(done)
    b.ret_void()
    return fn

