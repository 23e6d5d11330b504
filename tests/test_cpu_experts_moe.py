"""The fused MoE op against a float64 numpy reference of the same (dequantized) weights.

Tolerance: activations (x, then h) are quantized to int8 blocks of 32 with scale amax/127, so each
activation carries a relative error up to 1/254 of its block maximum; through two matmuls that gives
output errors of about 1% of the output's scale (measured 1.0-1.8%). We allow 4% of max|ref| per
element and 1.5% on average: a wrong row, block, scale or slot gives errors near 100%. bf16 uses fp32
activations, so only summation order differs (1e-5).
"""
import dataclasses

import numpy as np
import pytest

from cpu_experts import isa as isa_mod
from cpu_experts.experts import CPUExperts
from cpu_experts.formats import dequantize, quantize
from cpu_experts.reference import moe_reference

FORMATS = ["bf16", "q8_0", "q4_0", "q4_k", "q6_k"]
HOST_ISAS = isa_mod.supported(isa_mod.host_cpu()[1])
E, H, I, K = 6, 256, 256, 3


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) * 0.06 for s in ((E, I, H), (E, I, H), (E, H, I))]


_CACHE, _BLOCKS = {}, {}


def blocks(fmt):
    """GGUF blocks of _weights() (quantized once per format: the k-quant quantizers are slow) and
    their dequantized values (what the reference multiplies by)."""
    if fmt not in _BLOCKS:
        q = [quantize(w, fmt) for w in _weights()]
        _BLOCKS[fmt] = (q, [dequantize(b, fmt) for b in q])
    return _BLOCKS[fmt]


def experts(fmt, isa, threads, amx=False, tiles=None):
    key = (fmt, isa, threads, amx, tiles)
    if key not in _CACHE:
        q, dq = blocks(fmt)
        ex = CPUExperts.from_blocks(*q, fmt=fmt, hidden=H, inter=I, threads=threads, isa=isa, numa="none", amx=amx,
                                    tiles=tiles)
        _CACHE[key] = (ex, dq)
    return _CACHE[key]


def routing(rng, T):
    # experts 0..E-3 only: experts E-2, E-1 get no tokens; every expert repeats across tokens
    return np.stack([rng.permutation(E - 2)[:K] for _ in range(T)])


def check(out, ref, fmt):
    scale = np.abs(ref).max()
    err = np.abs(out - ref)
    if fmt == "bf16":
        assert err.max() <= 1e-5 * scale
    else:
        assert err.max() <= 0.04 * scale, err.max() / scale
        assert err.mean() <= 0.015 * scale, err.mean() / scale


@pytest.mark.parametrize("isa", [i for i in ("avx2", "avx512") if i in HOST_ISAS] + [
    pytest.param("avx512vnni", marks=pytest.mark.skipif("avx512vnni" not in HOST_ISAS, reason="needs AVX-512 VNNI")),
    pytest.param("avxvnni", marks=pytest.mark.skipif("avxvnni" not in HOST_ISAS, reason="needs AVX-VNNI"))])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_matches_reference(fmt, isa, threads):
    ex, (g, u, d) = experts(fmt, isa, threads)
    rng = np.random.default_rng(7)
    for T in (1, 3, 17, 300):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = routing(rng, T)
        w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), fmt)


HOST_AMX = isa_mod.host_isa().amx


@pytest.mark.skipif(not HOST_AMX, reason="needs AMX (run on the GPU machine)")
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
@pytest.mark.parametrize("threads,min_slots,mode", [(1, 16, "int8"), (2, 16, "int8"), (2, 1, "int8"),
                                                    (1, 16, "bf16"), (2, 1, "bf16"), (2, 1, "mixed")])
def test_forward_amx_matches_reference(fmt, threads, min_slots, mode):
    from cpu_experts.codegen.moe import Tiles
    tiles = Tiles(tokens=8, amx=True, amx_min_slots=min_slots, amx_mode=mode)
    ex, (g, u, d) = experts(fmt, "avx512vnni", threads, tiles=tiles)
    assert ex.tiles.amx
    rng = np.random.default_rng(11)
    for T in (3, 17, 300):  # min_slots 16: 3 vector path, 17 mixed, 300 AMX (partial chunks); 1: all AMX
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = routing(rng, T)
        w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), fmt)


AVX512 = [i for i in HOST_ISAS if i.startswith("avx512")]


