"""AMX-BF16 kernel: all M slots of one expert x 2 weight row groups, the whole K, per call.

Each 32 x 16 weight block is dequantized once per call into bf16 pairs (w = scale*code + shift,
rounded to bf16) in a per-worker buffer, then for each 32-slot chunk four C tiles accumulate
tdpbf16ps over the whole K and are stored once: no per-block tile store or float epilogue (the cost
of the int8 kernel, amx.py). Activations (x, h) are bf16 rows in slot order. The first chunk
dequantizes block b+1 while the tile unit works on block b.
"""
from llvmlite import ir

from ..layout import Geometry
from .amx import CHUNK
from .irutil import F16, F32, I8, I32, I64, PTR, VOID, define, fma, for_range, gep, i64, intrinsic, load, prefetch, \
    shuffle, splat, specialize, store, vec
from .tiles import A_TILE, B_TILE, C_TILE, make_tiles

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
    sidx = b.mul(blk, i64(R))
    dw = b.fpext(load(b, sc, vec(F16, R), sidx, align=2), vf)
    if geo.bias:
        shift = b.fpext(load(b, bias, vec(F16, R), sidx, align=2), vf)
    else:   # w = d * (code - offset)
        shift = b.fmul(dw, splat(F32, R, -float(geo.offset)))
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


class _BFloat(ir.types._BaseFloatType):
    """LLVM's bfloat (llvmlite has no such type): only the result of vcvtne2ps2bf16, bitcast at once."""
    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat._create_instance()


