"""Memory layouts shared by the generated code and Python: the job and the pool control block."""

# job: i64 slots written by Python before submit
JOB_FIELDS = """T TOPK H I E X XSTRIDE IDS W OUT OSTRIDE
GP GS GB UP US UB DP DS DB GU_PAY_E GU_SC_E D_PAY_E D_SC_E
XQ XD XS XT HF HQ HD HS HT CNT OFF STOK SW ACT NACT N0 N1 N2 GATHER GATHER_STRIDE POOL""".split()
J = {name: i for i, name in enumerate(JOB_FIELDS)}

# pool control block: i64 slots, hot words on separate cache lines (8 slots = 64 bytes)
POOL_FIELDS = {"GEN": 0, "CLAIM": 8, "DONE0": 16, "DONE1": 24, "DONE2": 32, "EXITED": 40,
               "FINISHED": 48, "SLEEPERS": 56, "WAITER": 64, "STOP": 72, "NTHREADS": 80, "JOB": 88,
               "SPIN": 96, "WAIT_SPIN": 97}
POOL_SLOTS = 104
