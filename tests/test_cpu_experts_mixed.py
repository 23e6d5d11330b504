"""Per-projection expert formats: gate/up in one format, down in another (llama.cpp's Q4_K_M files keep
ffn_down_exps in Q6_K), on every ISA path against the float64 reference. Tolerances as in
test_cpu_experts_moe (int8 activations: 4% of max|ref| per element, 1.5% on average)."""
import numpy as np
import pytest

from cpu_experts.codegen.moe import Tiles
from cpu_experts.experts import CPUExperts
from cpu_experts.precompile import MIXED_AMX, MIXED_EMULATED, MIXED_PAIRS
from cpu_experts.reference import moe_reference
from tests.test_cpu_experts_moe import AVX512, E, H, HOST_AMX, HOST_ISAS, I, K, blocks, check, routing

_CACHE = {}


def mixed(fmt, down_fmt, isa, threads, tiles=None):
    key = (fmt, down_fmt, isa, threads, tiles)
    if key not in _CACHE:
        (g, u, _), (dg, du, _) = blocks(fmt)
        (_, _, d), (_, _, dd) = blocks(down_fmt)
        ex = CPUExperts.from_blocks(g, u, d, fmt=fmt, down_fmt=down_fmt, hidden=H, inter=I, threads=threads,
                                    isa=isa, numa="none", amx=False if tiles is None else None, tiles=tiles)
        _CACHE[key] = (ex, (dg, du, dd))
    return _CACHE[key]


def run_and_check(ex, dq, seed, sizes=(1, 3, 17, 300)):
    rng = np.random.default_rng(seed)
    for T in sizes:
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = routing(rng, T)
        w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        check(ex.forward(x, ids, w), moe_reference(x, ids, w, *dq), "q")


ISAS = [i for i in ("avx2", "avx512") if i in HOST_ISAS] + [
    pytest.param("avx512vnni", marks=pytest.mark.skipif("avx512vnni" not in HOST_ISAS, reason="needs AVX-512 VNNI")),
    pytest.param("avxvnni", marks=pytest.mark.skipif("avxvnni" not in HOST_ISAS, reason="needs AVX-VNNI"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,down_fmt", MIXED_PAIRS)
def test_mixed_formats_match_reference(fmt, down_fmt, isa):
    ex, dq = mixed(fmt, down_fmt, isa, 2)
    assert (ex.fmt, ex.down_fmt) == (fmt, down_fmt)
    run_and_check(ex, dq, 7)


@pytest.mark.skipif(not AVX512, reason="the AMX kernel needs 16-row groups (AVX-512)")
@pytest.mark.parametrize("fmt,down_fmt,mode,min_slots", MIXED_EMULATED)
def test_mixed_formats_emulated_amx_match_reference(fmt, down_fmt, mode, min_slots):
    """AMX in the phase whose format it runs (tile instructions emulated in plain IR), the vector
    kernels in the other."""
    tiles = Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=min_slots, amx_max_slots=64, amx_mode=mode)
    ex, dq = mixed(fmt, down_fmt, AVX512[0], 2, tiles=tiles)
    run_and_check(ex, dq, 13, sizes=(3, 17, 300))


@pytest.mark.skipif(not HOST_AMX, reason="needs AMX (run on the GPU machine)")
@pytest.mark.parametrize("fmt,down_fmt", MIXED_AMX)
@pytest.mark.parametrize("mode", ["bf16", "int8", "mixed"])
def test_mixed_formats_amx_match_reference(fmt, down_fmt, mode):
    tiles = Tiles(tokens=8, amx=True, amx_min_slots=16, amx_mode=mode)
    ex, dq = mixed(fmt, down_fmt, "avx512vnni", 2, tiles=tiles)
    assert ex.tiles.amx
    run_and_check(ex, dq, 11, sizes=(3, 17, 300))


def test_mixed_bytes_and_errors():
    ex, _ = mixed("q4_k", "q6_k", HOST_ISAS[0], 1)
    same, _ = mixed("q4_k", "q4_k", HOST_ISAS[0], 1)
    six, _ = mixed("q6_k", "q6_k", HOST_ISAS[0], 1)
    assert ex.bytes_per_expert() == round((2 * same.bytes_per_expert() + six.bytes_per_expert()) / 3)
    with pytest.raises(ValueError, match="unknown"):
        CPUExperts(fmt="q4_k", down_fmt="q5_k", num_experts=E, hidden=H, inter=I, threads=1, numa="none")
    with pytest.raises(ValueError, match="AMX needs"):
        CPUExperts(fmt="q6_k", down_fmt="bf16", num_experts=E, hidden=H, inter=I, threads=1, numa="none",
                   tiles=Tiles(amx=True, amx_emulate=True, amx_min_slots=1))


# ---------------------------------------------------------------- one pool for every format pair

# Q4_K_M alternates q4_k/q4_k and q4_k/q6_k layers; q8_0 with bf16 covers the other activation paths
# (int8 gate/up with an f32 down, and a bf16 layer without activation quantization)
SHARED_PAIRS = (("q4_k", "q4_k"), ("q4_k", "q6_k"), ("q8_0", "q8_0"), ("q8_0", "bf16"), ("bf16", "bf16"))


def _engines(threads=2):
    out = []
    for fmt, down_fmt in SHARED_PAIRS:
        (g, u, _), (dg, du, _) = blocks(fmt)
        (_, _, d), (_, _, dd) = blocks(down_fmt)
        ex = CPUExperts.from_blocks(g, u, d, fmt=fmt, down_fmt=down_fmt, hidden=H, inter=I, threads=threads,
                                    isa=HOST_ISAS[-1], numa="none", amx=False)
        out.append((ex, (dg, du, dd)))
    return out


def _inputs(seed, sizes):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((T, H)).astype(np.float32), routing(rng, T),
             rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)) for T in sizes]


