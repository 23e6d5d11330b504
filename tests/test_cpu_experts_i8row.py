"""The i8row AMX kernel (codegen/amx_i8row.py): gate/up of experts with many slots as int8 tiles,
each weight row requantized on the fly to one scale over K, activations one scale per token.

Tolerance: on top of the int8 activations of the other paths (test_cpu_experts_moe.py), each token's
x row is quantized with one scale (its max over H, not over each 32-block), and each weight to an
int8 step of its row's largest |w| / 127 (at most 0.56 of a step off). With these Gaussian rows that
keeps errors within the module's check (4% max, 1.5% mean of max|ref|; measured 1.2-1.5% / 0.16-0.2%).
"""
import numpy as np
import pytest

from cpu_experts.codegen.moe import Tiles
from cpu_experts.reference import moe_reference

from tests.test_cpu_experts_moe import AVX512, HOST_AMX, H, K, check, experts, routing

pytestmark = pytest.mark.skipif(not AVX512, reason="the AMX kernels need 16-row groups (AVX-512)")


def _run(fmt, isa, tiles, T, seed):
    ex, dq = experts(fmt, isa, 2, tiles=tiles)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = routing(rng, T)
    w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
    return ex.forward(x, ids, w), moe_reference(x, ids, w, *dq)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q8_0"])
def test_i8row_every_expert_emulated_matches_reference(fmt):
    """Every expert's gate/up on i8row (mode bf16, min_slots 1: down on bf16 tiles), one- and two-tile
    chunks and calls split at 64 slots."""
    tiles = Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=1, amx_max_slots=64, amx_mode="bf16",
                  amx_row=True)
    for T in (3, 17, 300):
        check(*_run(fmt, AVX512[0], tiles, T, 13), fmt)


@pytest.mark.parametrize("fmt,hardware", [("q4_k", False), ("q4_0", False)]
                         + [(f, True) for f in ("q8_0", "q4_0", "q4_k") if HOST_AMX])
def test_i8row_in_the_mixed_bands_matches_reference(fmt, hardware):
    """The default bands with i8row above amx_bf16_min_slots: experts with 40, 35, 28 slots (i8row), 12
    (int8 tiles), 5 (vector), none; emulated, and with real tiles on an AMX host."""
    tiles = Tiles(tokens=8, amx=True, amx_emulate=not hardware, amx_row=True)
    ex, dq = experts(fmt, "avx512vnni" if hardware else AVX512[0], 2, tiles=tiles)
    T = 40
    ids = np.array([[0, 1 if t < 12 else 3, (2 if t < 5 else 3) if t < 12 else 4] for t in range(T)])
    rng = np.random.default_rng(17)
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
    check(ex.forward(x, ids, w), moe_reference(x, ids, w, *dq), fmt)


@pytest.mark.skipif(not HOST_AMX, reason="needs AMX (run on the GPU machine)")
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_i8row_hardware_matches_emulation(fmt):
    """Real tdpbssd tiles give the emulated kernel's integer sums: outputs equal to float rounding."""
    kw = dict(tokens=8, amx=True, amx_min_slots=1, amx_mode="bf16", amx_row=True)
    hw, ref = _run(fmt, "avx512vnni", Tiles(**kw), 300, 5)
    emu, _ = _run(fmt, "avx512vnni", Tiles(amx_emulate=True, **kw), 300, 5)
    check(hw, ref, fmt)
    np.testing.assert_allclose(hw, emu, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_i8row_refused_where_it_cannot_run():
    from cpu_experts.experts import CPUExperts
    from tests.test_cpu_experts_moe import blocks
    q, _ = blocks("q4_0")
    with pytest.raises(ValueError, match="amx_row"):
        CPUExperts.from_blocks(*q, fmt="q4_0", hidden=H, inter=H, threads=1, isa=AVX512[0], numa="none", amx=True,
                               tiles=Tiles(amx=True, amx_emulate=True, amx_mode="int8", amx_row=True))
