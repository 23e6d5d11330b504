"""Repacked weight layouts that the kernels stream, built from GGUF blocks at load time.

Quantized formats ("row-interleaved quads", R = rows per group = i32 lanes of a vector, 16 on
AVX-512 and 8 on AVX2): for each group of R rows and each block of 32 weights along K,
    payload  8-bit formats: [8 quads][R rows][4 bytes]  -> 8 vectors; lane r of quad q holds
                            row r's weights 4q..4q+3, so one vpdpbusd with a broadcast
                            4-byte activation quad advances all R rows at once
             4-bit formats: [4 quads][R][4 bytes], low nibble = weight 4q+j, high = 16+4q+j
    scale    [32/SG][R] f16     (SG = weights per scale: 32, or 16 for q6_k)
    q4_k keeps GGUF's own factors, per super-block of 8 blocks (256 weights), in two streams:
    scale    [R] f16 d      then [8 blocks][R] u8 sc      (10 R bytes)
    bias     [R] f16 -dmin  then [8 blocks][R] u8 m       so  w = d*sc * code + (-dmin)*m
Payload, scales (and bias) are separate streams per row group ([N/R][K/32][...], q4_k [N/R][K/256][...]).
Codes: q8_0 signed int8 (AVX2 / AVX-512 without VNNI apply sign(w) to the activation) or, with
VNNI, code+128 as u8 (the kernel subtracts 128*sum(a)); q4_0 nibble 0..15 (offset 8); q4_k nibble
(no offset, bias); q6_k code 0..63 in a byte (offset 32). Integer offsets are removed exactly in
int32 before the float scale: acc - offset * sum(a).

bf16: rows in groups of 4, chunks of VB/2 weights: payload [N/4][K/CE][4][CE] bf16.

Rounding: q6_k's d*sc is stored as f16 (relative error <= 2^-11, far below the int8 activation
error; see NOTES.md); q8_0, q4_0, q4_k and bf16 keep GGUF's values exactly (q4_k's products d*sc
and dmin*m are exact in f32). q4_k's super-block form streams 0.578 bytes per weight; the f16 form
(`superblock=False`: d*sc and -dmin*m as f16 per 32 weights, 0.625) stays for A/B runs.
"""
from dataclasses import dataclass

import numpy as np

from .formats import get_format, q4k_codes, q4k_factors, q6k_codes

BF16_GROUP_ROWS = 4
BLOCK = 32  # weights per activation block (int8 activations carry one scale per 32)
SUPER = 8   # 32-weight blocks per q4_k super-block


