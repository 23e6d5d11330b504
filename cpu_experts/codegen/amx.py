"""AMX int8 kernel: all M slots of one expert x 2 weight row groups ("mats"), the whole K, per call.

The row-interleaved-quad weight layout (layout.py) is AMX's "VNNI" B layout: the 8 quads of one
32-weight block x 16 rows are 8 tile rows of 64 bytes. Tiles (8, no renaming in hardware):
    C00 C01 C10 C11 = mat {0,1} x slot half {0,1}: 16 slots x 16 rows of i32
    A0 A1           = slots 32c..32c+15 and 32c+16..32c+31 of one 32-weight block (16 x 32 int8)
    B0 B1           = block of mat 0 and mat 1 (8 x 64 u8)
Loop order: block-major, then 32-slot chunks, so each weight block is read (and for 4-bit formats
unpacked) once per call while the activation rows (L2/L3) are re-read per block. A "step" =
(block, chunk): 2 tile loads of A, 4 tdpbsud, 4 tile stores into a 4 KiB buffer. GGUF's per-32
scales force a float epilogue per step (C -> float, scaled, added to accumulators in memory):
    offset formats: acc += (float(C) * scale_a + term_a) * scale_w      term_a = -offset*scale_a*sum(a)
    q4_k:           acc += float(C) * scale_a * scale_w + bias_w * term_a,  term_a = scale_a*sum(a)
The epilogue is software-pipelined one step behind the tile ops (two C buffers): the tile unit works
on step i while the vector units finish step i-1. A chunk with <= 16 live slots uses one A tile.

`emulate=True` replaces every tile instruction with plain IR (tiles.py), so the whole kernel is
tested on hosts without AMX. Linux must grant the tile state before the first tile instruction
(experts.enable_amx). amx_bf16.py is the other mode (dequantize to bf16 once, no epilogue per block).
"""
from llvmlite import ir

from ..layout import BLOCK, Geometry
from .irutil import F32, I8, I32, I64, PTR, VOID, define, fma, for_range, gep, i64, load, local, prefetch, splat, \
    store, vec
from .scales import block_factors, prefetch_block_ahead
from .tiles import A_TILE, B_TILE, C_TILE, make_tiles
from .vmath import splat_scalar

CHUNK = 32                  # slots per step (two A tiles)
STEP_BYTES = 2 * CHUNK * 64  # one step's C tiles: [mat][32 slots][16 x i32]
A_PREFETCH_BLOCKS = 8        # activation rows prefetched 256 bytes ahead


def amx_name():
    return "amx_mm2"


def emit_amx_mm(module, geo: Geometry, prefetch_bytes: int, emulate: bool = False):
    """void amx_mm2(nblocks, M, A i8[M][lda], lda, D f32[M][ldd] (scale_a), T f32[M][ldd] (term_a), ldd,
    pay0, sc0, bias0, pay1, sc1, bias1, acc f32[2][.][16], acc_mat_stride (bytes)).

    acc[mat][s][r] = sum over K of weight_mat[r] . x_s (dequantized), for s < M: overwritten, not added.
    Rows of A, D and T up to the next multiple of 32 past M must be readable (their results are
    computed on garbage and never stored)."""
    assert geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed
    R = 16
    args = [I64, I64, PTR, I64, PTR, PTR, I64] + [PTR] * 6 + [PTR, I64]
    fn, b = define(module, amx_name(), VOID, args, internal=True)
    nblocks, M, A, lda, D, Tm, ldd = fn.args[:7]
    mats = [fn.args[7:10], fn.args[10:13]]
    acc, acc_stride = fn.args[13:15]
    tiles = make_tiles(b, "int8", emulate)
    vf, vi = vec(F32, R), vec(I32, R)
    cbuf = local(b, ir.ArrayType(I8, 2 * STEP_BYTES), name="cbuf")
    cbuf.align = 64
    bbuf = None
    if geo.nibbles:  # unpacked 4-bit blocks: [parity][mat][512]
        bbuf = local(b, ir.ArrayType(I8, 2 * 2 * 512), name="bbuf")
        bbuf.align = 64
    tiles.configure()

    # accumulators start at zero
    zero_v = splat(F32, R, 0.0)
    with for_range(b, 0, M, name="z") as s:
        for m in range(2):
            store(b, zero_v, gep(b, acc, b.add(b.mul(i64(m), acc_stride), b.mul(s, i64(64)))), align=64)

    nch = b.udiv(b.add(M, i64(CHUNK - 1)), i64(CHUNK))
    nsteps = b.mul(nblocks, nch)
    blk_v, ch_v = local(b, I64, i64(0), "blk"), local(b, I64, i64(0), "ch")
    pblk_v, pch_v = local(b, I64, i64(0), "pblk"), local(b, I64, i64(0), "pch")

    def step_buf(i):
        return gep(b, cbuf, b.mul(b.and_(i, i64(1)), i64(STEP_BYTES)))

    with for_range(b, 0, b.add(nsteps, i64(1)), name="step") as i:
        blk, ch = b.load(blk_v, typ=I64), b.load(ch_v, typ=I64)
        with b.if_then(b.icmp_signed("<", i, nsteps)):
            _issue(b, tiles, geo, mats, bbuf, blk, ch, M, A, lda, D, Tm, ldd, step_buf(i), prefetch_bytes)
        with b.if_then(b.icmp_signed(">", i, i64(0))):
            _epilogue(b, geo, mats, b.load(pblk_v, typ=I64), b.load(pch_v, typ=I64), M, D, Tm, ldd,
                      step_buf(b.sub(i, i64(1))), acc, acc_stride, vf, vi)
        b.store(blk, pblk_v)
        b.store(ch, pch_v)
        nxt = b.add(ch, i64(1))
        wrap = b.icmp_signed("==", nxt, nch)
        b.store(b.select(wrap, i64(0), nxt), ch_v)
        b.store(b.select(wrap, b.add(blk, i64(1)), blk), blk_v)
    tiles.release()
    b.ret_void()
    return fn