def _alone(ex, inputs):
    """Each engine on a pool of its own, started from its own library (what every format pair got
    before pools were shared): the outputs the shared pool must reproduce bit for bit."""
    from cpu_experts.codegen.fields import J
    from cpu_experts.pool import WorkerPool
    shared, pool = ex.pool, WorkerPool(ex.lib, ex.threads, cpus=None)
    try:
        ex.pool = pool
        return [ex.forward(*args).copy() for args in inputs]
    finally:
        pool.close()
        ex.pool = shared
        ex.job[J["POOL"]] = shared.control_address


@pytest.mark.parametrize("private", [False, True])
def test_formats_share_one_pool_and_alternate(private):
    """Layers of five format pairs share one pool object (threads, CPUs), whose worker loop comes
    from one library and calls each job's own run function (job[RUN]). Alternating forwards for many
    cycles give each engine's outputs alone, bit for bit, and match the float64 reference. private:
    the same on a pool made by hand (sleeps often, sched_yield while idle), as a benchmark does."""
    from cpu_experts.codegen.fields import J
    from cpu_experts.pool import WorkerPool
    engines = _engines()
    pool = engines[0][0].pool
    assert all(ex.pool is pool for ex, _ in engines), "one pool for every format pair"
    assert len({id(ex.lib) for ex, _ in engines}) == len(SHARED_PAIRS)
    assert len({ex.job[J["RUN"]] for ex, _ in engines}) == len(SHARED_PAIRS)
    # the loop's library runs at most one of them: the others' jobs cross libraries
    assert sum(ex.lib is pool._lib for ex, _ in engines) <= 1
    inputs = _inputs(21, (1, 3, 17, 300))
    alone = [_alone(ex, inputs) for ex, _ in engines]
    for (ex, dq), outs in zip(engines, alone):
        for (x, ids, w), out in zip(inputs, outs):
            check(out, moe_reference(x, ids, w, *dq), "bf16" if ex.fmt == ex.down_fmt == "bf16" else "q")
    shared = pool
    if private:   # a library other than the first engine's starts this pool's workers
        pool = WorkerPool(engines[-1][0].lib, 2, cpus=None, spin=200, wait_spin=100, yield_every=3)
        for ex, _ in engines:
            ex.pool = pool
    try:
        for cycle in range(1000):
            for n, (ex, _) in enumerate(engines):
                i = (cycle + n) % len(inputs) if cycle % 20 == 0 else cycle % 2   # mostly decode sizes
                np.testing.assert_array_equal(ex.forward(*inputs[i]), alone[n][i])
            if cycle % 100 == 0:
                pool.wake()   # the pool's own empty job in between
    finally:
        if private:
            threads = pool._threads
            pool.close()
            for ex, _ in engines:
                ex.close()
    if private:
        assert not any(t.is_alive() for t in threads)
        return
    assert pool is shared
    # submit/wait by job address (what cudaLaunchHostFunc and the memops mailbox call), alternating
    import ctypes
    native = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    bound = []
    for ex, _ in engines:
        x, ids, w = inputs[1]
        args = (x.copy(), ids.astype(np.int64), w.copy(), np.empty((x.shape[0], H), np.float32))
        submit, wait, job = ex.bind(*args)
        assert (submit, wait) == (pool.submit_job_address, pool.wait_job_address)   # the same for every library
        bound.append((native(submit), native(wait), job, args[3]))
    for cycle in range(300):
        for n, (submit, wait, job, out) in enumerate(bound):
            submit(job)
            wait(job)
            np.testing.assert_array_equal(out, alone[n][1])
    for ex, _ in engines:
        ex.close()
