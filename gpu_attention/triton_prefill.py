"""Triton flash-attention kernel for the decompressed MLA form (prefill with many new tokens).

Per head: scores = q_nope·k_nope (128) + q_pe·k_pe (64), values v (128). k_nope and v are one
decompressed chunk `kv = c_kv @ kv_b_proj.T` viewed [B, C, H, nope+v] (no copies); k_pe is shared
by all heads and read straight from the latent chunk [B, C, R+rope]. Causal against the cached
prefix: query t of sequence b sits at position len_b-T+t and sees keys up to it. The kernel covers
one chunk of key positions [kv_begin, kv_begin+C) and returns the normalised output with its
log-sum-exp (log2 units); with ACCUM it merges them into the output and lse of the chunks before
(each program owns its rows, so the merge is in place), so a long prefix is walked in chunks that
bound the decompressed K/V buffer while the output stays one fp32 tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import LOG2E


@triton.jit
def _prefill_kernel(
        QN, QP, KN, V, KP, SEQ_LENS, OUT, LSE,
        stride_qnb, stride_qnt, stride_qnh, stride_qpb, stride_qpt, stride_qph,
        stride_kb, stride_kc, stride_kh, stride_vb, stride_vc, stride_vh, stride_pb, stride_pc,
        stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
        num_heads, num_new, kv_begin, chunk_len, qk_scale,
        NOPE: tl.constexpr, ROPE: tl.constexpr, VD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACCUM: tl.constexpr,
        PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_new
    kv_len = tl.load(SEQ_LENS + b)
    q_pos = kv_len - num_new + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_v = tl.arange(0, BLOCK_V)
    qn = tl.load(QN + b * stride_qnb + offs_m[:, None] * stride_qnt + h * stride_qnh + offs_d[None, :],
                 mask=m_ok[:, None] & (offs_d < NOPE)[None, :], other=0.0)
    qp = tl.load(QP + b * stride_qpb + offs_m[:, None] * stride_qpt + h * stride_qph + offs_r[None, :],
                 mask=m_ok[:, None] & (offs_r < ROPE)[None, :], other=0.0)
    # keys this block can see: up to its last query's position, within the chunk
    last_pos = kv_len - num_new + tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_new) - 1
    hi = tl.minimum(chunk_len, last_pos + 1 - kv_begin)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kn = tl.load(KN + b * stride_kb + offs_n[:, None] * stride_kc + h * stride_kh + offs_d[None, :],
                     mask=n_ok[:, None] & (offs_d < NOPE)[None, :], other=0.0)
        kp = tl.load(KP + b * stride_pb + offs_n[:, None] * stride_pc + offs_r[None, :],
                     mask=n_ok[:, None] & (offs_r < ROPE)[None, :], other=0.0)
        s = tl.dot(qn, tl.trans(kn), input_precision=PRECISION)
        s += tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
        s = s * qk_scale
        s = tl.where(n_ok[None, :] & ((kv_begin + offs_n)[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vc + h * stride_vh + offs_v[None, :],
                    mask=n_ok[:, None] & (offs_v < VD)[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o_ptrs = OUT + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_v[None, :]
    o_mask = m_ok[:, None] & (offs_v < VD)[None, :]
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
    if ACCUM:  # merge with the chunks before: weights 2^(lse - max), -inf for rows that saw nothing
        prev_o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        prev_lse = tl.load(lse_ptrs, mask=m_ok, other=float("-inf"))
        m = tl.maximum(prev_lse, lse)
        m = tl.where(m == float("-inf"), 0.0, m)
        w_prev = tl.exp2(prev_lse - m)
        w_new = tl.exp2(lse - m)
        total = w_prev + w_new
        safe_t = tl.where(total > 0, total, 1.0)
        out = (prev_o * w_prev[:, None] + out * w_new[:, None]) / safe_t[:, None]
        lse = tl.where(total > 0, m + tl.log2(safe_t), float("-inf"))
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse, mask=m_ok)


def default_config(head_dim: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)


def prefill_chunk(q_nope, q_pe, k_nope, v, k_pe, seq_lens: torch.Tensor, *, kv_begin: int, scale: float,
                  out: torch.Tensor | None = None, lse: torch.Tensor | None = None, accumulate: bool = False,
                  block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None):
    """q_nope [B, T, H, nope], q_pe [B, T, H, rope], k_nope [B, C, H, nope], v [B, C, H, vd],
    k_pe [B, C, rope] for key positions kv_begin.. ; seq_lens [B] int32 on the device (length after
    the new tokens) -> (out [B, T, H, vd], lse [B, H, T] fp32 in log2 units). With accumulate, out and
    lse hold the earlier chunks' result (out in fp32) and are updated in place."""
    B, T, H, nope = q_nope.shape
    C, vd, rope = k_nope.shape[1], v.shape[-1], k_pe.shape[-1]
    for x in (q_nope, q_pe, k_nope, v, k_pe):
        assert x.stride(-1) == 1, "last dims must be contiguous"
    assert q_nope.dtype == k_nope.dtype == q_pe.dtype == k_pe.dtype == v.dtype
    assert not accumulate or (out is not None and lse is not None)
    cfg = default_config(nope + rope, q_nope.dtype)
    block_m, block_n = block_m or cfg["block_m"], block_n or cfg["block_n"]
    if out is None:
        out = torch.empty(B, T, H, vd, dtype=q_nope.dtype, device=q_nope.device)
    if lse is None:
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q_nope.device)
    _prefill_kernel[(triton.cdiv(T, block_m), B * H)](
        q_nope, q_pe, k_nope, v, k_pe, seq_lens, out, lse,
        q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        k_nope.stride(0), k_nope.stride(1), k_nope.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_pe.stride(0), k_pe.stride(1), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        H, T, kv_begin, C, scale * LOG2E,
        NOPE=nope, ROPE=rope, VD=vd, BLOCK_D=max(16, triton.next_power_of_2(nope)),
        BLOCK_R=max(16, triton.next_power_of_2(rope)), BLOCK_V=max(16, triton.next_power_of_2(vd)),
        BLOCK_M=block_m, BLOCK_N=block_n, ACCUM=accumulate,
        PRECISION="ieee" if q_nope.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
    return out, lse
