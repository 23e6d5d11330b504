"""Dot-product microkernels: one row group x NT activation rows -> out[n][row] floats.

Quantized formats (layout.py: R rows interleaved by 4-byte quads): for each 32-weight block and
each token, 8 integer dot steps advance all R rows at once,
    acc_i[r] += sum_j w[r, 4q+j] * a[4q+j]          (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2)
with the activation quad broadcast to every lane; then, per block, with the activation "term" the
quantizer stored (term = -offset*scale_a*sum(a), or scale_a*sum(a) for q4_k's bias):
    offset formats: acc[r] += (float(acc_i[r]) * scale_a + term) * scale_w[r]
    q4_k:           acc[r] += float(acc_i[r]) * scale_a * scale_w[r] + bias_w[r] * term
so the float work is one convert and two FMAs per 32 weights per token for R rows. q4_k's super-block
form (layout.py) keeps two sums per token over a super-block, S += float(acc_i) * scale_a * sc[r] and
M += m[r] * term (sc, m its bytes), and adds d[r] * S + (-dmin[r]) * M once per 256 weights. q6_k (a
scale per 16 weights) removes its offset in int32 per half block instead: acc_i - 32 * sum16(a).
bf16: rows in groups of 4, weights widened to f32 (shift left 16) and FMA'd with f32 activations.

Prefetch: `prefetch_all` touches every line of the streams (payload, scales, bias) `prefetch_bytes`
ahead; otherwise one line per block of payload and of scales (the hardware streamer does the rest).
"""
from llvmlite import ir

from ..isa import Isa
from ..layout import BLOCK, SUPER, Geometry
from .irutil import (F32, I8, I16, I32, I64, PTR, VOID, c, define, fma, for_range, gep, hsum, i64,
                     intrinsic, load, local, prefetch, splat, store, vec)
from .scales import block_factors, scale_pos, superblock_heads


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