def _dequant_block_cvt(b, geo, pay, sc, bias, blk, dst, emulate):
    """_dequant_block's result (the same tile rows) with fewer vector uops: each f32 vector holds rows
    0-7 (or 8-15) x the two weights of one bf16 pair, its codes zero-extended from the quad by one
    byte shuffle (vpermb), so vcvtne2ps2bf16 (AVX512-BF16, round to nearest even) writes a whole tile
    row with no shift/mask/or packing. Emulated (tests without AVX512-BF16): the same lane order,
    packed with round_bf16_bits."""
    R = 16
    vi, vf = vec(I32, R), vec(F32, R)
    bpb = geo.block_payload_bytes
    pb = gep(b, pay, b.mul(blk, i64(bpb)))
    sidx = b.mul(blk, i64(R))
    dw = b.fpext(load(b, sc, vec(F16, R), sidx, align=2), vf)
    if geo.bias:
        shift = b.fpext(load(b, bias, vec(F16, R), sidx, align=2), vf)
    else:
        shift = b.fmul(dw, splat(F32, R, -float(geo.offset)))
    half_rows = [[r for r in range(8 * hh, 8 * hh + 8) for _ in range(2)] for hh in range(2)]
    dws = [shuffle(b, dw, rows) for rows in half_rows]      # lane 2i + t: scale of row 8hh + i
    shifts = [shuffle(b, shift, rows) for rows in half_rows]
    raw = [load(b, pb, vec(I8, 64), v * 64, align=64) for v in range(bpb // 64)]
    if geo.nibbles:
        quads = [b.and_(r, splat(I8, 64, 0x0F)) for r in raw] + [b.lshr(r, splat(I8, 64, 4)) for r in raw]
    else:
        quads = raw
    zero = ir.Constant(vec(I8, 64), [0] * 64)
    cvt = None if emulate else intrinsic(b.module, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", vec(_BFloat(), 32),
                                         [vf, vf])
    for q, qv in enumerate(quads):
        for h in range(2):
            f = []
            for hh in range(2):   # rows 8hh..8hh+7: lane 2i + t = code of weight (8hh + i, 4q + 2h + t)
                mask = [4 * (8 * hh + i) + 2 * h + t if z == 0 else 64 for i in range(8) for t in range(2)
                        for z in range(4)]   # one vpermt2b with a zero vector
                u = b.bitcast(b.shuffle_vector(qv, zero, ir.Constant(vec(I32, 64), mask)), vi)
                f.append(fma(b, b.sitofp(u, vf), dws[hh], shifts[hh]))
            if cvt is not None:
                row = b.bitcast(b.call(cvt, [f[1], f[0]]), vi)   # words 0-15 from f[0], 16-31 from f[1]
            else:
                bits = [b.lshr(round_bf16_bits(b, x), splat(I32, R, 16)) for x in f]
                words = [b.trunc(x, vec(ir.IntType(16), R)) for x in bits]
                row = b.bitcast(b.shuffle_vector(words[0], words[1], ir.Constant(vec(I32, 32), list(range(32)))), vi)
            store(b, row, dst, (2 * q + h) * R, align=64)


PARTS = ("all", "dequant", "tiles")   # "dequant" / "tiles": the kernel with the other half left out (amxprof.py)


def emit_amx_bf16_mm(module, geo: Geometry, prefetch_bytes: int, emulate: bool = False, parts: str = "all",
                     cvt: bool = False):
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
    bpb = geo.block_payload_bytes

    def dequant(blk):
        for mat, (pay, sc, bias) in enumerate(mats):
            pb = gep(b, pay, b.mul(blk, i64(bpb)))
            for line in range(0, bpb, 64):
                prefetch(b, gep(b, pb, i64(prefetch_bytes + line)))
            sc_ahead = max(prefetch_bytes // bpb, 2) * 32
            prefetch(b, gep(b, sc, b.add(b.mul(blk, i64(32)), i64(sc_ahead))))
            if geo.bias:
                prefetch(b, gep(b, bias, b.add(b.mul(blk, i64(32)), i64(sc_ahead))))
            at = gep(b, bbuf, b.add(b.mul(blk, i64(2 * BF16_BLOCK_BYTES)), i64(mat * BF16_BLOCK_BYTES)))
            if cvt:
                _dequant_block_cvt(b, geo, pay, sc, bias, blk, at, emulate)
            else:
                _dequant_block(b, geo, pay, sc, bias, blk, at)

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
        for mat in range(2):
            tiles.load(B_TILE[mat], gep(b, bb, mat * BF16_BLOCK_BYTES), i64(64))
        a0 = gep(b, A, b.add(b.mul(s0, lda), b.mul(blk, i64(64))))
        p = gep(b, a0, 8 * 64)   # activation rows, 8 blocks ahead (a 64-byte line per row and block)
        for _ in range(CHUNK if two else 16):
            prefetch(b, p)
            p = gep(b, p, lda)
        tiles.load(A_TILE[0], a0, lda)
        for mat in range(2):
            tiles.dp(C_TILE[mat, 0], A_TILE[0], B_TILE[mat])
        if two:
            tiles.load(A_TILE[1], gep(b, a0, b.mul(lda, i64(16))), lda)
            for mat in range(2):
                tiles.dp(C_TILE[mat, 1], A_TILE[1], B_TILE[mat])

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


def emit_amx_bf16_mm_seg(module, geo: Geometry, prefetch_bytes: int, seg: int, emulate: bool = False,
                         parts: str = "all", cvt: bool = False):
    """The same function as emit_amx_bf16_mm (same name, arguments and result), K walked in segments of
    `seg` blocks: bbuf holds two segments (2 x seg x 2 KiB, in L1 for seg <= 4) instead of all of K
    (448 KiB at H 7168, re-read from L2 by every chunk after the first), and the dequantization of
    segment g+1 is spread over segment g's tile steps: mat 0's blocks during chunk 0, mat 1's during
    chunk 1 (both during chunk 0 when M <= 32), so the vector units and the tile unit work side by
    side in every chunk instead of one after the other. The C tiles are stored to acc after each
    (segment, chunk) and reloaded for the next segment (4 KiB per seg x 4 products)."""
    assert parts in PARTS, parts
    assert geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed and seg >= 1
    args = [I64, I64, PTR, I64] + [PTR] * 6 + [PTR, I64, PTR]
    fn, b = define(module, amx_bf16_name(), VOID, args, internal=True)
    nblocks, M, A, lda = fn.args[:4]
    mats = [fn.args[4:7], fn.args[7:10]]
    acc, acc_stride, bbuf = fn.args[10:13]
    tiles = make_tiles(b, "bf16", emulate)
    tiles.configure()
    bpb = geo.block_payload_bytes
    do_tiles, do_dequant = parts != "dequant", parts != "tiles"
    seg_bytes = seg * 2 * BF16_BLOCK_BYTES

    def ring(g, j, mat):   # segment g's block j of mat in the two-segment ring
        at = b.add(b.mul(b.and_(g, i64(1)), i64(seg_bytes)), b.mul(j, i64(2 * BF16_BLOCK_BYTES)))
        return gep(b, bbuf, b.add(at, i64(mat * BF16_BLOCK_BYTES)))

    def dequant(g, j, mat):
        pay, sc, bias = mats[mat]
        blk = b.add(b.mul(g, i64(seg)), j)
        pb = gep(b, pay, b.mul(blk, i64(bpb)))
        for line in range(0, bpb, 64):
            prefetch(b, gep(b, pb, i64(prefetch_bytes + line)))
        sc_ahead = max(prefetch_bytes // bpb, 2) * 32
        prefetch(b, gep(b, sc, b.add(b.mul(blk, i64(32)), i64(sc_ahead))))
        if geo.bias:
            prefetch(b, gep(b, bias, b.add(b.mul(blk, i64(32)), i64(sc_ahead))))
        if cvt:
            _dequant_block_cvt(b, geo, pay, sc, bias, blk, ring(g, j, mat), emulate)
        else:
            _dequant_block(b, geo, pay, sc, bias, blk, ring(g, j, mat))

    def seg_len(g):
        left = b.sub(nblocks, b.mul(g, i64(seg)))
        return b.select(b.icmp_signed("<", left, i64(seg)), left, i64(seg))

    def c_tile_ptr(s0, mat, half):
        return gep(b, acc, b.add(b.mul(i64(mat), acc_stride), b.mul(b.add(s0, i64(16 * half)), i64(64))))

    def tile_step(s0, g, j, two):
        blk = b.add(b.mul(g, i64(seg)), j)
        for mat in range(2):
            tiles.load(B_TILE[mat], ring(g, j, mat), i64(64))
        a0 = gep(b, A, b.add(b.mul(s0, lda), b.mul(blk, i64(64))))
        p = gep(b, a0, 8 * 64)   # activation rows, 8 blocks ahead
        for _ in range(CHUNK if two else 16):
            prefetch(b, p)
            p = gep(b, p, lda)
        tiles.load(A_TILE[0], a0, lda)
        for mat in range(2):
            tiles.dp(C_TILE[mat, 0], A_TILE[0], B_TILE[mat])
        if two:
            tiles.load(A_TILE[1], gep(b, a0, b.mul(lda, i64(16))), lda)
            for mat in range(2):
                tiles.dp(C_TILE[mat, 1], A_TILE[1], B_TILE[mat])

    def chunk_body(s0, g, n, n_next, first_seg, two, dq0, dq1):
        for mat in range(2 if do_tiles else 0):
            for half in range(2 if two else 1):
                if first_seg:
                    tiles.zero(C_TILE[mat, half])
                else:
                    tiles.load(C_TILE[mat, half], c_tile_ptr(s0, mat, half), i64(64))
        with for_range(b, 0, n, name="sblk") as j:
            if do_tiles:
                tile_step(s0, g, j, two)
            if do_dequant and (dq0 or dq1):   # this block of the next segment, if it has one
                with b.if_then(b.icmp_signed("<", j, n_next)):
                    for mat, on in enumerate((dq0, dq1)):
                        if on:
                            dequant(b.add(g, i64(1)), j, mat)
        for mat in range(2 if do_tiles else 0):
            for half in range(2 if two else 1):
                tiles.store(C_TILE[mat, half], c_tile_ptr(s0, mat, half), i64(64))

    nseg = b.udiv(b.add(nblocks, i64(seg - 1)), i64(seg))
    nch = b.udiv(b.add(M, i64(CHUNK - 1)), i64(CHUNK))
    one_chunk = b.icmp_signed("==", nch, i64(1))
    if do_dequant:   # prologue: segment 0
        n0 = seg_len(i64(0))
        with for_range(b, 0, n0, name="pro") as j:
            for mat in range(2):
                dequant(i64(0), j, mat)
    with for_range(b, 0, nseg, name="seg") as g:
        n = seg_len(g)
        nxt = b.add(g, i64(1))
        n_next = b.select(b.icmp_signed("<", nxt, nseg), seg_len(nxt), i64(0))
        first_seg = b.icmp_signed("==", g, i64(0))
        with for_range(b, 0, nch, name="chunk") as ch:
            s0 = b.mul(ch, i64(CHUNK))
            two = b.icmp_signed(">", b.sub(M, s0), i64(16))
            dq0 = b.icmp_signed("==", ch, i64(0))
            dq1 = b.or_(b.icmp_signed("==", ch, i64(1)), one_chunk)
            specialize(b, (first_seg, two, dq0, dq1),
                       lambda f, t, d0, d1: chunk_body(s0, g, n, n_next, f, t, d0, d1))
    tiles.release()
    b.ret_void()
    return fn
