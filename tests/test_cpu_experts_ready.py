"""Per-expert readiness instead of barrier 1 (Tiles.expert_ready), a finer end of phase 2
(Tiles.tail_rows) and the phase-0 prefetch (Tiles.prefetch_first): the same arithmetic in another task
order, so outputs must equal the barrier tiling's bit for bit (and the float64 reference within the
usual tolerance)."""
import dataclasses
import os

import numpy as np
import pytest

from cpu_experts.codegen.moe import Tiles, down_tasks
from cpu_experts.experts import CPUExperts
from cpu_experts.pool import WorkerPool
from cpu_experts.reference import moe_reference
from tests.test_cpu_experts_moe import AVX512, HOST_AMX, HOST_ISAS, H, I, K, blocks, check, experts, routing

ISA = HOST_ISAS[0]   # the widest (the GPU machine's AVX-512 VNNI; 16-row groups)
# H = 256, rows_down 64: 3 tasks of 64 rows, then 4 of 16 (AVX-512 row groups: 16; AVX2: 8)
OPTIONS = {"ready": dict(expert_ready=True), "tail": dict(tail_rows=64),
           "ready_tail": dict(expert_ready=True, tail_rows=64), "pf_first": dict(prefetch_first=True),
           "all": dict(expert_ready=True, tail_rows=64, prefetch_first=True)}


PLAIN = dict(expert_ready=False, tail_rows=0, prefetch_first=False)   # barrier 1, equal down tasks


def _variant(fmt, threads, name, isa=ISA):
    """(the barrier tiling, the option's tiling, dequantized weights) on one copy of the weights."""
    base, dq = experts(fmt, isa, threads)
    plain = base.retiled(dataclasses.replace(base.tiles, **PLAIN))
    return plain, base.retiled(dataclasses.replace(base.tiles, rows_down=64, **{**PLAIN, **OPTIONS[name]})), dq


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_options_equal_the_default_tiling_bit_for_bit(fmt, threads, name):
    base, ex, (g, u, d) = _variant(fmt, threads, name)
    rng = np.random.default_rng(11)
    for T in (1, 3, 17, 300):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids, w = routing(rng, T), rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)   # experts E-2, E-1 idle
        if T == 3:
            ids[1] = [2, 2, 0]   # one expert twice in a token
        out = ex.forward(x, ids, w).copy()
        np.testing.assert_array_equal(out, base.forward(x, ids, w))
        check(out, moe_reference(x, ids, w, g, u, d), fmt)


def test_down_task_count_and_bad_tail_is_one_line():
    assert down_tasks(2048, Tiles(rows_down=32, tail_rows=256), 1) == 56 + 16
    assert down_tasks(2048, Tiles(rows_down=32, tail_rows=256), 8) == 56 + 16
    assert down_tasks(2048, Tiles(rows_down=32, tail_rows=256), 9) == 64   # larger jobs: no tail
    assert down_tasks(2048, Tiles(rows_down=32), 1) == 64
    base, _ = experts("q8_0", ISA, 2)
    for tail in (48, 512, 40):   # leaves 208 (not a multiple of 64), more than H, not a multiple of 16
        with pytest.raises(ValueError, match=r"^tail_rows \d+ must be at most hidden 256"):
            base.retiled(dataclasses.replace(base.tiles, rows_down=64, tail_rows=tail))


def test_pool_survives_many_cycles_with_expert_ready_and_tail():
    """A private pool that sleeps often (short spins), alternating token counts: every output equals
    the first of its token count (the readiness counters are zeroed by each job's route task)."""
    base, ex, _ = _variant("q8_0", 2, "all", isa=HOST_ISAS[-1])   # AVX2 where the host has it: 8-row groups
    rng = np.random.default_rng(12)
    cases = [(rng.standard_normal((T, H)).astype(np.float32), routing(rng, T),
              rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)) for T in (1, 5)]
    want = [base.forward(*c).copy() for c in cases]
    ex.pool = WorkerPool(ex.lib, 2, cpus=None, spin=200, wait_spin=100)
    try:
        for i in range(3000):
            c = i % 2
            out = ex.forward(*cases[c])
            if i % 250 < 2:
                np.testing.assert_array_equal(out, want[c])
    finally:
        ex.pool.close()


