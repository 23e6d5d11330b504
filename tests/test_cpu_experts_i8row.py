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


@pytest.mark.parametrize("fmt,row,row_down", [("q4_0", True, False), ("q4_k", True, True), ("q8_0", False, True),
                                              ("q6_k", True, True)])
def test_i8row_every_expert_emulated_matches_reference(fmt, row, row_down):
    """Every expert on i8row in gate/up, down or both (mode bf16, min_slots 1: the other phase on bf16
    tiles), one- and two-tile chunks and calls split at 64 slots."""
    tiles = Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=1, amx_max_slots=64, amx_mode="bf16",
                  amx_row=row, amx_row_down=row_down)
    for T in (3, 17, 300):
        check(*_run(fmt, AVX512[0], tiles, T, 13), fmt)


@pytest.mark.parametrize("fmt,hardware,ready", [("q4_k", False, False), ("q4_0", False, True)]
                         + [(f, True, r) for f in ("q8_0", "q4_0", "q4_k") for r in (False, True) if HOST_AMX])
def test_i8row_in_the_mixed_bands_matches_reference(fmt, hardware, ready):
    """The default bands with i8row in both phases above amx_bf16_min_slots: experts with 40, 35, 28 slots
    (i8row; the last gate/up task of each quantizes its h rows), 12 (int8 tiles), 5 (vector), none;
    down tasks after barrier 1 or waiting per expert (expert_ready, a tail of 16-row tasks); emulated,
    and with real tiles on an AMX host."""
    extra = dict(expert_ready=True, tail_rows=64, tail_max_tokens=64) if ready else {}
    tiles = Tiles(tokens=8, amx=True, amx_emulate=not hardware, amx_row=True, amx_row_down=True, **extra)
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
    kw = dict(tokens=8, amx=True, amx_min_slots=1, amx_mode="bf16", amx_row=True, amx_row_down=True)
    hw, ref = _run(fmt, "avx512vnni", Tiles(**kw), 300, 5)
    emu, _ = _run(fmt, "avx512vnni", Tiles(amx_emulate=True, **kw), 300, 5)
    check(hw, ref, fmt)
    np.testing.assert_allclose(hw, emu, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("hardware", [False] + ([True] if HOST_AMX else []))
def test_i8row_q4_k_with_q6_k_down_matches_reference(hardware):
    """llama.cpp's Q4_K_M layout (q4_k gate/up, q6_k down) with the defaults' AMX choice: i8row in both
    phases from 8 slots (q6_k, a scale per 16 weights, has no other AMX kernel)."""
    from tests.test_cpu_experts_mixed import mixed, run_and_check
    tiles = Tiles(tokens=8, amx=True, amx_emulate=not hardware, amx_row=True, amx_row_down=True, amx_bf16_min_slots=8)
    ex, dq = mixed("q4_k", "q6_k", "avx512vnni" if hardware else AVX512[0], 2, tiles=tiles)
    run_and_check(ex, dq, 19, sizes=(3, 17, 300))


def test_i8row_refused_where_it_cannot_run():
    """The i8row kernel takes K in tiles of 64 and sits beside the bf16 kernel (modes bf16, mixed)."""
    from cpu_experts.experts import CPUExperts
    rng = np.random.default_rng(3)
    inter = 96   # h rows of 96: not whole 64-wide tiles
    gate, up = (rng.standard_normal((2, inter, H)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((2, H, inter)).astype(np.float32)
    for bad, what in ((dict(amx_mode="int8", amx_row=True), "amx_row "), (dict(amx_row_down=True), "inter")):
        with pytest.raises(ValueError, match=what):
            CPUExperts.from_tensors(gate, up, down, fmt="q4_0", threads=1, isa=AVX512[0], numa="none", amx=True,
                                    tiles=Tiles(amx=True, amx_emulate=True, **bad))


def test_int8_rows_choice_by_format(monkeypatch):
    """$HMOE_INT8_ROWS: auto = 4-bit and q6_k on i8row, q8_0 exact; on = q8_0 too; off = none (and
    q6_k, which has no exact AMX kernel, then takes no AMX at all); a bad value names the variable."""
    from cpu_experts.experts import amx_defaults, default_tiles, int8_rows_choice
    from cpu_experts.isa import cross_isa
    from cpu_experts.layout import geometry
    geo = {f: geometry(f, 64, True) for f in ("q4_0", "q4_k", "q6_k", "q8_0")}

    def rows(choice, f, down=None):
        d = amx_defaults(geo[f], geo[down or f], choice)
        return d["amx_row"], d["amx_row_down"], d["amx_bf16_min_slots"]
    assert rows("auto", "q4_k") == rows("auto", "q6_k") == (True, True, 8)
    assert rows("auto", "q4_k", "q6_k") == (True, True, 8)
    assert rows("auto", "q8_0") == (False, False, 24) and rows("on", "q8_0") == (True, True, 8)
    assert rows("auto", "q4_0", "q8_0") == (True, False, 24)
    assert rows("off", "q4_0") == (False, False, 24)
    amx_host = cross_isa("avx512vnni", "sapphirerapids", amx=True)
    monkeypatch.setenv("HMOE_INT8_ROWS", "off")
    assert not default_tiles(amx_host, geo["q6_k"]).amx
    monkeypatch.setenv("HMOE_INT8_ROWS", "fast")
    with pytest.raises(ValueError, match="HMOE_INT8_ROWS must be one of auto, on, off"):
        int8_rows_choice()


def test_i8row_kept_row_bounds_give_the_computed_results():
    """The row bounds the kernel keeps after its first call for a row group (Tiles.amx_row_bounds) give,
    on that call and later ones, exactly the results of computing them on every call."""
    from dataclasses import replace
    tiles = Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=1, amx_max_slots=64, amx_mode="bf16",
                  amx_row=True, amx_row_down=True)
    kept, dq = experts("q4_k", AVX512[0], 2, tiles=tiles)
    computed = kept.retiled(replace(tiles, amx_row_bounds=False))
    rng = np.random.default_rng(29)
    for T in (100, 40):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = routing(rng, T)
        w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
        got = kept.forward(x, ids, w)
        np.testing.assert_array_equal(got, computed.forward(x, ids, w))
        check(got, moe_reference(x, ids, w, *dq), "q4_k")
