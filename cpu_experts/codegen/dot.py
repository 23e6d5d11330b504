"""Dot-product microkernels: one row group x NT activation rows -> out[n][row] floats.

Quantized formats (layout.py: R rows interleaved by 4-byte quads): for each 32-weight block and
each token, 8 integer dot steps advance all R rows at once,
    acc_i[r] += sum_j w[r, 4q+j] * a[4q+j]          (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2)
with the activation quad broadcast to every lane; then, per scale group,
    acc[r] += float(acc_i[r] - offset * sum(a)) * (scale_w[r] * scale_a)   (+ bias_w[r] * scale_a * sum(a))
so the float work is one convert and two FMAs per 32 (or 16) weights per token for R rows.
bf16: rows in groups of 4, weights widened to f32 (shift left 16) and FMA'd with f32 activations.
"""
from llvmlite import ir

from ..isa import Isa
from ..layout import BLOCK, Geometry
from .irutil import (F16, F32, I8, I16, I32, I64, PTR, VOID, c, define, fma, for_range, gep, hsum, i64,
                     intrinsic, load, local, prefetch, splat, store, vec)

def _to_f32(b, halves):
    return b.fpext(halves, vec(F32, halves.type.count))


def _splat_scalar(b, x, n):
    v = b.insert_element(ir.Constant(vec(x.type, 1), ir.Undefined), x, c(I32, 0))
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def _quad_dot(b, isa: Isa, geo: Geometry, acc, w, u, a):
    """acc <L x i32> += per-lane 4-byte dot of weights w (u = |w| when signed) and activations a."""
    vb = isa.vector_bytes
    lanes = vb // 4
    vi32, vi8, vi16 = vec(I32, lanes), vec(I8, vb), vec(I16, vb // 2)
    if isa.vnni:
        assert not geo.signed
        name = "llvm.x86.avx512.vpdpbusd.512" if vb == 64 else "llvm.x86.avx512.vpdpbusd.256"
        fn = intrinsic(b.module, name, vi32, [vi32, vi32, vi32])
        return b.call(fn, [acc, b.bitcast(w, vi32), b.bitcast(a, vi32)])
    if geo.signed:  # |w| * (a * sign(w)): vpmaddubsw needs an unsigned left operand
        if vb == 32:
            a = b.call(intrinsic(b.module, "llvm.x86.avx2.psign.b", vi8, [vi8, vi8]), [a, w])
        else:
            a = b.select(b.icmp_signed("<", w, splat(I8, vb, 0)), b.sub(splat(I8, vb, 0), a), a)
        w = u
    if vb == 64:
        ubsw = intrinsic(b.module, "llvm.x86.avx512.pmaddubs.w.512", vi16, [vi8, vi8])
        wd = intrinsic(b.module, "llvm.x86.avx512.pmaddw.d.512", vi32, [vi16, vi16])
    else:
        ubsw = intrinsic(b.module, "llvm.x86.avx2.pmadd.ub.sw", vi16, [vi8, vi8])
        wd = intrinsic(b.module, "llvm.x86.avx2.pmadd.wd", vi32, [vi16, vi16])
    return b.add(acc, b.call(wd, [b.call(ubsw, [w, a]), splat(I16, vb // 2, 1)]))


def quant_dot_name(nt):
    return f"dot_q_n{nt}"


def emit_quant_dot(module, geo: Geometry, isa: Isa, nt: int, prefetch_bytes: int):
    """void dot_q_n{nt}(pay, scale, bias, nblocks, aq[nt], ad[nt], asum[nt], out[nt][R]).
    aq: int8 activations, ad: f32 scale per 32, asum: i32 sum of codes per 16."""
    vb, R = geo.vector_bytes, geo.group_rows
    assert R == vb // 4
    fn, b = define(module, quant_dot_name(nt), VOID, [PTR, PTR, PTR, I64] + [PTR] * (3 * nt) + [PTR],
                   internal=True)
    pay, sc, bias, nblocks = fn.args[:4]
    aq, ad, asum = fn.args[4:4 + nt], fn.args[4 + nt:4 + 2 * nt], fn.args[4 + 2 * nt:4 + 3 * nt]
    out = fn.args[4 + 3 * nt]
    vf, vi32 = vec(F32, R), vec(I32, R)
    spb = geo.scales_per_block
    quads_per_group = 8 // spb
    acc = [local(b, vf, splat(F32, R, 0.0)) for _ in range(nt)]
    bpb = geo.block_payload_bytes
    with for_range(b, 0, nblocks, name="blk") as blk:
        pbase = b.mul(blk, i64(bpb))
        prefetch(b, gep(b, pay, b.add(pbase, i64(prefetch_bytes))))
        nvec = bpb // vb
        raw = [load(b, pay, vec(I8, vb), b.add(pbase, i64(v * vb)), align=64) for v in range(nvec)]
        if geo.nibbles:   # quad q < 4: low nibbles of vector q; q >= 4: high nibbles of vector q-4
            wq = [b.and_(r, splat(I8, vb, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, vb, 4)) for r in raw]
        else:
            wq = raw
        uq = [b.select(b.icmp_signed("<", w, splat(I8, vb, 0)), b.sub(splat(I8, vb, 0), w), w)
              for w in wq] if geo.signed else wq
        sbase = b.mul(blk, i64(spb * R))
        prefetch(b, gep(b, sc, b.add(b.mul(sbase, i64(2)), i64(prefetch_bytes // 8))))
        dw = [_to_f32(b, load(b, sc, vec(F16, R), b.add(sbase, i64(s * R)), align=2)) for s in range(spb)]
        bw = [_to_f32(b, load(b, bias, vec(F16, R), b.add(sbase, i64(s * R)), align=2))
              for s in range(spb)] if geo.bias else None
        for n in range(nt):
            da = load(b, ad[n], F32, blk, align=4)
            sums16 = [load(b, asum[n], I32, b.add(b.mul(blk, i64(2)), i64(h)), align=4) for h in range(2)]
            for s in range(spb):
                acc_i = splat(I32, R, 0)
                for q in range(s * quads_per_group, (s + 1) * quads_per_group):
                    a4 = load(b, aq[n], I32, b.add(b.mul(blk, i64(BLOCK // 4)), i64(q)), align=1)
                    a = b.bitcast(_splat_scalar(b, a4, R), vec(I8, vb))
                    acc_i = _quad_dot(b, isa, geo, acc_i, wq[q], uq[q], a)
                sa = sums16[s] if spb == 2 else b.add(sums16[0], sums16[1])
                if geo.offset:
                    acc_i = b.sub(acc_i, _splat_scalar(b, b.mul(sa, c(I32, geo.offset)), R))
                prev = b.load(acc[n], typ=vf)
                new = fma(b, b.sitofp(acc_i, vf), b.fmul(dw[s], _splat_scalar(b, da, R)), prev)
                if geo.bias:
                    new = fma(b, bw[s], _splat_scalar(b, b.fmul(da, b.sitofp(sa, F32)), R), new)
                b.store(new, acc[n])
    for n in range(nt):
        store(b, b.load(acc[n], typ=vf), out, n * R, align=4)
    b.ret_void()
    return fn


def bf16_dot_name(nt):
    return f"dot_bf16_n{nt}"


def emit_bf16_dot(module, geo: Geometry, isa: Isa, nt: int, prefetch_bytes: int):
    """void dot_bf16_n{nt}(pay, nchunks, a[nt] (f32 rows), out[nt][4]); chunk = VB/2 weights."""
    G, vb = geo.group_rows, geo.vector_bytes
    lanes = vb // 4
    fn, b = define(module, bf16_dot_name(nt), VOID, [PTR, I64] + [PTR] * nt + [PTR], internal=True)
    pay, nchunks = fn.args[:2]
    act, out = fn.args[2:2 + nt], fn.args[2 + nt]
    vf = vec(F32, lanes)
    acc = [[local(b, vf, splat(F32, lanes, 0.0)) for _ in range(nt)] for _ in range(G)]
    ce = geo.k_align  # weights per chunk = 2 * lanes
    with for_range(b, 0, nchunks, name="chunk") as ch:
        base = b.mul(ch, i64(G))
        e0 = b.mul(ch, i64(ce))
        xs = [[load(b, act[n], vf, b.add(e0, i64(h * lanes)), align=4) for h in range(2)] for n in range(nt)]
        for g in range(G):
            off = b.mul(b.add(base, i64(g)), i64(vb))
            if g == 0:
                prefetch(b, gep(b, pay, b.add(off, i64(prefetch_bytes))))
            raw = b.load(gep(b, pay, off), typ=vec(I16, ce), align=2)  # off is in bytes
            for h in range(2):
                half = b.shuffle_vector(raw, ir.Constant(raw.type, ir.Undefined),
                                        ir.Constant(vec(I32, lanes), list(range(h * lanes, (h + 1) * lanes))))
                wf = b.bitcast(b.shl(b.zext(half, vec(I32, lanes)), splat(I32, lanes, 16)), vf)
                for n in range(nt):
                    b.store(fma(b, wf, xs[n][h], b.load(acc[g][n], typ=vf)), acc[g][n])
    for g in range(G):
        for n in range(nt):
            store(b, hsum(b, b.load(acc[g][n], typ=vf)), out, n * G + g, align=4)
    b.ret_void()
    return fn