def _issue(b, tiles, geo, mats, bbuf, blk, ch, M, A, lda, D, Tm, ldd, cb, prefetch_bytes):
    """Tile work of step (blk, ch): new weight tiles at ch == 0, A tiles, 2 or 4 products, C -> cb."""
    bpb = geo.block_payload_bytes
    with b.if_then(b.icmp_signed("==", ch, i64(0))):
        for mat, (pay, sc, bias) in enumerate(mats):
            pb = gep(b, pay, b.mul(blk, i64(bpb)))
            prefetch_block_ahead(b, geo, pay, sc, bias, blk, prefetch_bytes)
            if geo.nibbles:   # quad q < 4: low nibbles of vector q; q >= 4: high nibbles of vector q-4
                dst = gep(b, bbuf, b.add(b.mul(b.and_(blk, i64(1)), i64(1024)), i64(512 * mat)))
                raw = [load(b, pb, vec(I8, 64), v * 64, align=64) for v in range(4)]
                rows = [b.and_(r, splat(I8, 64, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, 64, 4)) for r in raw]
                for q, r in enumerate(rows):
                    store(b, r, dst, q * 64, align=64)
                tiles.load(B_TILE[mat], dst, i64(64))
            else:
                tiles.load(B_TILE[mat], pb, i64(64))
    s0 = b.mul(ch, i64(CHUNK))
    two = b.icmp_signed(">", b.sub(M, s0), i64(16))
    a0 = gep(b, A, b.add(b.mul(s0, lda), b.mul(blk, i64(BLOCK))))
    # activation rows of this chunk, 8 blocks ahead (one line serves two blocks)
    with b.if_then(b.icmp_signed("==", b.and_(blk, i64(1)), i64(0))):
        p = gep(b, a0, A_PREFETCH_BLOCKS * BLOCK)
        for r in range(CHUNK):
            prefetch(b, p)
            p = gep(b, p, lda)
    # scale_a / term_a rows: one line holds 16 blocks; fetch the next line half-way through this one
    with b.if_then(b.icmp_signed("==", b.and_(blk, i64(15)), i64(8))):
        at = b.add(b.mul(s0, ldd), b.add(blk, i64(8)))
        pd, pt, step = gep(b, D, at, F32), gep(b, Tm, at, F32), b.mul(ldd, i64(4))
        for r in range(CHUNK):
            prefetch(b, pd)
            prefetch(b, pt)
            pd, pt = gep(b, pd, step), gep(b, pt, step)
    tiles.load(A_TILE[0], a0, lda)
    for mat in range(2):
        tiles.zero(C_TILE[mat, 0])
        tiles.dp(C_TILE[mat, 0], A_TILE[0], B_TILE[mat])
    with b.if_then(two):
        tiles.load(A_TILE[1], gep(b, a0, b.mul(lda, i64(16))), lda)
        for mat in range(2):
            tiles.zero(C_TILE[mat, 1])
            tiles.dp(C_TILE[mat, 1], A_TILE[1], B_TILE[mat])
    for mat in range(2):
        tiles.store(C_TILE[mat, 0], gep(b, cb, mat * CHUNK * 64), i64(64))
    with b.if_then(two):
        for mat in range(2):
            tiles.store(C_TILE[mat, 1], gep(b, cb, (mat * CHUNK + 16) * 64), i64(64))


def _epilogue(b, geo, mats, blk, ch, M, D, Tm, ldd, cb, acc, acc_stride, vf, vi):
    """acc[mat][s] += scaled C rows of step (blk, ch), for the step's live slots."""
    R = 16
    s0 = b.mul(ch, i64(CHUNK))
    live = b.sub(M, s0)
    live = b.select(b.icmp_signed("<", live, i64(CHUNK)), live, i64(CHUNK))
    dw, bw = zip(*(block_factors(b, geo, sc, bias, blk) for (_, sc, bias) in mats))
    with for_range(b, 0, live, name="ep") as r:
        s = b.add(s0, r)
        at = b.add(b.mul(s, ldd), blk)
        da = splat_scalar(b, load(b, D, F32, at, align=4), R)
        term = splat_scalar(b, load(b, Tm, F32, at, align=4), R)
        for mat in range(2):
            f = b.sitofp(load(b, cb, vi, b.mul(b.add(r, i64(mat * CHUNK)), i64(R)), align=64), vf)
            ap = gep(b, acc, b.add(b.mul(i64(mat), acc_stride), b.mul(s, i64(64))))
            prev = b.load(ap, typ=vf, align=64)
            if geo.bias:
                new = fma(b, bw[mat], term, fma(b, b.fmul(f, da), dw[mat], prev))
            else:
                new = fma(b, fma(b, f, da, term), dw[mat], prev)
            b.store(new, ap, align=64)
