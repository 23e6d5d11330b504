"""Rotary position embedding for MLA: plain RoPE and YaRN, interleaved pairs or split halves."""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """inv_freq[dim/2] (fp32, on the CPU even under a meta-device build); YaRN blends interpolated and extrapolated frequencies by a ramp."""
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation = 1.0 / base
    if rope.type == "default":
        return extrapolation
    interpolation = 1.0 / (rope.factor * base)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    return interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated


class RotaryTables:
    """cos/sin per position, built once per device and grown on demand. Not a module buffer:
    the model is built on the meta device and these are derived from the config, not loaded."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool = True):
        self.inv_freq = inverse_frequencies(rope, dim)
        self.scale = rope.cos_sin_scale
        self.interleave = interleave
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions start..start+length -> cos, sin: [length, dim/2] fp32 (views of the tables)."""
        device = torch.device(device)
        needed = start + length
        cos, sin = self._tables.get(device, (None, None))
        if cos is None or cos.shape[0] < needed:
            length = max(needed, 2 * (cos.shape[0] if cos is not None else 2048))
            angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), self.inv_freq).to(device)
            cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
            self._tables[device] = (cos, sin)
        return cos[start:needed], sin[start:needed]

    def cos_sin_at(self, position: torch.Tensor, length: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin() for a start held in a device tensor [1] (int64): gathered on the device, no host
        sync (a CUDA graph step). The tables are grown to max_len first, on the host, and never move
        while max_len covers every position."""
        self.cos_sin(0, max_len, position.device)  # grows the tables if needed
        cos, sin = self._tables[position.device]
        idx = position + torch.arange(length, device=position.device)
        return cos.index_select(0, idx), sin.index_select(0, idx)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [..., T, heads, dim] rotated by cos/sin [T, dim/2]; computed in fp32, returned in x.dtype.

        Interleaved (DeepSeek's layout) rotates pairs (x0, x1), (x2, x3)... and keeps that layout;
        otherwise the two halves of the vector form the pairs (rotate_half)."""
        if x.is_cuda and x.dim() == 4 and _fused_on(x):
            from .fused import rope  # one kernel instead of ~8 (decode is launch-bound)

            return rope(x, cos, sin, self.interleave)
        xf = x.float()
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            a, b = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        else:
            half = xf.shape[-1] // 2
            a, b = xf[..., :half], xf[..., half:]
            out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        return out.to(x.dtype)


def _fused_on(x: torch.Tensor) -> bool:
    from gpu_attention.attention import backend_for

    d = x.shape[-1]
    return backend_for(x.device) == "triton" and d >= 2 and d & (d - 1) == 0 and x.dtype in (
        torch.float32, torch.bfloat16, torch.float16)
