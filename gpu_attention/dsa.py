"""DeepSeek sparse attention (V3.2) over the paged caches: the calls the model makes.

The indexer keys live in a second paged LatentCache of width index_head_dim, prepared and written
like the latent cache (fp8 storage scales each 128-value group, i.e. each token at DeepSeek's
index_head_dim 128, as DeepSeek's own FP8 indexer cache does). Decode gathers only the K selected
latent rows through the page table; a prefill of many tokens runs the decompressed form over the
whole prefix with a top-k mask. The math is gpu_attention.dsa_torch; CUDA tensors take the Triton
indexer kernel when Triton is installed (HMOE_ATTENTION=torch forces plain torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import backend_for
from .dsa_torch import SCORE_BLOCK_BYTES, indexer_topk, mla_masked_decompressed, sparse_absorbed, sparse_mask
from .latent_cache import LatentCache, dequantize_fp8
from .mla_torch import absorb_weights

BLOCK_BUDGET = 256 << 20  # bytes of gathered rows and scores per block of queries (absorbed form)


@dataclass
class DSACache:
    """What a V3.2 model takes as its cache: the latent cache and the indexer-key cache, both paged
    with the same page size and lengths."""

    latent: LatentCache
    index_keys: LatentCache

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.index_keys.nbytes


def gather_rows(cache: LatentCache, layer: int, indices: torch.Tensor) -> torch.Tensor:
    """Rows at positions indices [B, T, K] of sequences 0..B-1 -> [B, T, K, D] in the cache's compute
    dtype; only these rows are read (and dequantized, for fp8)."""
    B, T, K = indices.shape
    page = cache.page_size
    pos = indices.reshape(B, T * K)
    slots = cache.page_table[:B].long().gather(1, pos // page) * page + pos % page  # [B, T*K]
    rows = cache.data[layer].view(-1, cache.latent_dim)[slots]
    if cache.fp8:
        scales = cache.scales[layer].view(-1, cache.scales.shape[-1])[slots]
        rows = dequantize_fp8(rows, scales, cache.compute_dtype)
    return rows.view(B, T, K, -1)


def select_topk(q: torch.Tensor, weights: torch.Tensor, cache: LatentCache, layer: int, *, topk: int,
                scale: float, backend: str | None = None) -> torch.Tensor:
    """Lightning-indexer top-k for the last T positions of sequences 0..B-1 (equal lengths S):
    q [B, T, Hi, Di], weights [B, T, Hi] fp32 -> key positions [B, T, min(topk, S)] int64."""
    B, T, Hi = q.shape[:3]
    if (backend or backend_for(q.device)) != "triton":
        return indexer_topk(q, weights, cache.prefix(layer, B), topk=topk, scale=scale)
    from .dsa_triton import index_scores
    S = max(cache.lens[:B])
    step = max(1, SCORE_BLOCK_BYTES // (B * S * 4))  # queries per block of [B, block, S] fp32 scores
    return torch.cat([index_scores(q[:, t:t + step], weights[:, t:t + step], cache, layer, scale=scale, back=T - t)
                      .topk(min(topk, S), dim=-1).indices for t in range(0, T, step)], dim=1)


def dsa_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, layer: int,
                  kv_b_weight: torch.Tensor, indices: torch.Tensor, *, v_head_dim: int, scale: float,
                  form: str, budget: int = BLOCK_BUDGET) -> torch.Tensor:
    """MLA of the last T positions of cache sequences 0..B-1 restricted to indices [B, T, K]
    -> out [B, T, H, v]. Same arguments as attention.mla_attention plus the indices."""
    B, T, H, nope = q_nope.shape
    R = kv_b_weight.shape[1]
    if form == "decompressed":
        latent = cache.prefix(layer, B)
        return mla_masked_decompressed(q_nope, q_pe, latent, kv_b_weight, sparse_mask(indices, latent.shape[1]),
                                       kv_lora_rank=R, v_head_dim=v_head_dim, scale=scale)
    if form != "absorbed":
        raise ValueError(f"attention form must be absorbed or decompressed, got {form!r}")
    w_uk, w_uv = absorb_weights(kv_b_weight, num_heads=H, qk_nope_head_dim=nope, v_head_dim=v_head_dim)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    q_pos = cache.seq_lens[:B, None].long() - T + torch.arange(T, device=indices.device)  # [B, T], no host copy
    visible = indices <= q_pos[..., None]
    K, D = indices.shape[-1], cache.latent_dim
    # queries in blocks: the gathered rows and fp32 scores of one block stay under the budget
    step = max(1, budget // (B * K * (D * q_latent.element_size() + 8 * H)))
    out_latent = torch.cat([sparse_absorbed(q_latent[:, t:t + step], q_pe[:, t:t + step],
                                            gather_rows(cache, layer, indices[:, t:t + step]),
                                            visible[:, t:t + step], scale=scale) for t in range(0, T, step)], dim=1)
    return torch.einsum("bthr,hvr->bthv", out_latent.to(w_uv.dtype), w_uv)
