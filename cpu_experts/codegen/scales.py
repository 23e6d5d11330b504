"""A row group's per-block weight factors, read from its scale (and bias) streams in either form of
layout.py: f16 per scale group, or q4_k's super-blocks (f16 per 256 weights times a byte per 32).
Every kernel reads its factors here, so the forms differ in this module only."""
from ..layout import SUPER, Geometry
from .irutil import F16, F32, I8, i64, gep, load, vec


def scale_pos(b, geo: Geometry, blk):
    """Byte offset of block blk's factors in a scale stream (prefetch distances; exact per unit)."""
    blocks, nbytes = geo.scale_unit
    pos = b.mul(blk, i64(nbytes))
    return b.lshr(pos, i64(SUPER.bit_length() - 1)) if blocks == SUPER else pos


def stream_bytes(b, geo: Geometry, nblocks):
    """Bytes of a row group's scale stream for nblocks 32-weight blocks (a multiple of a unit)."""
    return scale_pos(b, geo, nblocks)


def block_factors(b, geo: Geometry, sc, bias, blk, half=0):
    """(scale, bias) <R x float> of block blk's half-th scale group (q6_k has two of 16 weights) for
    the R rows: w = scale * code + bias. bias is None for the offset formats (w = scale * (code - offset))."""
    R = geo.group_rows
    vf = vec(F32, R)
    if geo.superblock:
        unit = b.mul(b.lshr(blk, i64(SUPER.bit_length() - 1)), i64(geo.scale_unit[1]))
        byte = b.add(unit, b.add(b.mul(b.and_(blk, i64(SUPER - 1)), i64(R)), i64(2 * R)))

        def factor(stream):   # f16 per super-block x 6-bit byte per block: exact in f32
            d = b.fpext(load(b, gep(b, stream, unit), vec(F16, R), align=2), vf)
            return b.fmul(d, b.uitofp(load(b, gep(b, stream, byte), vec(I8, R)), vf))
        return factor(sc), factor(bias)
    idx = b.add(b.mul(blk, i64(R * geo.scales_per_block)), i64(R * half))
    scale = b.fpext(load(b, sc, vec(F16, R), idx, align=2), vf)
    return scale, b.fpext(load(b, bias, vec(F16, R), idx, align=2), vf) if geo.bias else None
