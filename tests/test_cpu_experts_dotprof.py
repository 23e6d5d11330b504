"""dotprof's harness (the vector decode kernel alone): one call of its kernel against numpy in every
layout (q4_k's super-block form and its f16 form), and a small run that reports every scenario and
thread count."""
import dataclasses
import re

import numpy as np
import pytest

from cpu_experts import dotprof
from cpu_experts.experts import _geometry
from cpu_experts.isa import host_isa
from cpu_experts.jit import Library
from cpu_experts.pool import aligned_zeros

from .streams import scale_streams

K = 256
NB = K // 32


def _aligned(a):
    out = aligned_zeros(a.size, a.dtype)
    out[:] = a
    return out


def _one_group(geo, rng):
    """Payload / scale / bias streams of one row group (random codes and factors) and its [R, K] weights."""
    R = geo.group_rows
    pay = rng.integers(0, 64 if geo.fmt == "q6_k" else 256, NB * geo.block_payload_bytes, dtype=np.uint8)
    if geo.nibbles:   # [block][quad 0-3][row][4]: low nibble = weight 4q+j, high = 16+4q+j
        q = pay.reshape(NB, 4, R, 4)
        codes = np.concatenate([q & 0x0F, q >> 4], axis=1)
    else:
        codes = pay.reshape(NB, 8, R, 4)
    codes = codes.transpose(2, 0, 1, 3).reshape(R, K).astype(np.float64)   # [row][k]
    if geo.fmt == "q8_0" and geo.signed:
        codes = codes.astype(np.uint8).view(np.int8).astype(np.float64)
    sc, bias, dv, bv = scale_streams(geo, NB, rng)
    per_weight = lambda v: np.repeat(v.transpose(2, 0, 1).reshape(R, -1), geo.scale_group, axis=1)  # noqa: E731
    w = per_weight(dv) * (codes - geo.offset)
    if geo.bias:
        w += per_weight(bv)
    return pay, sc, bias, w


def _acts(rng):
    """One activation row as the quantizer stores it: codes, scale and sums per block, term."""
    aq = rng.integers(-127, 128, K, dtype=np.int8)
    ad = rng.uniform(0.01, 0.02, NB).astype(np.float32)
    sums = aq.astype(np.int64).reshape(-1, 16).sum(1).astype(np.int32)
    a = aq.astype(np.float64) * np.repeat(ad.astype(np.float64), 32)
    return aq, ad, sums, a


def _call(geo, isa, streams, aq, ad, sums, term):
    f = dotprof._SIG(Library(dotprof.build_ir(geo, isa, 1), isa).address("prof_run"))
    keep = [_aligned(x) for x in streams]
    row = [x.ctypes.data for x in keep]
    sets = np.array([row, row], np.int64)   # the harness prefetches the next set: give it one
    acts = [aq, ad, sums, term]
    ptrs = np.array([x.ctypes.data for x in acts], np.int64)
    out = np.zeros(geo.group_rows, np.float32)
    assert f(sets.ctypes.data, 1, NB, ptrs.ctypes.data, out.ctypes.data) > 0
    return out


@pytest.mark.parametrize("fmt,layout", [("q4_k", "default"), ("q4_k", "f16"), ("q8_0", "default"),
                                        ("q6_k", "default")])
def test_kernel_call_matches_numpy(fmt, layout):
    isa = host_isa()
    geo = _geometry(fmt, isa, None)
    geo = dataclasses.replace(geo, superblock=False) if layout == "f16" else geo
    rng = np.random.default_rng(1)
    pay, sc, bias, w = _one_group(geo, rng)
    aq, ad, sums, a = _acts(rng)
    # the quantizer's per-block term: scale_a*sum(a) for the bias (q4_k), -offset*scale_a*sum(a) otherwise
    blk_sum = aq.astype(np.float64).reshape(NB, 32).sum(1) * ad
    term = (blk_sum if geo.bias else -geo.offset * blk_sum).astype(np.float32)
    ref = w @ a
    got = _call(geo, isa, (pay, sc, bias), aq, ad, sums, term)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_run_reports_every_scenario_and_thread_count():
    res = dotprof.run(fmts=("q4_k",), Ks=(256,), threads=2, pool_bytes=32 << 20, layouts=("default", "f16"),
                      log=lambda s: None)
    rows = res["results"]
    assert {(r["layout"], r["scenario"], r["threads"]) for r in rows} == {
        (lay, s, t) for lay in dotprof.LAYOUTS for s in dotprof.SCENARIOS for t in (1, 2)}
    for r in rows:
        assert r["cycles_per_block"] > 0 and r["gbs_per_core"] > 0 and r["gbs_total"] > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(fmts=("q5_k",)), "unknown weight format 'q5_k'"),
    (dict(fmts=("bf16",)), "not bf16"),
    (dict(Ks=(100,)), "K must be a positive multiple of 32, got [100]"),
    (dict(nt=9), "must be 1-8, got 9"),
    (dict(layouts=("packed",)), "layouts are default and/or f16, got ['packed']"),
])
def test_bad_arguments_get_one_line_errors(kw, msg):
    args = dict(fmts=("q4_k",), Ks=(256,), nt=1, layouts=("default",)) | kw
    with pytest.raises(ValueError, match=re.escape(msg)):
        dotprof.check_args(**args)
