"""Triton kernel for the lightning indexer's scores over the paged indexer-key cache.

The indexer is the only part of DSA decode whose work grows with the context: every cached key is
scored against the Hi query heads. One program takes one query and BLOCK_S keys: it loads the
query's [Hi, Di] heads once, reads the keys through the page table (fp8 pages scaled per
128-value group on load), and writes I(t, s) = sum_h w_h * ReLU(scale * q_h . k_s) for its keys, so
each key is read from HBM once and the [Hi, S] score matrix never exists. torch.topk then picks K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .latent_cache import FP8_GROUP, LatentCache


@triton.jit
def _index_scores_kernel(
        Q, W, CACHE, SCALES, PAGE_TABLE, SEQ_LENS, OUT,
        stride_qb, stride_qt, stride_qh, stride_wb, stride_wt, stride_cp, stride_cn, stride_sp, stride_sn,
        stride_ptb, stride_ob, stride_ot,
        num_new, back, num_heads, out_len, scale,
        DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
        PAGE: tl.constexpr, FP8: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr):
    bt = tl.program_id(0)
    b = bt // num_new
    t = bt % num_new
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    kv_len = tl.load(SEQ_LENS + b)
    q_pos = kv_len - back + t  # the query's own position: later keys are its future
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < num_heads
    d_ok = offs_d < DIM
    q = tl.load(Q + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(W + b * stride_wb + t * stride_wt + offs_h, mask=h_ok, other=0.0)
    s_ok = offs_s <= q_pos
    page = tl.load(PAGE_TABLE + b * stride_ptb + offs_s // PAGE, mask=s_ok, other=0)
    row = page.to(tl.int64) * stride_cp + (offs_s % PAGE) * stride_cn
    k = tl.load(CACHE + row[:, None] + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    if FP8:
        srow = page.to(tl.int64) * stride_sp + (offs_s % PAGE) * stride_sn
        k_scale = tl.load(SCALES + srow[:, None] + (offs_d // GROUP)[None, :], mask=s_ok[:, None] & d_ok[None, :],
                          other=0.0)
        k = k.to(tl.float32) * k_scale
    k = k.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_H, BLOCK_S] fp32
    scores = tl.maximum(scores * scale, 0.0)
    index = tl.sum(scores * w[:, None], axis=0)
    index = tl.where(s_ok, index, float("-inf"))
    tl.store(OUT + b * stride_ob + t * stride_ot + offs_s, index, mask=offs_s < out_len)


def index_scores(q: torch.Tensor, weights: torch.Tensor, cache: LatentCache, layer: int, *, scale: float,
                 back: int | None = None, block_s: int = 64, num_warps: int = 4) -> torch.Tensor:
    """q [B, T, Hi, Di] (last dim contiguous), weights [B, T, Hi] fp32 of the queries at positions
    len_b - back .. len_b - back + T - 1 of cache sequences 0..B-1 (back = T: the last T positions)
    -> I [B, T, max length] fp32, -inf on each query's future keys."""
    B, T, Hi, Di = q.shape
    assert Di == cache.latent_dim and q.stride(-1) == 1 and weights.stride(-1) == 1
    assert q.dtype in (torch.bfloat16, torch.float16, torch.float32) and weights.dtype == torch.float32
    S = max(cache.lens[:B])
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    data = cache.data[layer]
    scales = cache.scales[layer] if cache.fp8 else data
    _index_scores_kernel[(B * T, triton.cdiv(S, block_s))](
        q, weights, data, scales, cache.page_table, cache.seq_lens, out,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1), data.stride(0), data.stride(1),
        scales.stride(0), scales.stride(1), cache.page_table.stride(0), out.stride(0), out.stride(1),
        T, T if back is None else back, Hi, S, scale,
        DIM=Di, BLOCK_H=max(16, triton.next_power_of_2(Hi)), BLOCK_D=max(16, triton.next_power_of_2(Di)),
        BLOCK_S=block_s, PAGE=cache.page_size, FP8=cache.fp8, GROUP=FP8_GROUP,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps)
    return out