@dataclass(frozen=True)
class Geometry:
    fmt: str
    vector_bytes: int  # VB
    group_rows: int    # R: rows interleaved into one group
    scale_group: int   # SG: weights per scale (0 for bf16)
    nibbles: bool      # payload holds two 4-bit weights per byte
    signed: bool       # payload is signed int8 (q8_0 without VNNI)
    offset: int        # integer code offset removed with offset*sum(a)
    bias: bool         # a stored bias per scale group (q4_k)
    superblock: bool = False   # q4_k's factors per super-block: f16 per 256 weights, a byte per 32

    @property
    def scale_unit(self) -> tuple[int, int]:
        """(blocks, bytes): a scale stream (and the bias stream) is made of units of `bytes` per row
        group, each holding the factors of `blocks` consecutive 32-weight blocks."""
        if self.superblock:
            return SUPER, 10 * self.group_rows
        return 1, 2 * self.group_rows * self.scales_per_block

    @property
    def scale_bytes_per_block(self) -> float:
        blocks, nbytes = self.scale_unit
        return nbytes / blocks

    @property
    def k_align(self) -> int:
        """K must be a multiple of this."""
        return self.vector_bytes // 2 if self.fmt == "bf16" else BLOCK

    @property
    def scales_per_block(self) -> int:
        return BLOCK // self.scale_group

    @property
    def block_payload_bytes(self) -> int:
        """Payload bytes of one row group for one 32-weight block."""
        return self.group_rows * (16 if self.nibbles else 32)

    def payload_bytes(self, n: int, k: int) -> int:
        if self.fmt == "bf16":
            return 2 * n * k
        return (n // self.group_rows) * (k // BLOCK) * self.block_payload_bytes

    def scale_bytes(self, n: int, k: int) -> int:
        """Bytes of one matrix's scale stream (as many again for the bias stream, where there is one)."""
        if not self.scale_group:
            return 0
        blocks, nbytes = self.scale_unit
        return (n // self.group_rows) * (k // BLOCK // blocks) * nbytes

    def check(self, n: int, k: int, what: str):
        align = BLOCK * SUPER if self.superblock else self.k_align
        if n % self.group_rows or k % align:
            raise ValueError(f"{what}: shape [{n}, {k}] needs rows divisible by {self.group_rows} and columns "
                             f"by {align} for {self.fmt} with {self.vector_bytes}-byte vectors")


def geometry(fmt: str, vector_bytes: int, vnni: bool = False, superblock: bool = True) -> Geometry:
    """superblock: q4_k's factors per super-block (the default) or as f16 per 32 weights (A/B runs)."""
    lanes = vector_bytes // 4
    if fmt == "bf16":
        return Geometry(fmt, vector_bytes, BF16_GROUP_ROWS, 0, False, False, 0, False)
    if fmt == "q8_0":
        return Geometry(fmt, vector_bytes, lanes, 32, False, not vnni, 128 if vnni else 0, False)
    if fmt == "q4_0":
        return Geometry(fmt, vector_bytes, lanes, 32, True, False, 8, False)
    if fmt == "q4_k":
        return Geometry(fmt, vector_bytes, lanes, 32, True, False, 0, True, superblock)
    if fmt == "q6_k":
        return Geometry(fmt, vector_bytes, lanes, 16, False, False, 32, False)
    get_format(fmt)  # raises the one-line error for unknown names
    raise AssertionError(fmt)


def codes_and_scales(blocks: np.ndarray, fmt: str, n: int, k: int):
    """GGUF blocks -> (codes [n, k] uint8 (int8 for q8_0), scale [n, k/SG] f32, bias [n, k/SG] or None).
    weight = scale * (code - offset) + bias."""
    spec = get_format(fmt)
    b = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1, spec.block_bytes)
    if fmt == "q8_0":
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        return b[:, 2:].view(np.int8).reshape(n, k), d.reshape(n, -1), None
    if fmt == "q4_0":
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        qs = b[:, 2:]
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(n, k), d.reshape(n, -1), None
    if fmt == "q4_k":
        q, scale, mins = q4k_codes(b)
        return q.reshape(n, k), scale.reshape(n, -1), (-mins).reshape(n, -1)
    if fmt == "q6_k":
        q, sc, d = q6k_codes(b)
        return q.reshape(n, k), (d[:, None] * sc.astype(np.float32)).reshape(n, -1), None
    raise AssertionError(fmt)


def repack(blocks: np.ndarray, fmt: str, n: int, k: int, geo: Geometry) -> dict[str, np.ndarray]:
    """One matrix [n, k] of GGUF blocks (uint8 [n, row_bytes]) -> {'payload', 'scale'[, 'bias']} flat arrays."""
    geo.check(n, k, "weight matrix")
    R = geo.group_rows
    if fmt == "bf16":
        ce = geo.k_align
        a = np.ascontiguousarray(blocks).view(np.uint16).reshape(n // R, R, k // ce, ce)
        return {"payload": np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(-1).view(np.uint8)}
    codes, scale, bias = codes_and_scales(blocks, fmt, n, k)
    nb = k // BLOCK
    c = codes.reshape(n // R, R, nb, BLOCK)
    if fmt == "q8_0" and not geo.signed:
        c = (c.view(np.uint8) ^ np.uint8(0x80))          # code + 128
    c = c.view(np.uint8)
    if geo.nibbles:
        c = c[..., :16] | (c[..., 16:] << 4)               # byte 4q+j: weights 4q+j (low) and 16+4q+j (high)
    quads = c.shape[-1] // 4
    pay = c.reshape(n // R, R, nb, quads, 4).transpose(0, 2, 3, 1, 4)   # [grp][blk][quad][row][4]
    spb = geo.scales_per_block

    def per_row(a):  # [n, k/SG] -> [grp][blk][spb][row] f16
        return np.ascontiguousarray(a.astype(np.float16).reshape(n // R, R, nb, spb).transpose(0, 2, 3, 1)).reshape(-1)

    out = {"payload": np.ascontiguousarray(pay).reshape(-1)}
    if geo.superblock:
        out["scale"], out["bias"] = _q4k_superblock_streams(blocks, n, k, R)
        return out
    out["scale"] = per_row(scale)
    if geo.bias:
        out["bias"] = per_row(bias)
    return out


def _q4k_superblock_streams(blocks: np.ndarray, n: int, k: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    """q4_k blocks -> the scale and bias streams of the super-block form, uint8 [n/R][k/256][10 R]."""
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1, get_format("q4_k").block_bytes)
    d, dmin, sc, m = q4k_factors(raw)
    G, nsb = n // R, k // (BLOCK * SUPER)

    def stream(f16, u8):   # f16 [n*nsb], u8 [n*nsb, 8] in row-major [row][super-block] order
        head = np.ascontiguousarray(f16.reshape(G, R, nsb).transpose(0, 2, 1)).view(np.uint8)   # [G][nsb][2R]
        tail = u8.reshape(G, R, nsb, SUPER).transpose(0, 2, 3, 1).reshape(G, nsb, SUPER * R)
        return np.concatenate([head, tail], axis=2).reshape(-1)

    return stream(d, sc), stream(-dmin, m)


def repacked_bytes_per_weight(geo: Geometry) -> float:
    """Bytes the kernel streams per weight (payload + scales + bias)."""
    if geo.fmt == "bf16":
        return 2.0
    scales = geo.scale_bytes_per_block / geo.group_rows / BLOCK * (2 if geo.bias else 1)
    return geo.block_payload_bytes / geo.group_rows / BLOCK + scales