@pytest.mark.skipif(not AVX512, reason="the AMX kernel needs 16-row groups (AVX-512)")
@pytest.mark.parametrize("fmt,min_slots,max_slots,threads,mode", [
    ("q8_0", 1, 128, 2, "int8"), ("q4_0", 1, 32, 1, "int8"), ("q4_0", 5, 128, 2, "int8"), ("q4_k", 1, 64, 1, "int8"),
    ("q4_k", 40, 128, 2, "int8"), ("q8_0", 1, 64, 2, "bf16"), ("q4_0", 5, 32, 1, "bf16"), ("q4_k", 1, 128, 2, "bf16")])
def test_forward_emulated_amx_matches_reference(fmt, min_slots, max_slots, threads, mode):
    """The whole AMX path (int8: pipelined steps; bf16: dequantize once, accumulate in tiles; one- and
    two-tile chunks, calls of up to max_slots slots, mixed with the vector path below min_slots) with
    its tile instructions emulated in plain IR."""
    from cpu_experts.codegen.moe import Tiles
    tiles = Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=min_slots, amx_max_slots=max_slots,
                  amx_mode=mode)
    ex, dq = experts(fmt, AVX512[0], threads, tiles=tiles)
    rng = np.random.default_rng(13)
    for T in (3, 17, 300):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = routing(rng, T)
        w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        check(ex.forward(x, ids, w), moe_reference(x, ids, w, *dq), fmt)


@pytest.mark.skipif(not AVX512, reason="the AMX kernel needs 16-row groups (AVX-512)")
@pytest.mark.parametrize("rows_down", [64, 32])  # 32: the default for few down tasks per worker (V2-Lite)
@pytest.mark.parametrize("fmt,hardware", [("q4_k", False), ("q4_0", False)]
                         + [(f, True) for f in ("q8_0", "q4_k") if HOST_AMX])
def test_forward_amx_mixed_mode_matches_reference(fmt, hardware, rows_down):
    """The default AMX choice ("mixed": vector below amx_min_slots = 8, int8 AMX 8-23, bf16 AMX from
    amx_bf16_min_slots = 24) with every band in one job: experts 0, 3, 4 get 40, 35, 28 slots (bf16;
    two chunks, the second partial), expert 1 12 (int8), expert 2 5 (vector), expert 5 none.
    Emulated here on formats whose vector path needs no VNNI (q8_0's does: hardware only)."""
    from cpu_experts.codegen.moe import Tiles
    tiles = Tiles(tokens=8, amx=True, amx_emulate=not hardware, rows_down=rows_down)
    assert (tiles.amx_mode, tiles.amx_min_slots, tiles.amx_bf16_min_slots) == ("mixed", 8, 24)
    ex, dq = experts(fmt, "avx512vnni" if hardware else AVX512[0], 2, tiles=tiles)
    T = 40
    ids = np.array([[0, 1 if t < 12 else 3, (2 if t < 5 else 3) if t < 12 else 4] for t in range(T)])
    assert np.bincount(ids.ravel(), minlength=E).tolist() == [40, 12, 5, 35, 28, 0]
    rng = np.random.default_rng(17)
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
    check(ex.forward(x, ids, w), moe_reference(x, ids, w, *dq), fmt)


def test_amx_refused_without_hardware_or_for_unsupported_formats():
    if not HOST_AMX:
        with pytest.raises(ValueError, match="AMX needs an AMX host"):
            CPUExperts.from_tensors(*_weights(), fmt="q8_0", threads=1, numa="none", amx=True)
    with pytest.raises(ValueError, match="AMX needs"):   # bf16 weights have no AMX kernel (q6_k has i8row)
        CPUExperts.from_tensors(*_weights(), fmt="bf16", threads=1, numa="none", amx=True)


def test_duplicate_expert_within_a_token_and_strided_input():
    ex, (g, u, d) = experts("q8_0", HOST_ISAS[-1], 2)
    rng = np.random.default_rng(8)
    big = rng.standard_normal((5, 2 * H)).astype(np.float32)
    x = big[:, :H]  # row stride 2H: read in place
    ids = np.array([[1, 1, 2], [0, 3, 3], [2, 2, 2], [0, 1, 2], [3, 0, 1]])
    w = rng.uniform(0.1, 1, (5, K)).astype(np.float32)
    check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), "q8_0")