def emit_quant_dot(module, geo: Geometry, isa: Isa, nt: int, prefetch_bytes: int, prefetch_all: bool = False,
                   locality: int = 3):
    """void dot_q_n{nt}(pay, scale, bias, nblocks, aq[nt], ad[nt], asum[nt], aterm[nt], out[nt][R]).
    aq: int8 activations, ad: f32 scale per 32, asum: i32 sum of codes per 16, aterm: f32 per 32."""
    vb, R = geo.vector_bytes, geo.group_rows
    assert R == vb // 4
    fn, b = define(module, quant_dot_name(nt), VOID, [PTR, PTR, PTR, I64] + [PTR] * (4 * nt) + [PTR],
                   internal=True)
    pay, sc, bias, nblocks = fn.args[:4]
    aq, ad, asum = fn.args[4:4 + nt], fn.args[4 + nt:4 + 2 * nt], fn.args[4 + 2 * nt:4 + 3 * nt]
    aterm = fn.args[4 + 3 * nt:4 + 4 * nt]
    out = fn.args[4 + 4 * nt]
    use_term = geo.scales_per_block == 1   # the quantizer's term is per 32
    vf = vec(F32, R)
    spb = geo.scales_per_block
    quads_per_group = 8 // spb
    acc = [local(b, vf, splat(F32, R, 0.0)) for _ in range(nt)]
    # q4_k's super-block form: the block terms go to two sums per token (times the bytes sc and m),
    # which take the super-block's d and -dmin once per 8 blocks: a block's float work is the f16 form's
    sums = [[local(b, vf) for _ in range(nt)] for _ in range(2)] if geo.superblock else None
    bpb = geo.block_payload_bytes

    def block(blk, dw, bw):
        pbase = b.mul(blk, i64(bpb))
        for line in range(0, bpb if prefetch_all else 1, 64):
            prefetch(b, gep(b, pay, b.add(pbase, i64(prefetch_bytes + line))), locality)
        nvec = bpb // vb
        raw = [load(b, pay, vec(I8, vb), b.add(pbase, i64(v * vb)), align=64) for v in range(nvec)]
        if geo.nibbles:   # quad q < 4: low nibbles of vector q; q >= 4: high nibbles of vector q-4
            wq = [b.and_(r, splat(I8, vb, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, vb, 4)) for r in raw]
        else:
            wq = raw
        uq = [b.select(b.icmp_signed("<", w, splat(I8, vb, 0)), b.sub(splat(I8, vb, 0), w), w)
              for w in wq] if geo.signed else wq
        spos = scale_pos(b, geo, blk)
        sc_ahead = prefetch_bytes // 8       # the scale streams advance ~1/8 (f16) to 1/13 (q4_k) of the payload
        sc_every = int(64 // geo.scale_bytes_per_block) or 1   # blocks per line of scales
        pf_sc = b.icmp_signed("==", b.urem(blk, i64(sc_every)), i64(0)) if prefetch_all and sc_every > 1 else None
        streams = [sc] + ([bias] if geo.bias and prefetch_all else [])
        if pf_sc is None:
            for st in streams:
                prefetch(b, gep(b, st, b.add(spos, i64(sc_ahead))), locality)
        else:
            with b.if_then(pf_sc):
                for st in streams:
                    prefetch(b, gep(b, st, b.add(spos, i64(sc_ahead))), locality)
        for n in range(nt):
            da = _splat_scalar(b, load(b, ad[n], F32, blk, align=4), R)
            if use_term:
                term = _splat_scalar(b, load(b, aterm[n], F32, blk, align=4), R)
            else:
                sums16 = [load(b, asum[n], I32, b.add(b.mul(blk, i64(2)), i64(h)), align=4) for h in range(2)]
            for s in range(spb):
                acc_i = splat(I32, R, 0)
                for q in range(s * quads_per_group, (s + 1) * quads_per_group):
                    a4 = load(b, aq[n], I32, b.add(b.mul(blk, i64(BLOCK // 4)), i64(q)), align=1)
                    a = b.bitcast(_splat_scalar(b, a4, R), vec(I8, vb))
                    acc_i = _quad_dot(b, isa, geo, acc_i, wq[q], uq[q], a)
                f = b.sitofp(acc_i, vf)
                if sums:
                    scaled, shifted = sums[0][n], sums[1][n]
                    b.store(fma(b, b.fmul(f, da), dw[s], b.load(scaled, typ=vf)), scaled)
                    b.store(fma(b, bw[s], term, b.load(shifted, typ=vf)), shifted)
                    continue
                prev = b.load(acc[n], typ=vf)
                if use_term and geo.bias:
                    new = fma(b, bw[s], term, fma(b, b.fmul(f, da), dw[s], prev))
                elif use_term and geo.offset:
                    new = fma(b, fma(b, f, da, term), dw[s], prev)
                else:
                    assert not geo.bias
                    if geo.offset:
                        f = b.sitofp(b.sub(acc_i, _splat_scalar(b, b.mul(sums16[s], c(I32, geo.offset)), R)), vf)
                    new = fma(b, f, b.fmul(dw[s], da), prev)
                b.store(new, acc[n])

    if sums:
        one = splat(F32, R, 1.0)
        with for_range(b, 0, nblocks, step=SUPER, name="sblk") as sb:
            for part in sums:
                for slot in part:
                    b.store(splat(F32, R, 0.0), slot)
            with for_range(b, sb, b.add(sb, i64(SUPER)), name="blk") as blk:
                dw, bw = block_factors(b, geo, sc, bias, blk, heads=(one, one))   # the bytes alone
                block(blk, [dw], [bw])
            d, ndmin = superblock_heads(b, geo, sc, bias, sb)
            for n in range(nt):
                prev = b.load(acc[n], typ=vf)
                b.store(fma(b, d, b.load(sums[0][n], typ=vf), fma(b, ndmin, b.load(sums[1][n], typ=vf), prev)), acc[n])
    else:
        with for_range(b, 0, nblocks, name="blk") as blk:
            dw, bw = zip(*(block_factors(b, geo, sc, bias, blk, s) for s in range(spb)))
            block(blk, dw, bw)
    for n in range(nt):
        store(b, b.load(acc[n], typ=vf), out, n * R, align=4)
    b.ret_void()
    return fn


def bf16_dot_name(nt):
    return f"dot_bf16_n{nt}"


def emit_bf16_dot(module, geo: Geometry, isa: Isa, nt: int, prefetch_bytes: int, prefetch_all: bool = False,
                  locality: int = 3):
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
            if g == 0 or prefetch_all:  # a chunk row is VB bytes: all lines = every row of the chunk
                prefetch(b, gep(b, pay, b.add(off, i64(prefetch_bytes))), locality)
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