def test_readiness_wait_is_profiled_as_bar1_and_spans_are_counted():
    base, ex, (g, u, d) = _variant("q8_0", 2, "ready_tail")
    ex = ex.retiled(dataclasses.replace(ex.tiles, profile=True))
    ex.pool.profile()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((17, H)).astype(np.float32)
    ids, w = routing(rng, 17), rng.uniform(0.05, 1.0, (17, K)).astype(np.float32)
    for _ in range(20):
        check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), "q8_0")
    pc = ex.pool.profile()
    assert pc["task1"] > 0 and pc["task2"] > 0 and pc["bar1"] >= 0
    assert sum(pc[k] for k in ("task0", "task1", "task2", "bar0", "bar1")) <= pc["run_job"]
    # each worker starts after the submit and ends after it started; the last one out is later still
    assert 0 < pc["start"] < pc["end"] and pc["end"] - pc["start"] == pc["run_job"]
    assert pc["last_out"] * ex.pool.threads >= pc["end"]


def _amx_case(emulate):
    q, (g, u, d) = blocks("q4_0")
    tiles = Tiles(tokens=8, amx=True, amx_emulate=emulate, amx_min_slots=1, amx_mode="int8", rows_down=64)
    plain = CPUExperts.from_blocks(*q, fmt="q4_0", hidden=H, inter=I, threads=2, numa="none", tiles=tiles,
                                   isa=AVX512[0] if emulate else "avx512vnni")
    opt = plain.retiled(dataclasses.replace(tiles, expert_ready=True, tail_rows=64))
    rng = np.random.default_rng(14)
    for T in (3, 17, 64):   # AMX experts in the 16-row tail tasks take the vector kernels
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids, w = routing(rng, T), rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        ref = moe_reference(x, ids, w, g, u, d)
        check(opt.forward(x, ids, w), ref, "q4_0")
        check(plain.forward(x, ids, w), ref, "q4_0")
    plain.close()


@pytest.mark.skipif(not AVX512, reason="the AMX kernel needs 16-row groups (AVX-512)")
def test_emulated_amx_with_expert_ready_and_tail_matches_reference():
    _amx_case(emulate=True)


@pytest.mark.skipif(not HOST_AMX, reason="needs AMX")
def test_amx_hardware_with_expert_ready_and_tail_matches_reference():
    _amx_case(emulate=False)


def test_down_waits_for_its_experts_gateup_under_oversubscription():
    """4 workers on at most 2 cores are preempted mid-task: a down task that did not wait for the last
    expert's gate/up tasks would read stale h rows (caught by this test when the wait was removed)."""
    base, ex, _ = _variant("q8_0", 2, "all")
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, H)).astype(np.float32)
    ids, w = np.array([[0, 1, 2], [3, 1, 2]]), np.full((2, K), 0.3, np.float32)
    pool = WorkerPool(ex.lib, 4, cpus=[0, 1] if len(os.sched_getaffinity(0)) >= 2 else None, spin=50)
    ex.pool = pool
    try:
        for i in range(2000):
            x2 = x * (1 + i % 7)   # fresh h values every call: stale rows cannot match by chance
            np.testing.assert_array_equal(ex.forward(x2, ids, w), base.forward(x2, ids, w), err_msg=f"call {i}")
    finally:
        pool.close()


def test_options_add_only_their_code_and_the_default_rule():
    """Off in Tiles(); each option adds only its own code. CPUExperts turns readiness and a tail of H/4
    on where it picks 32-row down tasks for few tasks per worker (V2-Lite at 15-16 workers), not else."""
    from cpu_experts.codegen.moe import build_ir
    base, _ = experts("q8_0", ISA, 2)
    assert Tiles().expert_ready is False and Tiles().tail_rows == 0 and Tiles().prefetch_first is False
    plain = build_ir(base.geo, base.isa, dataclasses.replace(base.tiles, **PLAIN))
    assert "ready.head" not in plain and "task_prefetch_gateup" not in plain and "bar1.head" in plain
    opt = build_ir(base.geo, base.isa, dataclasses.replace(base.tiles, **OPTIONS["all"]))
    assert "ready.head" in opt and "task_prefetch_gateup" in opt and "bar1.head" not in opt
    v2lite = CPUExperts(fmt="q8_0", num_experts=2, hidden=2048, inter=128, threads=15, numa="none", isa=ISA)
    v3 = CPUExperts(fmt="q8_0", num_experts=2, hidden=7168, inter=128, threads=16, numa="none", isa=ISA)
    two = CPUExperts(fmt="q8_0", num_experts=2, hidden=2048, inter=128, threads=2, numa="none", isa=ISA)
    try:
        t = v2lite.tiles
        assert (t.rows_down, t.expert_ready, t.tail_rows, t.tail_task_rows) == (32, True, 512, 16)
        for other in (v3, two):
            assert (other.tiles.expert_ready, other.tiles.tail_rows) == (False, 0)
    finally:
        for ex in (v2lite, v3, two):
            ex.close()
        v2lite.pool.close(), v3.pool.close()   # their 15 and 16 workers would stay asleep for the session
