"""A row group's per-block weight factors, read from its scale (and bias) streams in either form of
layout.py: f16 per scale group, or q4_k's super-blocks (f16 per 256 weights times a byte per 32).
Every kernel reads its factors here, so the forms differ in this module only."""
from ..layout import SUPER, Geometry
from .irutil import F16, F32, I8, gep, i64, load, prefetch, splat, vec


def scale_pos(b, geo: Geometry, blk):
    """Byte offset of block blk's factors in a scale stream (exact per unit), which is also the bytes
    a row group's stream holds for blk blocks."""
    blocks, nbytes = geo.scale_unit
    pos = b.mul(blk, i64(nbytes))
    return b.lshr(pos, i64(SUPER.bit_length() - 1)) if blocks == SUPER else pos


def prefetch_block_ahead(b, geo: Geometry, pay, sc, bias, blk, prefetch_bytes: int):
    """The AMX kernels' prefetch at block blk: the payload prefetch_bytes ahead, and the factors as
    many blocks ahead (at least 2)."""
    bpb = geo.block_payload_bytes
    pb = gep(b, pay, b.mul(blk, i64(bpb)))
    for line in range(0, bpb, 64):
        prefetch(b, gep(b, pb, i64(prefetch_bytes + line)))
    ahead = scale_pos(b, geo, b.add(blk, i64(max(prefetch_bytes // bpb, 2))))
    for stream in [sc] + ([bias] if geo.bias else []):
        prefetch(b, gep(b, stream, ahead))


def superblock_heads(b, geo: Geometry, sc, bias, blk):
    """(d, -dmin) <R x float> of the super-block holding block blk (q4_k's super-block form)."""
    R, unit = geo.group_rows, _unit_offset(b, geo, blk)
    return tuple(b.fpext(load(b, gep(b, st, unit), vec(F16, R), align=2), vec(F32, R)) for st in (sc, bias))


def _unit_offset(b, geo, blk):
    return b.mul(b.lshr(blk, i64(SUPER.bit_length() - 1)), i64(geo.scale_unit[1]))


def block_factors(b, geo: Geometry, sc, bias, blk, half=0, heads=None):
    """(scale, bias) <R x float> of block blk's half-th scale group (q6_k has two of 16 weights) for
    the R rows: w = scale * code + bias. bias is None for the offset formats (w = scale * (code - offset)).
    heads (super-block form only): what the block's bytes multiply instead of the super-block's own
    (d, -dmin) as superblock_heads reads them: a caller that hoists them per super-block, scaled or not."""
    R = geo.group_rows
    vf = vec(F32, R)
    if geo.superblock:
        unit = _unit_offset(b, geo, blk)
        byte = b.add(unit, b.add(b.mul(b.and_(blk, i64(SUPER - 1)), i64(R)), i64(2 * R)))
        heads = heads or superblock_heads(b, geo, sc, bias, blk)
        # 6-bit bytes times f16 factors: exact in f32
        return tuple(b.fmul(h, b.uitofp(load(b, gep(b, st, byte), vec(I8, R)), vf)) for h, st in zip(heads, (sc, bias)))
    idx = b.add(b.mul(blk, i64(R * geo.scales_per_block)), i64(R * half))
    scale = b.fpext(load(b, sc, vec(F16, R), idx, align=2), vf)
    return scale, b.fpext(load(b, bias, vec(F16, R), idx, align=2), vf) if geo.bias else None


def block_scale_shift(b, geo: Geometry, sc, bias, blk, half=0):
    """block_factors with the offset formats' shift spelled out: w = scale * code + shift for every
    code (shift = -offset * scale where there is no bias stream)."""
    scale, shift = block_factors(b, geo, sc, bias, blk, half)
    return scale, shift if shift is not None else b.fmul(scale, splat(F32, geo.group_rows, -float(geo.offset)))
