"""DeepSeek-V3.2's lightning indexer: picks, per query, the index_topk cached tokens MLA attends to.

Module and weight names are the checkpoint's (`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`);
the scoring and top-k math lives in gpu_attention.dsa_torch. Shapes: B batch, T new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_attention.dsa import select_topk
from gpu_attention.latent_cache import LatentCache

from .config import ModelConfig
from .fp8_linear import dense_weight


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, T, heads, d] with pairs (x[i], x[i + d/2]): the indexer is not interleaved,
    unlike MLA. cos/sin [T, d/2] fp32 (YaRN-scaled, the model's tables)."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = xf.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim = cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.num_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """RoPE on the first rope_dim values of each head (rope first, then the pass-through part)."""
        return torch.cat([rope_halves(x[..., :self.rope_dim], cos, sin), x[..., self.rope_dim:]], dim=-1)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos_sin, *, cache: LatentCache, layer: int,
                start_pos: int) -> torch.Tensor | None:
        """x [B, T, hidden], q_resid [B, T, q_lora_rank] (MLA's normed q_a) -> indices [B, T, K] of the
        keys each query attends to; None while the context fits index_topk (every key is selected,
        so dense attention is the same computation). Always stores this step's indexer keys in
        `cache` (the indexer-key cache, prepared for this step like the latent cache)."""
        assert cache is not None, "a V3.2 model runs on the DSACache that new_cache() returns"
        B, T, _ = x.shape
        cos, sin = cos_sin
        k = self._rope(self.k_norm(self.wk(x))[:, :, None], cos, sin)[:, :, 0]  # [B, T, Di]
        cache.write(layer, start_pos, k)
        if start_pos + T <= self.topk:
            return None
        q = self._rope(self.wq_b(q_resid).view(B, T, self.num_heads, self.head_dim), cos, sin)
        # transformers keeps weights_proj in fp32; the head weights also carry 1/sqrt(Hi)
        weights = F.linear(x.float(), dense_weight(self.weights_proj, torch.float32).float()) * self.num_heads**-0.5
        return select_topk(q, weights, cache, layer, topk=self.topk, scale=self.head_dim**-0.5)
