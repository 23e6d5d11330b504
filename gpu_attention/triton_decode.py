"""Triton kernel for the absorbed MLA form over the paged latent cache (decode, and short prefills).

One KV head of width R + rope (K = [c_kv ‖ k_pe], V = c_kv) serves all query heads, so the
query rows of one sequence are (token, head) pairs, r = t·H + h, and a program takes BLOCK_H of
them: every key read from HBM is used BLOCK_H times. The KV axis is split so that a single
sequence still fills the GPU (FlashDecoding): stage 1 writes, per split, the normalised partial
output and its log-sum-exp; stage 2 merges the splits. With one split stage 1 writes the output.

Keys are found through the page table key by key (page = table[b, n // PAGE]), so any page size
and any page order work. fp8 pages are scaled per 128-value group on load. Scores use exp2 with
log2(e) folded into the scale; the lse written between the stages is in log2 units.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .latent_cache import FP8_GROUP, LatentCache

LOG2E = 1.4426950408889634


@triton.jit
def _absorbed_split_kernel(
        QL, QP, CACHE, SCALES, PAGE_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
        stride_qlb, stride_qlt, stride_qlh, stride_qpb, stride_qpt, stride_qph,
        stride_cp, stride_cn, stride_sp, stride_sn, stride_ptb,
        stride_ob, stride_or, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
        num_heads, num_new, split_len, qk_scale,
        RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
        GROUP: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    num_rows = num_new * num_heads
    rows = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < num_rows
    kv_len = tl.load(SEQ_LENS + b)
    q_pos = kv_len - num_new + rows // num_heads  # last key position each row may see
    last_row = tl.minimum(hb * BLOCK_H + BLOCK_H, num_rows) - 1
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len - num_new + last_row // num_heads + 1)

    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < RANK
    r_ok = offs_r < ROPE
    t_idx = rows // num_heads
    h_idx = rows % num_heads
    ql = tl.load(QL + b * stride_qlb + t_idx[:, None] * stride_qlt + h_idx[:, None] * stride_qlh + offs_c[None, :],
                 mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    qp = tl.load(QP + b * stride_qpb + t_idx[:, None] * stride_qpt + h_idx[:, None] * stride_qph + offs_r[None, :],
                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(PAGE_TABLE + b * stride_ptb + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        base = page * stride_cp + (offs_n % PAGE) * stride_cn
        c = tl.load(CACHE + base[:, None] + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        kr = tl.load(CACHE + base[:, None] + RANK + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if FP8:
            sbase = page * stride_sp + (offs_n % PAGE) * stride_sn
            c_s = tl.load(SCALES + sbase[:, None] + (offs_c // GROUP)[None, :], mask=n_ok[:, None] & c_ok[None, :],
                          other=0.0)
            r_s = tl.load(SCALES + sbase[:, None] + ((RANK + offs_r) // GROUP)[None, :],
                          mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            c = (c.to(tl.float32) * c_s).to(ql.dtype)
            kr = (kr.to(tl.float32) * r_s).to(ql.dtype)
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(qp, tl.trans(kr), input_precision=PRECISION)
        s = s * qk_scale
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if DIRECT:
        tl.store(OUT + b * stride_ob + rows[:, None] * stride_or + offs_c[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])
    else:
        tl.store(O_PART + b * stride_pb + rows[:, None] * stride_pr + split * stride_ps + offs_c[None, :], out,
                 mask=row_ok[:, None] & c_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE_PART + b * stride_lb + rows * stride_lr + split, lse, mask=row_ok)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, OUT, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
                    stride_ob, stride_or, num_splits,
                    RANK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(LSE_PART + b * stride_lb + r * stride_lr + offs_s, mask=offs_s < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    total = tl.sum(w, 0)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < RANK
    acc = tl.zeros([BLOCK_C], tl.float32)
    for s in range(num_splits):
        w_s = tl.exp2(tl.load(LSE_PART + b * stride_lb + r * stride_lr + s) - m)
        o = tl.load(O_PART + b * stride_pb + r * stride_pr + s * stride_ps + offs_c, mask=c_ok, other=0.0)
        acc += w_s * o
    acc = acc / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * stride_ob + r * stride_or + offs_c, acc.to(OUT.dtype.element_ty), mask=c_ok)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few splits, still exercises the combine


def default_config(num_heads: int, num_new: int, dtype: torch.dtype) -> dict:
    """Block shapes by query rows per sequence (tuned on the GPU machine, see bench-attn --sweep)."""
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory and registers
        return dict(block_h=16, block_n=16, num_warps=4, num_stages=1)
    # H100 sweep at 32K (benchmarks/results/2026-11-21-gpu-machine-h100-attn-decode.json): for 16
    # rows all configurations fell within 48-63 µs; for 128 rows 32x64 blocks with 4 warps were
    # fastest at every context (34-260 µs against 42-275 for 64x32 with 8 warps). Larger row
    # counts (absorbed prefill chunks) keep the 64-row blocks the crossover was measured with.
    rows = num_heads * num_new
    if rows <= 16:
        return dict(block_h=16, block_n=64, num_warps=4, num_stages=2)
    if rows <= 128:
        return dict(block_h=32, block_n=64, num_warps=4, num_stages=2)
    return dict(block_h=64, block_n=32, num_warps=8, num_stages=2)


def absorbed_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, layer: int, *, scale: float,
                    num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q_latent [B, T, H, R], q_pe [B, T, H, rope] (any strides, last dim contiguous) over the
    first B sequences of `cache` -> out_latent [B, T, H, R] in q_latent's dtype."""
    B, T, H, R = q_latent.shape
    rope = q_pe.shape[-1]
    assert R + rope == cache.latent_dim and q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert q_latent.dtype == q_pe.dtype and q_latent.dtype in (torch.bfloat16, torch.float16, torch.float32)
    cfg = default_config(H, T, q_latent.dtype)
    block_h = block_h or cfg["block_h"]
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    rows = T * H
    head_blocks = triton.cdiv(rows, block_h)
    max_len = cache.launch_len or max(cache.lens[:B])  # launch_len: fixed while a CUDA graph is captured
    if num_splits is None:  # about two waves of programs, splits of at least 256 keys
        num_splits = max(1, min(triton.cdiv(2 * _sm_count(torch.device(q_latent.device)), B * head_blocks),
                                triton.cdiv(max_len, 256)))
    split_len = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_len, split_len)
    data = cache.data[layer]
    scales = cache.scales[layer] if cache.fp8 else data
    out = torch.empty(B, rows, R, dtype=q_latent.dtype, device=q_latent.device)
    direct = num_splits == 1
    o_part = out if direct else torch.empty(B, rows, num_splits, R, dtype=torch.float32, device=out.device)
    lse_part = out if direct else torch.empty(B, rows, num_splits, dtype=torch.float32, device=out.device)
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    _absorbed_split_kernel[(B, head_blocks, num_splits)](
        q_latent, q_pe, data, scales, cache.page_table, cache.seq_lens, out, o_part, lse_part,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        data.stride(0), data.stride(1), scales.stride(0), scales.stride(1), cache.page_table.stride(0),
        out.stride(0), out.stride(1), o_part.stride(0), o_part.stride(1), 0 if direct else o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        H, T, split_len, scale * LOG2E,
        RANK=R, ROPE=rope, BLOCK_C=max(16, triton.next_power_of_2(R)), BLOCK_R=max(16, triton.next_power_of_2(rope)),
        PAGE=cache.page_size, BLOCK_H=block_h, BLOCK_N=block_n, FP8=cache.fp8, GROUP=FP8_GROUP, DIRECT=direct,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _combine_kernel[(B, rows)](
            o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), num_splits,
            RANK=R, BLOCK_C=max(16, triton.next_power_of_2(R)), BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4)
    return out.view(B, T, H, R)

