"""MLA attention over the latent cache in plain torch: the reference for every kernel.

Two forms of one computation (DESIGN.md):
- decompressed (MHA form): K/V rebuilt from the cache through kv_b_proj, 192/128-dim heads;
  fewer multiply-adds per (query, key) pair, best when many new tokens attend to the prefix.
- absorbed (MQA form): W_UK folded into the query, W_UV applied after; reads only the
  latent cache, best for decode.
Both use softmax scale qk_head_dim**-0.5 * mscale**2 (never 576**-0.5).

Shapes: q_nope [B, T, H, nope], q_pe [B, T, H, rope], latent [B, S, R + rope] where the T new
tokens sit at positions S-T .. S-1, kv_b_weight [H * (nope + v), R]. Output [B, T, H, v].
"""

from __future__ import annotations

import torch


def causal_mask(num_new: int, num_keys: int, device) -> torch.Tensor:
    """[T, S] bool, True where query t (at position S-T+t) may see key s."""
    q_pos = torch.arange(num_keys - num_new, num_keys, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= q_pos


def _softmax_attend(scores: torch.Tensor, num_new: int) -> torch.Tensor:
    """scores [B, H, T, S] fp32 -> probabilities, causal."""
    mask = causal_mask(num_new, scores.shape[-1], scores.device)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def mla_decompressed(q_nope, q_pe, latent, kv_b_weight, *, kv_lora_rank: int, v_head_dim: int, scale: float):
    B, T, H, nope = q_nope.shape
    c_kv, k_pe = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    kv = (c_kv @ kv_b_weight.T).view(B, -1, H, nope + v_head_dim)  # [B, S, H, nope + v]
    k_nope, v = kv.split([nope, v_head_dim], dim=-1)
    scores = torch.einsum("bthd,bshd->bhts", q_nope.float(), k_nope.float())
    scores += torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
    probs = _softmax_attend(scores * scale, T)
    return torch.einsum("bhts,bshv->bthv", probs.to(v.dtype), v)


def absorb_weights(kv_b_weight: torch.Tensor, *, num_heads: int, qk_nope_head_dim: int, v_head_dim: int):
    """kv_b_proj [H*(nope+v), R] -> w_uk [H, nope, R], w_uv [H, v, R]. Keep bf16/fp32: fp16 overflows."""
    assert kv_b_weight.dtype != torch.float16, "W_UK products overflow fp16 (seed 000): use bf16 or fp32"
    w = kv_b_weight.view(num_heads, qk_nope_head_dim + v_head_dim, -1)
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def mla_absorbed(q_nope, q_pe, latent, kv_b_weight, *, kv_lora_rank: int, v_head_dim: int, scale: float):
    B, T, H, nope = q_nope.shape
    w_uk, w_uv = absorb_weights(kv_b_weight, num_heads=H, qk_nope_head_dim=nope, v_head_dim=v_head_dim)
    c_kv, k_pe = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # [B, T, H, R]: one KV head of width R + rope
    scores = torch.einsum("bthr,bsr->bhts", q_latent.float(), c_kv.float())
    scores += torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
    probs = _softmax_attend(scores * scale, T)
    out_latent = torch.einsum("bhts,bsr->bthr", probs.to(c_kv.dtype), c_kv)
    return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
