"""Memory layouts shared by the generated code and Python: the job and the pool control block."""

# job: i64 slots written by Python before submit. Activations are kept in slot order (the T*k
# (token, expert) pairs sorted by expert): XQ/XD/XS/XT and HQ/HD/HS/HT rows are slots, so an
# expert's rows are consecutive (AMX loads them as tiles); SPOS[t*k + j] = slot of pair (t, j).
# XB/HB: the same rows in bf16 (AMX-BF16 mode); AMXB: per-worker scratch, AMXB_STRIDE bytes each.
# RUN: address of the job's own library's `hmoe_run_job` (written with the static fields): a pool's
# worker loop calls it through this pointer, so one pool runs the jobs of every library (format pair).
# Slots are only ever appended, so every other slot keeps the index the kernels were built with.
# READY (Tiles.expert_ready): per active expert a counter of finished gate/up tasks, one cache line
# (8 slots) each, zeroed by the route task; a down task waits on the counter of each expert it reads.
# XR/XRS (Tiles.amx_row), HR/HRS (amx_row_down): x / h rows as int8 with one f32 scale per slot (the i8row
# kernel's activations). GRB/URB/DRB: per matrix f32 [E][rows] of each weight row's largest possible |w|
# over its K, which the i8row kernel computes on its first call for a row group and keeps (0 = not yet).
JOB_FIELDS = """T TOPK H I E X XSTRIDE IDS W OUT OSTRIDE
GP GS GB UP US UB DP DS DB GU_PAY_E GU_SC_E D_PAY_E D_SC_E
XQ XD XS XT XB HF HQ HD HS HT HB CNT OFF STOK SW SPOS ACT NACT N0 N1 N2 POOL AMXB AMXB_STRIDE RUN
READY XR XRS HR HRS GRB URB DRB""".split()
J = {name: i for i, name in enumerate(JOB_FIELDS)}

# pool control block: i64 slots, hot words on separate cache lines (8 slots = 64 bytes)
POOL_FIELDS = {"GEN": 0, "CLAIM": 8, "DONE0": 16, "DONE1": 24, "DONE2": 32, "EXITED": 40,
               "FINISHED": 48, "SLEEPERS": 56, "WAITER": 64, "STOP": 72, "NTHREADS": 80, "JOB": 88,
               "SPIN": 96, "WAIT_SPIN": 97, "YIELD": 98, "HANDOVER_SPIN": 99, "ROUTED": 104,
               "T_SUBMIT": 105, "T_LAST": 106, "PROF": 112}
# T_SUBMIT: rdtsc at the last submit; T_LAST: sum over jobs of (last worker out - T_SUBMIT) cycles
# (one rdtsc each per job, in every library: where a job's wall time goes, WorkerPool.profile)
# Tiles(profile=True): per worker (tid % PROF_THREADS) a line of PROF_COUNTERS cycle counters (rdtsc),
# added by the worker itself: phase-0/1/2 task time, spinning at barrier 0/1 (with expert_ready: on
# the experts' readiness), all of run_job, and its start and end relative to the submit (T_SUBMIT)
PROF_COUNTERS = ("task0", "task1", "task2", "bar0", "bar1", "run_job", "start", "end")
PROF_THREADS = 64
POOL_SLOTS = 112 + 8 * PROF_THREADS
