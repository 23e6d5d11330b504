"""Generated code: the intended instructions for each ISA, compiled for CPUs this box may not have.

Cross-compiles run in a subprocess: an instruction LLVM cannot select for a target aborts the
whole process, and must not take pytest with it.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from cpu_experts import isa as isa_mod
from cpu_experts.jit import cache_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assembly(fmt: str, isa: str, cpu: str, tokens: int = 2, amx: bool = False, amx_mode: str = "int8",
             amx_row: bool = False) -> str:
    code = textwrap.dedent(f"""
        from cpu_experts.codegen.moe import Tiles, build_ir
        from cpu_experts.isa import cross_isa
        from cpu_experts.jit import emit_assembly
        from cpu_experts.layout import geometry
        isa = cross_isa({isa!r}, {cpu!r}, amx={amx!r})
        tiles = Tiles(tokens={tokens}, amx={amx!r}, amx_mode={amx_mode!r}, amx_row={amx_row!r})
        print(emit_assembly(build_ir(geometry({fmt!r}, isa.vector_bytes, isa.vnni), isa, tiles), isa))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_sapphirerapids_avx512_vnni_uses_vpdpbusd_on_zmm(fmt):
    asm = assembly(fmt, "avx512vnni", "sapphirerapids")
    assert "vpdpbusd" in asm and "zmm" in asm
    assert "vpmaddubsw" not in asm


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_sapphirerapids_amx_tiles(fmt):
    asm = assembly(fmt, "avx512vnni", "sapphirerapids", tokens=8, amx=True)
    for op in ("ldtilecfg", "tileloadd", "tdpbsud", "tilestored", "tilerelease", "vpdpbusd"):
        assert op in asm, op


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_sapphirerapids_amx_bf16_tiles(fmt):
    """AMX-BF16 mode: tdpbf16ps accumulates over K in the tiles; no per-block tile store in its loop."""
    asm = assembly(fmt, "avx512vnni", "sapphirerapids", tokens=8, amx=True, amx_mode="bf16")
    for op in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease", "vpdpbusd"):
        assert op in asm, op
    assert "tdpbsud" not in asm


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_sapphirerapids_amx_i8row_tiles(fmt):
    """i8row (Tiles.amx_row, "mixed"): tdpbssd for gate/up of large experts, tdpbsud below them, tdpbf16ps
    for down; the 16-bit requantization stays in zmm registers."""
    asm = assembly(fmt, "avx512vnni", "sapphirerapids", tokens=8, amx=True, amx_mode="mixed", amx_row=True)
    for op in ("tdpbssd", "tdpbsud", "tdpbf16ps", "vpmullw"):
        assert op in asm, op


def test_sapphirerapids_avx_vnni_256():
    asm = assembly("q4_0", "avxvnni", "sapphirerapids")
    lines = [l for l in asm.splitlines() if "vpdpbusd" in l]
    assert lines and all("zmm" not in l for l in lines)


def test_haswell_avx2_has_no_avx512():
    asm = assembly("q6_k", "avx2", "haswell")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    assert "zmm" not in asm and "vpdpbusd" not in asm


def test_skylake_avx512bw_without_vnni():
    asm = assembly("q8_0", "avx512", "skylake-avx512")
    assert "vpmaddubsw" in asm and "zmm" in asm and "vpdpbusd" not in asm


def test_bf16_fma():
    asm = assembly("bf16", "avx512vnni", "sapphirerapids")
    assert "vfmadd" in asm and "zmm" in asm


def test_isa_selection_never_picks_missing_features():
    assert isa_mod.supported("+avx2,+fma,+f16c") == ["avx2"]
    assert isa_mod.supported("+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl") == ["avx512", "avx2"]
    assert isa_mod.supported("+avx,+sse4.2") == []
    with pytest.raises(ValueError, match="needs CPU features avx512vnni"):
        isa_mod.make_isa("avx512vnni", "skylake-avx512", "+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl")


def test_cache_key_depends_on_cpu_features_and_ir():
    a = isa_mod.make_isa("avx2", "haswell", "+avx2,+fma,+f16c")
    b = isa_mod.make_isa("avx2", "znver3", "+avx2,+fma,+f16c")
    assert cache_key("x", a) != cache_key("x", b) != cache_key("y", b)
    assert cache_key("x", a) == cache_key("x", a)


def test_vector_exp_and_silu_match_numpy():
    """vmath.exp (Cephes expf in IR) over the range SiLU sees, run on this host."""
    import ctypes

    import numpy as np
    from llvmlite import ir

    from cpu_experts.codegen import vmath
    from cpu_experts.codegen.irutil import F32, PTR, VOID, define, load, store, vec
    from cpu_experts.isa import host_isa
    from cpu_experts.jit import Library
    m = ir.Module(name="vmath_test")
    for name, f in (("v_exp", vmath.exp), ("v_silu", vmath.silu)):
        fn, b = define(m, name, VOID, [PTR, PTR])
        store(b, f(b, load(b, fn.args[0], vec(F32, 16), align=4)), fn.args[1], align=4)
        b.ret_void()
    lib = Library(str(m), host_isa("avx2"))
    x = np.linspace(-100, 100, 16 * 400).astype(np.float32)
    for name, ref in (("v_exp", lambda v: np.exp(np.clip(v, np.float32(-87.3), np.float32(88.3)).astype(np.float64))),
                      ("v_silu", lambda v: v / (1 + np.exp(-v.astype(np.float64))))):
        call = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(lib.address(name))
        out = np.empty_like(x)
        for i in range(0, x.size, 16):
            call(x[i:].ctypes.data, out[i:].ctypes.data)
        r = ref(x)
        assert np.all(np.abs(out - r) <= 4e-7 * np.abs(r) + 1e-30), name
