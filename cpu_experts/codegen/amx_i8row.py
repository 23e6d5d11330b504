"""AMX int8 kernel with one scale per weight row and per activation row ("i8row"): all M slots of
one expert x 2 weight row groups, the whole K, per call.

GGUF blocks carry a scale per 32 weights, so exact int8 tiles need a float epilogue per block (amx.py)
and the bf16 kernel (amx_bf16.py) pays two tile loads per 16 x 16 x 32 product. This kernel instead
requantizes each weight row on the fly to one int8 scale for the whole K, s_r = max |w_r| / 127
(from the block scales: no extra memory), and takes activations quantized to int8 per slot row
(one scale per token over K). Then tdpbssd accumulates 64 weights per tile product over all K
(half the tile loads and tile instructions of bf16 per weight), and the only float work is one
scale per output at the end.

Requantization, per 32-weight block of row r with code c: w/s_r = c * r_b + t_b, computed in 16-bit
fixed point with 7 fraction bits, (c * R + T) >> 7 with R = round(128 * scale_b / s_r) and
T = round(128 * shift_b / s_r) + 64, so the int8 weight is w/s_r rounded (error <= 0.56 of an int8
step: the rounding plus R's). Everything fits int16: R <= 2167 (q4_k: 15 * scale <= 2 max |w|), so
c * R <= 32512 (q6_k: R <= 508, c <= 63; q8_0: R <= 127, c <= 255), and the sum is 128 w/s_r + 64,
within [-16200, 16328]. q6_k's scale per 16 weights gives each half block its own R and T. Next to the format's own
error this adds little: a block whose scale is a fraction f of the row's largest keeps 127 f / 8
int8 steps per 4-bit step (q4_0), i.e. an extra error of about 1/(2 r_b^2) of the 4-bit one.
Activations per token over K cost more where a row holds outliers (a per-32 scale adapts to them);
that is the price of the whole-K accumulation, and why this kernel only takes experts with many
slots (prefill), where kt-kernel's formats make the same choice (NOTES.md, session 8).

Tiles: C00 C01 C10 C11 = mat {0,1} x slot half {0,1}; A0 A1 = two 16-slot x 64 tiles of activations;
B0 B1 = 64 weights x 16 rows of mat 0 and 1 (two 32-weight blocks: the row-interleaved quads of
layout.py are AMX's VNNI B layout). The first 32-slot chunk requantizes K-tile t+1 while the tile
unit works on K-tile t; later chunks read the per-worker buffer (nblocks/2 x 2 KiB).
"""
from llvmlite import ir

from ..layout import Geometry
from .amx import CHUNK
from .irutil import F32, I1, I8, I16, I32, I64, PTR, VOID, c, define, for_range, gep, i64, intrinsic, load, \
    local, prefetch, shuffle, specialize, splat, store, vec
from .scales import block_factors, block_scale_shift, prefetch_block_ahead, scale_pos, superblock_heads
from .tiles import C_TILE, chunk_step, make_tiles
from .vmath import splat_scalar

R = 16                 # weight rows per group (AVX-512 lanes)
TILE_K = 64            # int8 weights per tile row
BLOCKS_PER_TILE = 2    # 32-weight blocks per K-tile
TILE_BYTES = 1024      # one requantized 64 x 16 tile of one mat
FRAC = 7               # fraction bits of the 16-bit requantization


def amx_i8row_name():
    return "amx_i8row_mm2"


def _code_max(geo) -> int:
    return 15 if geo.nibbles else 63 if geo.fmt == "q6_k" else 255


