"""FP8 e4m3 weights with block scales (DeepSeek-V3's checkpoint format).

A weight W [out, in] is stored as fp8 with `weight_scale_inv` [ceil(out/bo), ceil(in/bi)]:
W = fp8 * scale_inv per (bo x bi) block. The same functions serve the CPU expert path later.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_dim, in_dim = weight.shape
    bo, bi = block
    expected = (-(-out_dim // bo), -(-in_dim // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
                         f"in {bo}x{bi} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (fp8 [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)]), amax scaling per block."""
    out_dim, in_dim = weight.shape
    bo, bi = block
    rows, cols = -(-out_dim // bo), -(-in_dim // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32, device=weight.device)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, bo, cols, bi)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).view(rows * bo, cols * bi)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale_inv
