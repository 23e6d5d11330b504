"""DeepSeek sparse attention (DSA, V3.2) in plain torch: the lightning indexer's top-k and MLA over it.

The reference for every DSA kernel and the CPU path. The math is transformers'
DeepseekV32Indexer / DeepseekV32Attention (the bf16 form of DeepSeek's, without the Hadamard
rotation and the FP8 scoring, which do not change the result in exact arithmetic).

Shapes: B batch; T new queries at positions S-T .. S-1; S cached keys; Hi indexer heads of width
Di; K = min(index_topk, S) selected keys per query. latent [B, S, R + rope] as in mla_torch.
"""

from __future__ import annotations

import torch

from .mla_torch import absorb_weights

# Bound on the fp32 indexer scores [B, block, Hi, S] materialised at once (prefill runs in query blocks).
SCORE_BLOCK_BYTES = 256 << 20


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, scale: float,
                   first_pos: int) -> torch.Tensor:
    """I(t, s) = sum_h w_h(t) * ReLU(scale * q_h(t) . k(s)); -inf where s is after query t's position.

    q [B, T, Hi, Di], weights [B, T, Hi] fp32, keys [B, S, Di]; query t sits at position first_pos + t.
    Returns [B, T, S] fp32. Same order of operations as transformers, so near-ties break alike."""
    T, S = q.shape[1], keys.shape[1]
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)) * scale  # [B, T, Hi, S]
    index = torch.matmul(weights.unsqueeze(-2), scores.relu()).squeeze(-2)  # [B, T, S]
    q_pos = torch.arange(first_pos, first_pos + T, device=q.device)[:, None]
    future = torch.arange(S, device=q.device)[None, :] > q_pos
    return index.masked_fill(future, float("-inf"))


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, topk: int, scale: float,
                 block_bytes: int = SCORE_BLOCK_BYTES) -> torch.Tensor:
    """Top-K key positions per query -> [B, T, K] int64 (K = min(topk, S)), queries at S-T .. S-1.

    A query with fewer than K visible keys also gets future positions (their score is -inf); the
    attention functions below drop those, as transformers' causal mask does."""
    B, T, Hi, _ = q.shape
    S = keys.shape[1]
    k = min(topk, S)
    step = max(1, block_bytes // (B * Hi * S * 4))
    out = []
    for t0 in range(0, T, step):
        scores = indexer_scores(q[:, t0:t0 + step], weights[:, t0:t0 + step], keys, scale=scale, first_pos=S - T + t0)
        out.append(scores.topk(k, dim=-1).indices)
    return torch.cat(out, dim=1)


def sparse_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """indices [B, T, K] -> bool [B, T, S]: True where query t attends key s (selected and not in its future)."""
    B, T, _ = indices.shape
    selected = torch.zeros(B, T, num_keys, dtype=torch.bool, device=indices.device).scatter_(-1, indices, True)
    q_pos = torch.arange(num_keys - T, num_keys, device=indices.device)[:, None]
    return selected & (torch.arange(num_keys, device=indices.device)[None, :] <= q_pos)


def mla_masked_decompressed(q_nope, q_pe, latent, kv_b_weight, keep, *, kv_lora_rank: int, v_head_dim: int,
                            scale: float):
    """mla_torch.mla_decompressed with the causal mask replaced by keep [B, T, S] (DSA prefill)."""
    B, T, H, nope = q_nope.shape
    c_kv, k_pe = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    kv = (c_kv.to(kv_b_weight.dtype) @ kv_b_weight.T).view(B, -1, H, nope + v_head_dim)  # [B, S, H, nope + v]
    k_nope, v = kv.split([nope, v_head_dim], dim=-1)
    scores = torch.einsum("bthd,bshd->bhts", q_nope.float(), k_nope.float())
    scores += torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
    probs = (scores * scale).masked_fill(~keep[:, None], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshv->bthv", probs.to(v.dtype), v)


def sparse_absorbed(q_latent, q_pe, rows, visible, *, scale: float) -> torch.Tensor:
    """Absorbed attention of each query over its own K latent rows (DSA decode): reads K rows, not S.

    q_latent [B, T, H, R] (q_nope through W_UK), q_pe [B, T, H, rope], rows [B, T, K, R + rope],
    visible [B, T, K] (False for a selected position in the query's future) -> out_latent [B, T, H, R]."""
    R = q_latent.shape[-1]
    c_kv, k_pe = rows[..., :R], rows[..., R:]
    scores = torch.einsum("bthr,btkr->bthk", q_latent.float(), c_kv.float())
    scores += torch.einsum("bthr,btkr->bthk", q_pe.float(), k_pe.float())
    probs = (scores * scale).masked_fill(~visible[:, :, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bthk,btkr->bthr", probs.to(c_kv.dtype), c_kv)


def mla_sparse_absorbed(q_nope, q_pe, latent, kv_b_weight, indices, *, kv_lora_rank: int, v_head_dim: int,
                        scale: float):
    """sparse_absorbed on a contiguous latent [B, S, R + rope] (the reference form of the paged path)."""
    B, T, H, nope = q_nope.shape
    S = latent.shape[1]
    w_uk, w_uv = absorb_weights(kv_b_weight, num_heads=H, qk_nope_head_dim=nope, v_head_dim=v_head_dim)
    rows = latent[torch.arange(B, device=latent.device)[:, None, None], indices]  # [B, T, K, R + rope]
    visible = indices <= torch.arange(S - T, S, device=latent.device)[None, :, None]
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    out_latent = sparse_absorbed(q_latent, q_pe, rows, visible, scale=scale)
    return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)


def mla_sparse(q_nope, q_pe, latent, kv_b_weight, indices, *, form: str, kv_lora_rank: int, v_head_dim: int,
               scale: float):
    """DSA attention on a contiguous latent in the chosen form: 'decompressed' masks the full prefix
    (prefill of many tokens), 'absorbed' gathers only the selected latent rows (decode)."""
    args = dict(kv_lora_rank=kv_lora_rank, v_head_dim=v_head_dim, scale=scale)
    if form == "decompressed":
        return mla_masked_decompressed(q_nope, q_pe, latent, kv_b_weight, sparse_mask(indices, latent.shape[1]), **args)
    return mla_sparse_absorbed(q_nope, q_pe, latent, kv_b_weight, indices, **args)