def test_torch_in_torch_out_and_submit_wait():
    torch = pytest.importorskip("torch")
    ex, (g, u, d) = experts("q4_0", HOST_ISAS[0], 2)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, H)).astype(np.float32)
    ids = routing(rng, 4)
    w = rng.uniform(0.1, 1, (4, K)).astype(np.float32)
    ref = moe_reference(x, ids, w, g, u, d)
    ex.submit(torch.from_numpy(x).to(torch.bfloat16).float(), torch.from_numpy(ids), torch.from_numpy(w))
    out = ex.wait()
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (4, H)
    check(out.numpy(), ref, "q4_0")


def test_from_tensors_accepts_torch_bf16():
    torch = pytest.importorskip("torch")
    g, u, d = (torch.from_numpy(w).to(torch.bfloat16) for w in _weights(1))
    ex = CPUExperts.from_tensors(g, u, d, fmt="bf16", threads=1, numa="none")
    x = np.random.default_rng(1).standard_normal((2, H)).astype(np.float32)
    ids, w = np.array([[0, 1, 2], [3, 4, 5]]), np.full((2, K), 0.5, np.float32)
    ref = moe_reference(x, ids, w, *(t.float().numpy() for t in (g, u, d)))
    check(ex.forward(x, ids, w), ref, "bf16")


def test_bound_job_runs_through_native_submit_and_wait():
    """The cudaLaunchHostFunc path: native void f(void *job) functions on fixed buffers."""
    import ctypes
    ex, (g, u, d) = experts("q4_k", HOST_ISAS[0], 2)
    rng = np.random.default_rng(12)
    x = np.zeros((5, H), np.float32)
    ids, w = np.zeros((5, K), np.int64), np.zeros((5, K), np.float32)
    out = np.zeros((5, H), np.float32)
    submit, wait, job = ex.bind(x, ids, w, out)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    for _ in range(3):  # new contents, same buffers
        x[:] = rng.standard_normal((5, H))
        ids[:] = routing(rng, 5)
        w[:] = rng.uniform(0.1, 1, (5, K))
        fn(submit)(job)
        fn(wait)(job)
        check(out, moe_reference(x, ids, w, g, u, d), "q4_k")


def test_retiled_shares_weights_and_matches():
    """A retiled view (another tiling, same weight memory) gives the same numbers; closing it frees nothing."""
    from dataclasses import replace
    ex, (g, u, d) = experts("q4_0", HOST_ISAS[0], 2)
    view = ex.retiled(replace(ex.tiles, prefetch_all=False, prefetch_next=False, rows_down=32, tokens=3))
    assert view.gate is ex.gate and view.lib is not ex.lib
    rng = np.random.default_rng(14)
    x = rng.standard_normal((7, H)).astype(np.float32)
    ids = routing(rng, 7)
    w = rng.uniform(0.1, 1, (7, K)).astype(np.float32)
    view.pool.wake()   # an empty job: no tasks, workers left spinning
    np.testing.assert_allclose(view.forward(x, ids, w), ex.forward(x, ids, w), rtol=1e-5, atol=1e-6)
    view.close()
    check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), "q4_0")


def test_user_errors_are_one_line():
    ex, _ = experts("q8_0", HOST_ISAS[-1], 1)
    x = np.zeros((2, H), np.float32)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 256\]"):
        ex.forward(np.zeros((2, H + 1), np.float32), np.zeros((2, K), int), np.zeros((2, K), np.float32))
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 6\)"):
        ex.forward(x, np.full((2, K), 6), np.zeros((2, K), np.float32))
    with pytest.raises(ValueError, match="topk_ids and topk_weights must both be"):
        ex.forward(x, np.zeros((2, K), int), np.zeros((2, K + 1), np.float32))
    with pytest.raises(ValueError, match="unknown weight format"):
        CPUExperts.from_tensors(*_weights(), fmt="q3_x")
    with pytest.raises(ValueError, match="unknown NUMA policy"):
        CPUExperts.from_tensors(*_weights(), fmt="q8_0", numa="spread")


