"""AMX-BF16 kernel: all M slots of one expert x 2 weight row groups, the whole K, per call.

Each 32 x 16 weight block is dequantized once per call into bf16 pairs (w = scale*code + shift,
rounded to bf16) in a per-worker buffer, then for each 32-slot chunk four C tiles accumulate
tdpbf16ps over the whole K and are stored once: no per-block tile store or float epilogue (the cost
of the int8 kernel, amx.py). Activations (x, h) are bf16 rows in slot order. The first chunk
dequantizes block b+1 while the tile unit works on block b.
"""
from ..layout import Geometry
from .amx import CHUNK
from .irutil import F32, I8, I32, I64, PTR, VOID, define, fma, for_range, gep, i64, load, splat, \
    specialize, store, vec
from .scales import block_scale_shift, prefetch_block_ahead
from .tiles import C_TILE, chunk_step, make_tiles

BF16_BLOCK_BYTES = 1024   # one dequantized 32 x 16 block: 16 tile rows of 64 bytes


def amx_bf16_name():
    return "amx_bf16_mm2"


def round_bf16_bits(b, x):
    """<n x float> -> <n x i32> whose high 16 bits are x rounded to bf16 (half away from zero on the
    magnitude; finite inputs), low 16 bits garbage."""
    n = x.type.count
    return b.add(b.bitcast(x, vec(I32, n)), splat(I32, n, 0x8000))


def pack_bf16_pairs(b, even, odd):
    """Two <16 x float> -> <16 x i32>: bf16(even) in the low half of each lane, bf16(odd) in the high."""
    lo = b.lshr(round_bf16_bits(b, even), splat(I32, 16, 16))
    hi = b.and_(round_bf16_bits(b, odd), splat(I32, 16, -65536))
    return b.or_(hi, lo)


def _dequant_block(b, geo, pay, sc, bias, blk, dst):
    """Weight block blk (16 rows x 32) of one row group -> 16 tile rows of bf16 pairs at dst:
    row 2q + h holds, for each weight row r, (w[r][4q + 2h], w[r][4q + 2h + 1])."""
    R = 16
    vi, vf = vec(I32, R), vec(F32, R)
    bpb = geo.block_payload_bytes
    pb = gep(b, pay, b.mul(blk, i64(bpb)))
    dw, shift = block_scale_shift(b, geo, sc, bias, blk)
    raw = [load(b, pb, vec(I8, 64), v * 64, align=64) for v in range(bpb // 64)]
    if geo.nibbles:   # quad q < 4: low nibbles of vector q; q >= 4: high nibbles of vector q-4
        quads = [b.and_(r, splat(I8, 64, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, 64, 4)) for r in raw]
    else:
        quads = raw
    for q, qv in enumerate(quads):
        d = b.bitcast(qv, vi)
        w = []
        for j in range(4):   # byte j of lane r = code of weight (r, 4q + j), unsigned
            u = b.lshr(d, splat(I32, R, 8 * j)) if j else d
            if j < 3:
                u = b.and_(u, splat(I32, R, 0xFF))
            w.append(fma(b, b.sitofp(u, vf), dw, shift))
        for h in range(2):
            store(b, pack_bf16_pairs(b, w[2 * h], w[2 * h + 1]), dst, (2 * q + h) * R, align=64)


PARTS = ("all", "dequant", "tiles")   # "dequant" / "tiles": the kernel with the other half left out (amxprof.py)


def emit_amx_bf16_mm(module, geo: Geometry, prefetch_bytes: int, emulate: bool = False, parts: str = "all"):
    """void amx_bf16_mm2(nblocks, M, A bf16[M][lda/2], lda (bytes), pay0, sc0, bias0, pay1, sc1, bias1,
    acc f32[2][.][16], acc_mat_stride (bytes), bbuf (nblocks * 2 KiB scratch)).

    acc[mat][s][r] = sum over K of bf16(weight_mat[r]) . A_s for s < M (overwritten). Each weight block
    is dequantized once per call (to bf16 pairs, into bbuf) and read back for every 32-slot chunk;
    the four C tiles accumulate over the whole K, so there is no per-block epilogue. Rows of A up to
    the next multiple of 32 past M must be readable. parts != "all" is for profiling only (amxprof.py):
    "dequant" leaves out every tile load, product and store, "tiles" the dequantization (bbuf is
    read as it is)."""
    assert parts in PARTS, parts
    assert geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed
    args = [I64, I64, PTR, I64] + [PTR] * 6 + [PTR, I64, PTR]
    fn, b = define(module, amx_bf16_name(), VOID, args, internal=True)
    nblocks, M, A, lda = fn.args[:4]
    mats = [fn.args[4:7], fn.args[7:10]]
    acc, acc_stride, bbuf = fn.args[10:13]
    tiles = make_tiles(b, "bf16", emulate)
    tiles.configure()

    def dequant(blk):
        for mat, (pay, sc, bias) in enumerate(mats):
            prefetch_block_ahead(b, geo, pay, sc, bias, blk, prefetch_bytes)
            _dequant_block(b, geo, pay, sc, bias, blk,
                           gep(b, bbuf, b.add(b.mul(blk, i64(2 * BF16_BLOCK_BYTES)), i64(mat * BF16_BLOCK_BYTES))))

    do_tiles, do_dequant = parts != "dequant", parts != "tiles"

    def block_loop(s0, first, two):
        first = first and do_dequant
        if first:
            dequant(i64(0))
        with for_range(b, 0, nblocks, name="bblk") as blk:
            bb = gep(b, bbuf, b.mul(blk, i64(2 * BF16_BLOCK_BYTES)))
            if do_tiles:
                tile_step(s0, blk, bb, two)
            if first:   # the next block, while the tile unit works on this one
                nxt = b.add(blk, i64(1))
                with b.if_then(b.icmp_signed("<", nxt, nblocks)):
                    dequant(nxt)

    def tile_step(s0, blk, bb, two):
        a0 = gep(b, A, b.add(b.mul(s0, lda), b.mul(blk, i64(64))))   # a 64-byte line per row and block
        chunk_step(b, tiles, bb, a0, lda, two, CHUNK)

    nch = b.udiv(b.add(M, i64(CHUNK - 1)), i64(CHUNK))
    with for_range(b, 0, nch, name="chunk") as ch:
        s0 = b.mul(ch, i64(CHUNK))
        two = b.icmp_signed(">", b.sub(M, s0), i64(16))
        first = b.icmp_signed("==", ch, i64(0))
        for mat in range(2):
            for half in range(2):
                tiles.zero(C_TILE[mat, half])
        specialize(b, (first, two), lambda f, t: block_loop(s0, f, t))
        for mat in range(2):
            dst = gep(b, acc, b.add(b.mul(i64(mat), acc_stride), b.mul(s0, i64(64))))
            tiles.store(C_TILE[mat, 0], dst, i64(64))
        with b.if_then(two):
            for mat in range(2):
                dst = gep(b, acc, b.add(b.mul(i64(mat), acc_stride), b.mul(b.add(s0, i64(16)), i64(64))))
                tiles.store(C_TILE[mat, 1], dst, i64(64))
    tiles.release()
    b.ret_void()
    return fn
