"""Repacked weight layouts that the kernels stream, built from GGUF blocks at load time.

Quantized formats ("row-interleaved quads", R = rows per group = i32 lanes of a vector, 16 on
AVX-512 and 8 on AVX2): for each group of R rows and each block of 32 weights along K,
    payload  8-bit formats: [8 quads][R rows][4 bytes]  -> 8 vectors; lane r of quad q holds
                            row r's weights 4q..4q+3, so one vpdpbusd with a broadcast
                            4-byte activation quad advances all R rows at once
             4-bit formats: [4 quads][R][4 bytes], low nibble = weight 4q+j, high = 16+4q+j
    scale    [32/SG][R] f16     (SG = weights per scale: 32, or 16 for q6_k)
    bias     [32/SG][R] f16     (q4_k only: -dmin*m)
Payload, scales and bias are three streams per row group ([N/R][K/32][...] each).
Codes: q8_0 signed int8 (AVX2 / AVX-512 without VNNI apply sign(w) to the activation) or, with
VNNI, code+128 as u8 (the kernel subtracts 128*sum(a)); q4_0 nibble 0..15 (offset 8); q4_k nibble
(no offset, bias); q6_k code 0..63 in a byte (offset 32). Integer offsets are removed exactly in
int32 before the float scale: acc - offset * sum(a).

bf16: rows in groups of 4, chunks of VB/2 weights: payload [N/4][K/CE][4][CE] bf16.

Rounding: q4_k's d*sc and dmin*m and q6_k's d*sc are stored as f16 (relative error <= 2^-11,
far below the int8 activation error; see NOTES.md); q8_0, q4_0 and bf16 keep GGUF values exactly.
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .formats import get_format, q4k_codes, q6k_codes

BF16_GROUP_ROWS = 4
BLOCK = 32  # weights per activation block (int8 activations carry one scale per 32)


@dataclass(frozen=True)
class Geometry:
    fmt: str
    vector_bytes: int  # VB
    group_rows: int    # R: rows interleaved into one group
    scale_group: int   # SG: weights per scale (0 for bf16)
    nibbles: bool      # payload holds two 4-bit weights per byte
    signed: bool       # payload is signed int8 (q8_0 without VNNI)
    offset: int        # integer code offset removed with offset*sum(a)
    bias: bool         # a stored f16 bias per scale group (q4_k)
    # scales (and bias) after each block's payload, one stream per row group: only dotprof's probe
    # (FusedGeometry) sets it; a class constant, so packed-cache headers (asdict) are unchanged
    fused: ClassVar[bool] = False

    @property
    def block_stride(self) -> int:
        """Bytes from one 32-weight block of a row group's payload stream to the next."""
        return self.block_payload_bytes

    @property
    def scale_stride(self) -> int:
        """f16 elements from one block's scales to the next (the same for the bias)."""
        return self.group_rows * self.scales_per_block

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

    def scale_count(self, n: int, k: int) -> int:
        return n * k // self.scale_group if self.scale_group else 0

    def check(self, n: int, k: int, what: str):
        if n % self.group_rows or k % self.k_align:
            raise ValueError(f"{what}: shape [{n}, {k}] needs rows divisible by {self.group_rows} and columns "
                             f"by {self.k_align} for {self.fmt} with {self.vector_bytes}-byte vectors")


def geometry(fmt: str, vector_bytes: int, vnni: bool = False) -> Geometry:
    lanes = vector_bytes // 4
    if fmt == "bf16":
        return Geometry(fmt, vector_bytes, BF16_GROUP_ROWS, 0, False, False, 0, False)
    if fmt == "q8_0":
        return Geometry(fmt, vector_bytes, lanes, 32, False, not vnni, 128 if vnni else 0, False)
    if fmt == "q4_0":
        return Geometry(fmt, vector_bytes, lanes, 32, True, False, 8, False)
    if fmt == "q4_k":
        return Geometry(fmt, vector_bytes, lanes, 32, True, False, 0, True)
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

    out = {"payload": np.ascontiguousarray(pay).reshape(-1), "scale": per_row(scale)}
    if geo.bias:
        out["bias"] = per_row(bias)
    return out


def repacked_bytes_per_weight(geo: Geometry) -> float:
    """Bytes the kernel streams per weight (payload + scales + bias)."""
    if geo.fmt == "bf16":
        return 2.0
    per = geo.block_payload_bytes / geo.group_rows / BLOCK + 2.0 / geo.scale_group
    return per + (2.0 / geo.scale_group if geo.bias else 0.0)