def _row_bound(b, geo, sc, bias, nblocks, ahead: int):
    """<16 x float>: the largest |w| any code of each row can take over the whole K (scale streams
    prefetched `ahead` bytes ahead, when not 0)."""
    vf = vec(F32, R)
    fabs = intrinsic(b.module, "llvm.fabs.v16f32", vf, [vf])
    fmax = intrinsic(b.module, "llvm.maxnum.v16f32", vf, [vf, vf])
    acc = local(b, vf, splat(F32, R, 0.0))
    unit_blocks, unit_bytes = geo.scale_unit   # per stream
    every = max(1, 64 // unit_bytes)   # f16 q4: a 64-byte line holds two blocks' scales
    with for_range(b, 0, nblocks, name="rbound") as blk:
        if ahead:   # once per line of a unit, or per unit where a unit spans lines
            off = b.add(scale_pos(b, geo, blk), i64(ahead))
            step = unit_blocks * every
            with b.if_then(b.icmp_unsigned("==", b.urem(blk, i64(step)), i64(0)) if step > 1 else c(I1, 1)):
                for st in ([sc, bias] if geo.bias else [sc]):
                    for line in range(0, max(unit_bytes, 64), 64):
                        prefetch(b, gep(b, st, b.add(off, i64(line))))
        for half in range(geo.scales_per_block):
            scale, shift = block_scale_shift(b, geo, sc, bias, blk, half)
            top = b.fadd(b.fmul(scale, splat(F32, R, float(_code_max(geo)))), shift)   # code = max
            m = b.call(fmax, [b.call(fabs, [shift]), b.call(fabs, [top])])           # code = 0
            b.store(b.call(fmax, [b.load(acc, typ=vf), m]), acc)
    return b.load(acc, typ=vf)


def _kept_row_bound(b, geo, sc, bias, nblocks, ahead: int, slot):
    """_row_bound, kept at slot (16 floats) after the first call: a lane of 0 means not yet known (an
    all-zero row stays 0 and is recomputed, which is harmless). Workers racing on one row group store
    the same values, and each 4-byte lane is either 0 or final, so a reader sees 0 (and recomputes)
    or the final value."""
    vf = vec(F32, R)
    out = local(b, vf)
    kept = load(b, slot, vf, align=4)
    b.store(kept, out)
    missing = b.bitcast(b.fcmp_ordered("==", kept, splat(F32, R, 0.0)), I16)
    with b.if_then(b.icmp_unsigned("!=", missing, c(I16, 0))):
        bound = _row_bound(b, geo, sc, bias, nblocks, ahead)
        store(b, bound, slot, align=4)
        b.store(bound, out)
    return b.load(out, typ=vf)


def _fixed16(b, x):
    """<16 x float> -> <16 x i16>, rounded to nearest (ties to even)."""
    vf = x.type
    rnd = intrinsic(b.module, "llvm.roundeven.v16f32", vf, [vf])
    return b.trunc(b.fptosi(b.call(rnd, [x]), vec(I32, R)), vec(I16, R))


def _requant_block(b, geo, pay, sc, bias, blk, inv, dst, heads=None):
    """Block blk (16 rows x 32 codes) -> 8 tile rows of int8 quads at dst (512 bytes): row q holds,
    for each weight row r, w[r][4q .. 4q+3] / s_r rounded. inv = 128 / s_r per row. heads: q4_k's
    super-block factors already times inv (hoisted per K-tile: both its blocks share a super-block).

    Bytes widen to words by interleaving with zero within each 128-bit lane (vpunpck[lh]bw) and narrow
    back with vpacksswb, its inverse lane for lane: the tile row comes out in the payload's order, and
    each word vector holds 8 weight rows (4 of every lane: 'lo' rows 4L, 4L+1, 'hi' rows 4L+2, 4L+3)."""
    rows = [[4 * (w // 8) + 2 * h + (w % 8) // 4 for w in range(32)] for h in range(2)]   # word -> weight row
    Rh, Th = [], []   # per scale group: the factors of the lo / hi word rows
    for half in range(geo.scales_per_block):
        if heads:
            scale, shift = block_factors(b, geo, sc, bias, blk, half, heads)
        else:
            scale, shift = (b.fmul(x, inv) for x in block_scale_shift(b, geo, sc, bias, blk, half))
        Rw = _fixed16(b, scale)
        Tw = b.add(_fixed16(b, shift), splat(I16, R, 1 << (FRAC - 1)))
        Rh.append([shuffle(b, Rw, m) for m in rows])
        Th.append([shuffle(b, Tw, m) for m in rows])
    quads_per_group = 8 // geo.scales_per_block
    bpb = geo.block_payload_bytes
    pb = gep(b, pay, b.mul(blk, i64(bpb)))
    v16, v8 = vec(I16, 32), vec(I8, 64)
    zero = ir.Constant(v8, None)
    pack = intrinsic(b.module, "llvm.x86.avx512.packsswb.512", v8, [v16, v16])
    # vpunpck[lh]bw with zero: bytes 8h .. 8h+7 of each 128-bit lane, each followed by a zero byte
    unpack = [[x for lane in range(4) for i in range(8) for x in (16 * lane + 8 * h + i, 64 + 16 * lane + 8 * h + i)]
              for h in range(2)]
    for v in range(bpb // 64):
        raw = load(b, pb, v8, v * 64, align=64)
        words = [b.bitcast(b.shuffle_vector(raw, zero, ir.Constant(vec(I32, 64), unpack[h])), v16) for h in range(2)]
        if geo.nibbles:   # low nibbles: quad v; high nibbles: quad v + 4 (layout.py)
            quads = [(v, [b.and_(w, splat(I16, 32, 0x0F)) for w in words]),
                     (v + 4, [b.lshr(w, splat(I16, 32, 4)) for w in words])]
        else:
            quads = [(v, words)]
        for q, codes in quads:
            g = q // quads_per_group
            w = [b.ashr(b.add(b.mul(cd, Rh[g][h]), Th[g][h]), splat(I16, 32, FRAC)) for h, cd in enumerate(codes)]
            store(b, b.call(pack, w), dst, q * 64, align=64)


def emit_amx_i8row_mm(module, geo: Geometry, prefetch_bytes: int, emulate: bool = False, warm: bool = True,
                      keep_bounds: bool = True):
    """void amx_i8row_mm2(nblocks, M, A i8[M][lda], lda (bytes), AS f32[M] (activation row scales),
    pay0, sc0, bias0, pay1, sc1, bias1, acc f32[2][.][16], acc_mat_stride (bytes), bbuf (nblocks/2 x 2 KiB),
    bound0, bound1 (f32[16] each: the row groups' kept row bounds; keep_bounds=False ignores them)).

    acc[mat][s][r] = AS[s] * s_r * sum over K of A[s] . requantized weight_mat[r], for s < M
    (overwritten). nblocks must be even (K a multiple of 64). Rows of A up to the next multiple of 32
    past M must be readable (their results are never stored). warm: while the row bounds read the
    scale streams (prefetched ahead), the payload's first prefetch_bytes are already on their way, so
    the requantization does not start on a cold stream."""
    assert geo.group_rows == R and geo.scale_group in (16, 32) and not geo.signed
    args = [I64, I64, PTR, I64, PTR] + [PTR] * 6 + [PTR, I64, PTR, PTR, PTR]
    fn, b = define(module, amx_i8row_name(), VOID, args, internal=True)
    nblocks, M, A, lda, AS = fn.args[:5]
    mats = [fn.args[5:8], fn.args[8:11]]
    acc, acc_stride, bbuf = fn.args[11:14]
    slots = fn.args[14:16]
    vf = vec(F32, R)
    if warm:
        for pay, _, _ in mats:
            for line in range(0, prefetch_bytes, 64):
                prefetch(b, gep(b, pay, line))
    ahead = 512 if warm else 0
    bounds = [_kept_row_bound(b, geo, sc, bias, nblocks, ahead, slot) if keep_bounds else
              _row_bound(b, geo, sc, bias, nblocks, ahead) for (_, sc, bias), slot in zip(mats, slots)]
    # an all-zero row keeps bound 0: scale it as 1 (its codes requantize to 0)
    safe = [b.select(b.fcmp_ordered(">", bd, splat(F32, R, 0.0)), bd, splat(F32, R, 1.0)) for bd in bounds]
    inv = [b.fdiv(splat(F32, R, 127.0 * (1 << FRAC)), s) for s in safe]
    row_scale = [b.fmul(s, splat(F32, R, 1.0 / 127.0)) for s in safe]
    ntiles = b.udiv(nblocks, i64(BLOCKS_PER_TILE))
    tiles = make_tiles(b, "i8row", emulate)
    tiles.configure()

    def requant(t):
        for mat, (pay, sc, bias) in enumerate(mats):
            heads = None
            if geo.superblock:   # 8 blocks per super-block: a K-tile's two share its factors
                first = b.mul(t, i64(BLOCKS_PER_TILE))
                heads = [b.fmul(h, inv[mat]) for h in superblock_heads(b, geo, sc, bias, first)]
            for half in range(BLOCKS_PER_TILE):
                blk = b.add(b.mul(t, i64(BLOCKS_PER_TILE)), i64(half))
                prefetch_block_ahead(b, geo, pay, sc, bias, blk, prefetch_bytes)
                dst = gep(b, bbuf, b.add(b.mul(t, i64(2 * TILE_BYTES)), i64(mat * TILE_BYTES + half * 512)))
                _requant_block(b, geo, pay, sc, bias, blk, inv[mat], dst, heads)

    def tile_step(s0, t, two):
        a0 = gep(b, A, b.add(b.mul(s0, lda), b.mul(t, i64(TILE_K))))
        chunk_step(b, tiles, gep(b, bbuf, b.mul(t, i64(2 * TILE_BYTES))), a0, lda, two, CHUNK)

    def tile_loop(s0, first, two):
        if first:
            requant(i64(0))
        with for_range(b, 0, ntiles, name="ktile") as t:
            tile_step(s0, t, two)
            if first:   # the next K-tile, while the tile unit works on this one
                nxt = b.add(t, i64(1))
                with b.if_then(b.icmp_signed("<", nxt, ntiles)):
                    requant(nxt)

    nch = b.udiv(b.add(M, i64(CHUNK - 1)), i64(CHUNK))
    with for_range(b, 0, nch, name="chunk") as ch:
        s0 = b.mul(ch, i64(CHUNK))
        live = b.sub(M, s0)
        two = b.icmp_signed(">", live, i64(16))
        first = b.icmp_signed("==", ch, i64(0))
        for mat in range(2):
            for half in range(2):
                tiles.zero(C_TILE[mat, half])
        specialize(b, (first, two), lambda f, t: tile_loop(s0, f, t))
        dsts = [gep(b, acc, b.add(b.mul(i64(mat), acc_stride), b.mul(s0, i64(64)))) for mat in range(2)]
        for mat in range(2):
            tiles.store(C_TILE[mat, 0], dsts[mat], i64(64))
        with b.if_then(two):
            for mat in range(2):
                tiles.store(C_TILE[mat, 1], gep(b, dsts[mat], 16 * 64), i64(64))
        n_live = b.select(b.icmp_signed("<", live, i64(CHUNK)), live, i64(CHUNK))
        with for_range(b, 0, n_live, name="scale") as n:   # int32 sums -> floats, in place
            a_s = splat_scalar(b, load(b, AS, F32, b.add(s0, n), align=4), R)
            for mat in range(2):
                p = gep(b, dsts[mat], b.mul(n, i64(64)))
                s = b.sitofp(b.load(p, typ=vec(I32, R), align=64), vf)
                b.store(b.fmul(s, b.fmul(row_scale[mat], a_s)), p, align=64)
    tiles.release()
    b.ret_void()
    return fn


def quant_row_name():
    return "quant_row_i8"


def emit_quant_row(module):
    """void quant_row_i8(src f32[n], n (multiple of 32), dst i8[n], scale f32*): int8 codes with one
    scale max|x| / 127 for the whole row (the i8row kernel's activations)."""
    fn, b = define(module, quant_row_name(), VOID, [PTR, I64, PTR, PTR], internal=True)
    src, n, dst, sptr = fn.args
    v32 = vec(F32, 32)
    fabs = intrinsic(module, "llvm.fabs.v32f32", v32, [v32])
    fmax = intrinsic(module, "llvm.maxnum.v32f32", v32, [v32, v32])
    rmax = intrinsic(module, "llvm.vector.reduce.fmax.v32f32", F32, [v32])
    rnd = intrinsic(module, "llvm.roundeven.v32f32", v32, [v32])
    acc = local(b, v32, splat(F32, 32, 0.0))
    with for_range(b, 0, n, step=32, name="amax") as i:
        b.store(b.call(fmax, [b.load(acc, typ=v32), b.call(fabs, [load(b, src, v32, i, align=4)])]), acc)
    amax = b.call(rmax, [b.load(acc, typ=v32)])
    pos = b.fcmp_ordered(">", amax, c(F32, 0.0))
    inv = splat_scalar(b, b.select(pos, b.fdiv(c(F32, 127.0), b.select(pos, amax, c(F32, 1.0))), c(F32, 0.0)), 32)
    with for_range(b, 0, n, step=32, name="q") as i:
        q = b.fptosi(b.call(rnd, [b.fmul(load(b, src, v32, i, align=4), inv)]), vec(I32, 32))
        store(b, b.trunc(q, vec(I8, 32)), dst, i)
    store(b, b.fdiv(amax, c(F32, 127.0)), sptr, align=4)
    b.ret_void()
    return fn
