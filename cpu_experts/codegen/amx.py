"""AMX int8 microkernel: 16 activation rows x R=16 weight rows (of one or two matrices) per call.

The row-interleaved-quad weight layout (layout.py) is already AMX's "VNNI" B layout: the 8 quads
of one 32-weight block x 16 rows are 8 tile rows of 64 bytes. Per block and matrix:
    C[16 tok x 16 rows] = A[16 tok x 32 int8] . B[32 x 16 rows u8]     (tdpbsud: signed x unsigned)
then C goes through memory into a float epilogue, one vector per token:
    offset formats: acc += (float(C) * scale_a + term_a) * scale_w     term_a = -offset * scale_a * sum(a)
    q4_k:           acc += float(C) * scale_a * scale_w + bias_w * term_a,   term_a = scale_a * sum(a)
(term_a is computed once per activation block by the quantizer). With two matrices (gate and up)
the activation tile is loaded once per block for both. 4-bit payloads are unpacked to bytes into a
512-byte buffer first. Linux must grant the tile state first (experts.enable_amx).
"""
from llvmlite import ir

from ..layout import BLOCK, Geometry
from .irutil import (F16, F32, I8, I16, I32, I64, PTR, VOID, c, define, fma, for_range, gep, i64, intrinsic,
                     load, local, prefetch, splat, store, vec)

TOKENS = 16
T_A = 1
T_C = (0, 3)  # accumulator tile per matrix
T_B = (2, 4)  # weight tile per matrix


def _tile_config(b, nmat):
    """64-byte palette-1 config: C 16x64B, A 16x32B, B 8x64B."""
    cfg = local(b, ir.ArrayType(I8, 64), name="tilecfg")
    cfg.align = 64
    b.store(ir.Constant(ir.ArrayType(I8, 64), [0] * 64), cfg)
    store(b, c(I8, 1), gep(b, cfg, 0))
    shapes = {T_A: (16, BLOCK)}
    for mat in range(nmat):
        shapes[T_C[mat]] = (16, 64)
        shapes[T_B[mat]] = (BLOCK // 4, 64)
    for tile, (rows, colsb) in shapes.items():
        store(b, c(I16, colsb), gep(b, cfg, 16 + 2 * tile))
        store(b, c(I8, rows), gep(b, cfg, 48 + tile))
    return cfg


def _splat(b, x, n):
    v = b.insert_element(ir.Constant(vec(x.type, 1), ir.Undefined), x, c(I32, 0))
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def amx_dot_name(nmat):
    return f"dot_amx{nmat}"


def emit_amx_dot(module, geo: Geometry, prefetch_bytes: int, nmat: int):
    """void dot_amx{nmat}(nblocks, A i8[16][lda], lda, D f32[16][ldd] (scale_a), T f32[16][ldd] (term_a), ldd,
    {pay, scale, bias, out f32[16][16]} x nmat). Rows of A beyond the valid tokens must be readable;
    their outputs are garbage and ignored by the caller."""
    assert geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed
    R = 16
    args = [I64, PTR, I64, PTR, PTR, I64] + [PTR] * (4 * nmat)
    fn, b = define(module, amx_dot_name(nmat), VOID, args, internal=True)
    nblocks, A, lda, D, Tm, ldd = fn.args[:6]
    mats = [fn.args[6 + 4 * i:10 + 4 * i] for i in range(nmat)]
    m = module
    ldcfg = intrinsic(m, "llvm.x86.ldtilecfg", VOID, [PTR])
    release = intrinsic(m, "llvm.x86.tilerelease", VOID, [])
    zero = intrinsic(m, "llvm.x86.tilezero", VOID, [I8])
    tload = intrinsic(m, "llvm.x86.tileloadd64", VOID, [I8, PTR, I64])
    tstore = intrinsic(m, "llvm.x86.tilestored64", VOID, [I8, PTR, I64])
    dp = intrinsic(m, "llvm.x86.tdpbsud", VOID, [I8, I8, I8])
    vf, vi = vec(F32, R), vec(I32, R)
    cfg = _tile_config(b, nmat)
    cbuf = [local(b, ir.ArrayType(I32, TOKENS * R), name=f"cbuf{i}") for i in range(nmat)]
    bbuf = [local(b, ir.ArrayType(I8, 512), name=f"bbuf{i}") for i in range(nmat)] if geo.nibbles else None
    for slot in cbuf + (bbuf or []):
        slot.align = 64
    acc = [[local(b, vf, splat(F32, R, 0.0)) for _ in range(TOKENS)] for _ in range(nmat)]
    b.call(ldcfg, [cfg])
    bpb = geo.block_payload_bytes
    with for_range(b, 0, nblocks, name="blk") as blk:
        b.call(tload, [c(I8, T_A), gep(b, A, b.mul(blk, i64(BLOCK))), lda])
        for i, (pay, sc, bias, out) in enumerate(mats):
            pb = gep(b, pay, b.mul(blk, i64(bpb)))
            prefetch(b, gep(b, pb, i64(prefetch_bytes)))
            if geo.nibbles:
                raw = [load(b, pb, vec(I8, 64), v * 64, align=64) for v in range(4)]
                rows = [b.and_(r, splat(I8, 64, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, 64, 4)) for r in raw]
                for q, r in enumerate(rows):
                    store(b, r, bbuf[i], q * 64, align=64)
                b.call(tload, [c(I8, T_B[i]), bbuf[i], i64(64)])
            else:
                b.call(tload, [c(I8, T_B[i]), pb, i64(64)])
            b.call(zero, [c(I8, T_C[i])])
            b.call(dp, [c(I8, T_C[i]), c(I8, T_A), c(I8, T_B[i])])
            b.call(tstore, [c(I8, T_C[i]), cbuf[i], i64(4 * R)])
        for i, (pay, sc, bias, out) in enumerate(mats):
            sidx = b.mul(blk, i64(R))
            dw = b.fpext(load(b, sc, vec(F16, R), sidx, align=2), vf)
            bw = b.fpext(load(b, bias, vec(F16, R), sidx, align=2), vf) if geo.bias else None
            for n in range(TOKENS):
                f = b.sitofp(load(b, cbuf[i], vi, n * R, align=64), vf)
                at = b.add(b.mul(i64(n), ldd), blk)
                da = _splat(b, load(b, D, F32, at, align=4), R)
                term = _splat(b, load(b, Tm, F32, at, align=4), R)
                prev = b.load(acc[i][n], typ=vf)
                if geo.bias:
                    new = fma(b, bw, term, fma(b, b.fmul(f, da), dw, prev))
                else:
                    new = fma(b, fma(b, f, da, term), dw, prev)
                b.store(new, acc[i][n])
    b.call(release, [])
    for i, (pay, sc, bias, out) in enumerate(mats):
        for n in range(TOKENS):
            store(b, b.load(acc[i][n], typ=vf), out, n * R, align=4)
    b.ret_void()
    return fn