@pytest.mark.parametrize("yield_every", [0, 3])   # 3: idle spinners call sched_yield every 3rd pause
def test_pool_survives_10000_cycles_and_shuts_down(yield_every):
    rng = np.random.default_rng(3)
    g, u, d = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((4, 64, 128), (4, 64, 128), (4, 128, 64)))
    from cpu_experts.pool import WorkerPool
    ex = CPUExperts.from_tensors(g, u, d, fmt="q8_0", threads=2, isa="avx2", numa="none")
    x = rng.standard_normal((1, 128)).astype(np.float32)
    ids, w = np.array([[0, 2]]), np.array([[0.25, 0.75]], np.float32)
    want = ex.forward(x, ids, w).copy()   # on the shared pool
    ex.pool = WorkerPool(ex.lib, 2, cpus=None, spin=200, wait_spin=100,   # private pool, sleeps often
                         yield_every=yield_every)
    first = ex.forward(x, ids, w).copy()
    np.testing.assert_array_equal(first, want)
    for i in range(10_000):
        out = ex.forward(x, ids, w)
        if i % 1000 == 0:
            np.testing.assert_array_equal(out, first)
    threads = ex.pool._threads
    ex.pool.close()
    assert not any(t.is_alive() for t in threads)


def test_routing_flag_lives_on_the_pool_that_runs_the_job():
    """Regression (the 10,000-cycle test's flake): the route task raised ROUTED on job[POOL] (the
    shared pool the layer was built with) while the quantization tasks of a job run by another pool
    read a stale ROUTED = 1 there and copied x rows to slots before routing had written SPOS. The
    flag must live on the running pool, which resets it at every submit: run a job whose job[POOL]
    names a decoy control block and check the decoy is never touched."""
    from cpu_experts.codegen.fields import J, POOL_FIELDS, POOL_SLOTS
    from cpu_experts.pool import WorkerPool, aligned_zeros
    rng = np.random.default_rng(4)
    g, u, d = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((4, 64, 128), (4, 64, 128), (4, 128, 64)))
    ex = CPUExperts.from_tensors(g, u, d, fmt="q8_0", threads=2, isa="avx2", numa="none")
    x = rng.standard_normal((3, 128)).astype(np.float32)
    ids, w = np.array([[0, 2], [1, 2], [3, 0]]), np.full((3, 2), 0.5, np.float32)
    want = ex.forward(x, ids, w).copy()
    pool = WorkerPool(ex.lib, 2, cpus=None)
    try:
        out = np.empty_like(want)
        ex.bind(x, ids, w, out)
        decoy = aligned_zeros(POOL_SLOTS, np.int64)
        ex.job[J["POOL"]] = decoy.ctypes.data
        pool.ctrl[POOL_FIELDS["JOB"]] = ex.job.ctypes.data
        pool._submit(pool.control_address)   # native submit on this pool, job[POOL] left as the decoy
        pool.wait()
        np.testing.assert_array_equal(out, want)
        assert not decoy.any(), "a task wrote its pool state through job[POOL] instead of the running pool"
        pool.submit(ex.job)   # the Python submit re-binds the job to the pool that runs it
        pool.wait()
        assert ex.job[J["POOL"]] == pool.control_address
        np.testing.assert_array_equal(out, want)
    finally:
        pool.close()
        ex.job[J["POOL"]] = ex.pool.control_address


def test_profile_counters_cover_the_phases_and_are_off_by_default():
    """Tiles(profile=True): every worker adds rdtsc spans of its tasks and barrier waits; the parts
    lie within run_job's span. The default library has no counter code, only the two per-job stamps
    (submit, last worker out: pool T_SUBMIT / T_LAST)."""
    from cpu_experts.codegen.moe import build_ir
    ex0, _ = experts("q8_0", HOST_ISAS[-1], 2)
    assert build_ir(ex0.geo, ex0.isa, ex0.tiles).count("call i64 @\"llvm.readcyclecounter\"") == 2
    ex, (g, u, d) = experts("q8_0", HOST_ISAS[-1], 2, tiles=dataclasses.replace(ex0.tiles, profile=True))
    ex.pool.profile()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((17, H)).astype(np.float32)
    ids, w = routing(rng, 17), rng.uniform(0.05, 1.0, (17, K)).astype(np.float32)
    check(ex.forward(x, ids, w), moe_reference(x, ids, w, g, u, d), "q8_0")
    pc = ex.pool.profile()
    assert pc["task0"] > 0 and pc["task1"] > 0 and pc["task2"] > 0
    parts = sum(pc[k] for k in ("task0", "task1", "task2", "bar0", "bar1"))
    assert 0 < parts <= pc["run_job"]
    assert ex.pool.profile() == dict.fromkeys(pc, 0)   # reset by the previous read
