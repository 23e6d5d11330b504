"""The MLA latent cache: per layer and token, c_kv (kv_lora_rank) ‖ k_pe (qk_rope_head_dim).

Contiguous per sequence for now: [layers, batch, max_len, latent_dim]. Only the latent is stored,
never the decompressed K/V (576 values per token per layer for DeepSeek instead of 128·(192+128)).
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, *, num_layers: int, batch: int, max_len: int, latent_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.data = torch.zeros(num_layers, batch, max_len, latent_dim, dtype=dtype, device=device)

    def write(self, layer: int, start: int, latent: torch.Tensor) -> torch.Tensor:
        """Store latent [B, T, D] at positions start..start+T; return the cached prefix [B, start+T, D]."""
        end = start + latent.shape[1]
        assert end <= self.max_len, f"cache holds {self.max_len} positions, write ends at {end}"
        self.data[layer, :, start:end] = latent
        return self.data[layer, :, :end]
