"""The AMX-BF16 kernel alone (amxprof's harness), tile instructions emulated: one call against numpy
(1, 2 and 3 chunks, a partial one), and the profiling builds do what they say ("dequant": no tile
work, "tiles": the products of whatever bbuf holds)."""
import numpy as np
import pytest

from cpu_experts import isa as isa_mod
from cpu_experts.amxprof import _SIG, build_ir
from cpu_experts.codegen.amx_bf16 import BF16_BLOCK_BYTES
from cpu_experts.jit import Library
from cpu_experts.layout import geometry
from cpu_experts.pool import aligned_zeros

from .streams import scale_streams

AVX512 = [i for i in isa_mod.supported(isa_mod.host_cpu()[1]) if i.startswith("avx512")]
pytestmark = pytest.mark.skipif(not AVX512, reason="the AMX kernels need 16-row groups (AVX-512)")


def _bf16(x):
    """float32 -> bf16 bits the way the kernels round (half away from zero on the magnitude)."""
    return ((x.astype(np.float32).view(np.uint32) + 0x8000) >> 16).astype(np.uint16)


def _f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _weights(geo, nb, rng):
    """One row group's (16 rows) payload, scales and bias in the repacked layout, and its values."""
    pay = rng.integers(0, 256, nb * geo.block_payload_bytes, dtype=np.uint8)
    sc, bias, scv, biasv = scale_streams(geo, nb, rng)
    blocks = pay.reshape(nb, -1, 16, 4)   # [block][vector or quad][row][byte]
    if geo.nibbles:                        # quads 0-3 low nibbles, 4-7 high
        blocks = np.concatenate([blocks & 0x0F, blocks >> 4], axis=1)
    codes = blocks.transpose(2, 0, 1, 3).reshape(16, nb * 32).astype(np.float32)   # [row][k]
    d = np.repeat(scv[:, 0].T.astype(np.float32), 32, axis=1)
    shift = np.repeat(biasv[:, 0].T.astype(np.float32), 32, axis=1) if geo.bias else -geo.offset * d
    w = _f32(_bf16(d * codes + shift))
    return tuple(_aligned(x) for x in (pay, sc, bias)), w


def _aligned(x):
    """A 64-byte aligned copy (the kernels load payload and tiles with aligned vector loads)."""
    out = aligned_zeros(x.size, x.dtype).reshape(x.shape)
    out[...] = x
    return out


@pytest.mark.parametrize("fmt", ["q4_k", "q4_k-f16", "q8_0"])
@pytest.mark.parametrize("M", [13, 40, 70])
def test_kernels_alone_match_numpy(fmt, M):
    """q4_k-f16: q4_k's factors as f16 per 32 weights; q4_k's super-blocks need whole 256-weight rows."""
    geo = geometry(fmt.split("-")[0], 64, True, superblock=not fmt.endswith("-f16"))
    nb = 8 if geo.superblock else 7
    K = nb * 32
    rng = np.random.default_rng(M)
    mats = [_weights(geo, nb, rng) for _ in range(2)]
    a = _aligned(_bf16(rng.standard_normal((M + 32, K)).astype(np.float32)))
    ref = np.stack([_f32(a[:M]).astype(np.float64) @ w.T.astype(np.float64) for _, w in mats])
    sets = np.array([[a.ctypes.data] + [x.ctypes.data for m in mats for x in m[0]]], np.int64)
    isa = isa_mod.host_isa(AVX512[0])
    outs = {}
    bbuf = aligned_zeros(nb * 2 * BF16_BLOCK_BYTES, np.uint8)
    for parts in ("dequant", "tiles", "all"):   # the profiling builds run; "tiles" then multiplies dequant's bbuf
        lib = Library(build_ir(geo, parts, emulate=True), isa)
        acc = aligned_zeros(2 * 128 * 16, np.float32)
        assert _SIG(lib.address("prof_run"))(1, nb, M, K * 2, sets.ctypes.data, 1, acc.ctypes.data, 128 * 16 * 4,
                                             bbuf.ctypes.data) > 0
        outs[parts] = acc.reshape(2, 128, 16)[:, :M].copy()
    np.testing.assert_allclose(outs["all"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(outs["tiles"], outs["all"])
    assert not outs["dequant"].any()   # no tile stores


def test_profile_harness_runs_every_case():
    from cpu_experts.amxprof import run
    res = run("q4_k", K=256, slots=(16, 40), threads=2, calls=2, log=lambda *a: None, emulate=True,
              pool_bytes=1 << 20)
    rows = res["results"]
    assert len(rows) == 3 * 2 * 2 * 3   # scenarios x slots x (1, all threads) x parts
    assert all(r["cycles_per_call"] > 0 for r in rows)
