"""Dequantize cpu_experts' repacked expert matrices with torch ops (on the GPU, or the CPU in tests).

Streamed prefill copies a layer's experts exactly as the CPU kernels hold them (the repacked
layout of cpu_experts/layout.py, no second copy in RAM) and unpacks them here:

    quantized: payload [E][N/R][K/32][quads][R][4] bytes, scale/bias [E][N/R][K/32][32/SG][R] f16
               (q4_k: [E][N/R][K/256] of [R] f16 then [8][R] u8, factor = f16 * u8)
               8-bit codes: byte j of quad q is weight 4q+j; 4-bit: low nibble 4q+j, high 16+4q+j
               weight = scale * (code - offset) + bias
    bf16:      payload [E][N/4][K/CE][4][CE] bf16

Views and one elementwise chain per matrix; the arithmetic is fp32, the result `dtype`.
"""

from __future__ import annotations

import torch

from cpu_experts.layout import BLOCK, SUPER, Geometry


def dequantize_packed(payload: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, *,
                      geo: Geometry, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """payload uint8 [E, payload bytes per expert], scale/bias uint8 [E, 2 * scales per expert] (f16 bytes)
    -> weights [E, n, k] in `dtype` (the checkpoint's [out, in] orientation)."""
    E, R = payload.shape[0], geo.group_rows
    G = n // R
    if geo.fmt == "bf16":
        ce = geo.k_align
        w = payload.reshape(E, -1).view(torch.bfloat16).reshape(E, G, k // ce, R, ce)
        return w.permute(0, 1, 3, 2, 4).reshape(E, n, k).to(dtype)
    nb, spb, sg = k // BLOCK, geo.scales_per_block, geo.scale_group
    if geo.nibbles:  # [E, G, nb, 4 quads, R, 4] -> [E, G, R, nb, (lo|hi), quad, byte]
        p = payload.reshape(E, G, nb, 4, R, 4)
        codes = torch.stack((p & 0x0F, p >> 4), dim=3).permute(0, 1, 5, 2, 3, 4, 6)
    else:  # [E, G, nb, 8 quads, R, 4] -> [E, G, R, nb, quad, byte]
        codes = payload.reshape(E, G, nb, 8, R, 4).permute(0, 1, 4, 2, 3, 5)
    codes = codes.reshape(E, n, nb, spb, sg)
    if geo.signed:  # q8_0 without VNNI: two's complement int8
        values = codes.view(torch.int8).float()
    else:  # unsigned codes; q8_0 with VNNI stores code + 128, q4_0 offset 8, q6_k 32
        values = codes.float() - geo.offset
    per_row = _per_row_superblock if geo.superblock else _per_row
    w = values * per_row(scale, E, G, R, nb, spb)
    if geo.bias:
        w = w + per_row(bias, E, G, R, nb, spb)
    return w.reshape(E, n, k).to(dtype)


def _per_row(table: torch.Tensor, E: int, G: int, R: int, nb: int, spb: int) -> torch.Tensor:
    """f16 bytes [E, G * nb * spb * R * 2] in [grp][blk][spb][row] order -> fp32 [E, n, nb, spb, 1]."""
    t = table.reshape(E, -1).view(torch.float16).reshape(E, G, nb, spb, R)
    return t.permute(0, 1, 4, 2, 3).reshape(E, G * R, nb, spb, 1).float()


def _per_row_superblock(table: torch.Tensor, E: int, G: int, R: int, nb: int, spb: int) -> torch.Tensor:
    """q4_k's super-block stream uint8 [E, G * nb/8 * 10 R] -> fp32 [E, n, nb, 1, 1] (f16 x u8, exact)."""
    t = table.reshape(E, G, nb // SUPER, 10 * R)
    f = t[..., :2 * R].contiguous().view(torch.float16).float()            # [E, G, nsb, R]
    u = t[..., 2 * R:].reshape(E, G, nb // SUPER, SUPER, R).float()         # [E, G, nsb, 8, R]
    return (f[:, :, :, None, :] * u).permute(0, 1, 4, 2, 3).reshape(E, G * R, nb, 1, 1)
