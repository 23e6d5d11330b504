"""The absorbed MLA decode kernels for Hopper: latent tiles by TMA (tensor descriptors), pipelined.

Same math and the same split / combine as triton_decode's kernel (read that docstring first); what
differs is how a tile reaches the tensor cores and which dimension the products put on wgmma's M.
A tile is three TMA copies straight into shared memory ([BLOCK_N, 256] twice for c_kv, [BLOCK_N,
64] for k_pe), multi-buffered by Triton's pipeliner (num_stages); both products read it there. The
generic kernel gets there too (cp.async, 2 stages, no spills at 64 rows x 8 warps), but with one
16-byte copy per thread per chunk, masks and per-row addresses; TMA needs one copy per box.

- rows-major (`_absorbed_tma_kernel`, kernel "tma"): scores [rows, keys] = q_nope_lat·c0ᵀ +
  q_nope_lat'·c1ᵀ + q_pe·k_peᵀ, out += P·c0 ‖ P·c1 (P in bf16, two [rows, 256] accumulators).
  At 64 rows x 8 warps Triton lays the score product out as warpsPerCTA [8, 1]: both warpgroups
  compute the same 64 score rows (the product feeds another dot, so it keeps the warps on M).
- keys-major (`_absorbed_tma_keys_kernel`, kernel "tma_keys"): sᵀ [keys, rows] = c·qᵀ, outᵀ +=
  cᵀ·pᵀ ([256, rows] twice): M is 64 keys or 256 value columns, so no warpgroup repeats another's
  work, and the tile is the A operand of both products straight from shared memory.

Measured on the H200 (gpu_attention/NOTES.md): 5-11% faster than the generic kernel at 8K-128K;
the 128-head rate stays ≈240 TFLOP/s whichever layout, so the per-tile chain (scores, softmax,
rescale, values, one CTA per SM) is the limit, not tensor throughput nor the loads.

Both need what TMA needs: a bf16/fp16 cache whose pages hold whole tiles (page_size % BLOCK_N ==
0) and a latent of 2·HALF + ROPE columns with HALF ≤ 256 and ROPE powers of two (DeepSeek: 256 +
256 + 64). `applies()` says whether a call qualifies; triton_decode falls back to the generic
kernel otherwise. Keys past a sequence's end inside its last tile are read (TMA has no row mask)
and weighted 0; LatentCache zero-fills its pages, so they are finite.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_rows import split_rows

TMA_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _queries(QL, QP, b, rows, row_ok, num_heads, stride_qlb, stride_qlt, stride_qlh, stride_qpb, stride_qpt,
             stride_qph, HALF: tl.constexpr, ROPE: tl.constexpr):
    """The rows' absorbed queries: both halves of q_nope·W_UK ([rows, HALF] each) and q_pe [rows, ROPE]."""
    offs_c = tl.arange(0, HALF)
    t_idx = rows // num_heads
    h_idx = rows % num_heads
    q_row = QL + b * stride_qlb + t_idx * stride_qlt + h_idx * stride_qlh
    q0 = tl.load(q_row[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_row[:, None] + HALF + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    qp = tl.load(QP + b * stride_qpb + t_idx[:, None] * stride_qpt + h_idx[:, None] * stride_qph
                 + tl.arange(0, ROPE)[None, :], mask=row_ok[:, None], other=0.0)
    return q0, q1, qp


@triton.jit
def _absorbed_tma_kernel(
        QL, QP, C_DESC, R_DESC, PAGE_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
        stride_qlb, stride_qlt, stride_qlh, stride_qpb, stride_qpt, stride_qph, stride_ptb,
        stride_ob, stride_or, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
        num_heads, num_new, split_len, qk_scale,
        HALF: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, DIRECT: tl.constexpr):
    # head blocks vary fastest: the programs that read the same KV tiles start together (L2 reuse)
    hb = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows, row_ok, q_pos, lo, hi = split_rows(SEQ_LENS, b, hb, split, num_heads, num_new, split_len, BLOCK_H)
    q0, q1, qp = _queries(QL, QP, b, rows, row_ok, num_heads, stride_qlb, stride_qlt, stride_qlh,
                          stride_qpb, stride_qpt, stride_qph, HALF, ROPE)
    offs_c = tl.arange(0, HALF)
    offs_t = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, HALF], tl.float32)
    acc1 = tl.zeros([BLOCK_H, HALF], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        page = tl.load(PAGE_TABLE + b * stride_ptb + n0 // PAGE)
        row0 = page * PAGE + n0 % PAGE  # the tile's first row in the [pages·PAGE, latent] view
        c0 = C_DESC.load([row0, 0])
        c1 = C_DESC.load([row0, HALF])
        kr = R_DESC.load([row0, 2 * HALF])
        s = tl.dot(q0, tl.trans(c0))
        s = tl.dot(q1, tl.trans(c1), s)
        s = tl.dot(qp, tl.trans(kr), s)
        offs_n = n0 + offs_t
        s = tl.where((offs_n[None, :] < hi) & (offs_n[None, :] <= q_pos[:, None]), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(c0.dtype)
        acc0 = tl.dot(p, c0, acc0 * alpha[:, None])
        acc1 = tl.dot(p, c1, acc1 * alpha[:, None])
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    ok = row_ok[:, None]
    if DIRECT:
        dst = OUT + b * stride_ob + rows[:, None] * stride_or + offs_c[None, :]
        tl.store(dst, (acc0 / safe_l[:, None]).to(OUT.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (acc1 / safe_l[:, None]).to(OUT.dtype.element_ty), mask=ok)
    else:
        dst = O_PART + b * stride_pb + rows[:, None] * stride_pr + split * stride_ps + offs_c[None, :]
        tl.store(dst, acc0 / safe_l[:, None], mask=ok)
        tl.store(dst + HALF, acc1 / safe_l[:, None], mask=ok)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE_PART + b * stride_lb + rows * stride_lr + split, lse, mask=row_ok)


@triton.jit
def _absorbed_tma_keys_kernel(
        QL, QP, C_DESC, R_DESC, PAGE_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
        stride_qlb, stride_qlt, stride_qlh, stride_qpb, stride_qpt, stride_qph, stride_ptb,
        stride_ob, stride_or, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
        num_heads, num_new, split_len, qk_scale,
        HALF: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, DIRECT: tl.constexpr):
    """The same, transposed: keys are the rows of the score tile (sᵀ = c·qᵀ, [BLOCK_N, BLOCK_H])
    and value columns the rows of the accumulator (outᵀ += cᵀ·pᵀ, [HALF, BLOCK_H] twice), so that
    the wgmma M dimension is 64 keys or 256 columns, never fewer than the warps cover: with 64
    query rows as M and 8 warps, Triton gives both warpgroups the same score rows (the QK product
    is computed twice). The tile stays in shared memory as both products' A operand."""
    hb = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows, row_ok, q_pos, lo, hi = split_rows(SEQ_LENS, b, hb, split, num_heads, num_new, split_len, BLOCK_H)
    q0, q1, qp = _queries(QL, QP, b, rows, row_ok, num_heads, stride_qlb, stride_qlt, stride_qlh,
                          stride_qpb, stride_qpt, stride_qph, HALF, ROPE)
    offs_c = tl.arange(0, HALF)
    offs_t = tl.arange(0, BLOCK_N)
    q0t = tl.trans(q0)
    q1t = tl.trans(q1)
    qpt = tl.trans(qp)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([HALF, BLOCK_H], tl.float32)  # outᵀ, value columns 0..HALF
    acc1 = tl.zeros([HALF, BLOCK_H], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        page = tl.load(PAGE_TABLE + b * stride_ptb + n0 // PAGE)
        row0 = page * PAGE + n0 % PAGE
        c0 = C_DESC.load([row0, 0])
        c1 = C_DESC.load([row0, HALF])
        kr = R_DESC.load([row0, 2 * HALF])
        s = tl.dot(c0, q0t)
        s = tl.dot(c1, q1t, s)
        s = tl.dot(kr, qpt, s)
        offs_n = n0 + offs_t
        s = tl.where((offs_n[:, None] < hi) & (offs_n[:, None] <= q_pos[None, :]), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        p = p.to(c0.dtype)
        acc0 = tl.dot(tl.trans(c0), p, acc0 * alpha[None, :])
        acc1 = tl.dot(tl.trans(c1), p, acc1 * alpha[None, :])
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    ok = row_ok[None, :]
    if DIRECT:
        dst = OUT + b * stride_ob + rows[None, :] * stride_or + offs_c[:, None]
        tl.store(dst, (acc0 / safe_l[None, :]).to(OUT.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (acc1 / safe_l[None, :]).to(OUT.dtype.element_ty), mask=ok)
    else:
        dst = O_PART + b * stride_pb + rows[None, :] * stride_pr + split * stride_ps + offs_c[:, None]
        tl.store(dst, acc0 / safe_l[None, :], mask=ok)
        tl.store(dst + HALF, acc1 / safe_l[None, :], mask=ok)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE_PART + b * stride_lb + rows * stride_lr + split, lse, mask=row_ok)


def applies(q_latent: torch.Tensor, cache, *, rank: int, rope: int, block_n: int) -> bool:
    """Whether the TMA kernel can run this call: Hopper or later, a 16-bit cache with whole tiles per
    page, a latent split into two power-of-two halves (≤ 256 columns, a TMA box) plus a power-of-two
    rope part."""
    half = rank // 2
    # Triton's interpreter runs the kernel on CPU tensors, in fp32 there (its bf16 dots are wrong): tests
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and not q_latent.is_cuda
    return ((interpreted or (q_latent.is_cuda and torch.cuda.get_device_capability(q_latent.device)[0] >= 9))
            and (cache.data.dtype in TMA_DTYPES or (interpreted and cache.data.dtype == torch.float32))
            and q_latent.dtype == cache.data.dtype
            and cache.page_size % block_n == 0 and rank == 2 * half
            and half == triton.next_power_of_2(half) and 16 <= half <= 256
            and rope == triton.next_power_of_2(rope) and 16 <= rope <= 256
            and cache.data.is_contiguous())


def launch(q_latent, q_pe, cache, layer: int, out, o_part, lse_part, *, qk_scale: float, split_len: int,
           num_splits: int, block_h: int, block_n: int, num_warps: int, num_stages: int,
           keys_major: bool = False) -> None:
    """Stage 1 over grid (head blocks, B, splits); the caller allocated the outputs and runs the combine."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, T, H, R = q_latent.shape
    rope = q_pe.shape[-1]
    data = cache.data[layer]
    flat = data.view(-1, data.shape[-1])  # [pages·page_size, latent]: a tile is block_n consecutive rows
    c_desc = TensorDescriptor.from_tensor(flat, [block_n, R // 2])
    r_desc = TensorDescriptor.from_tensor(flat, [block_n, rope])
    direct = num_splits == 1
    kernel = _absorbed_tma_keys_kernel if keys_major else _absorbed_tma_kernel
    kernel[(triton.cdiv(T * H, block_h), B, num_splits)](
        q_latent, q_pe, c_desc, r_desc, cache.page_table, cache.seq_lens, out, o_part, lse_part,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        cache.page_table.stride(0),
        out.stride(0), out.stride(1), o_part.stride(0), o_part.stride(1), 0 if direct else o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        H, T, split_len, qk_scale,
        HALF=R // 2, ROPE=rope, PAGE=cache.page_size, BLOCK_H=block_h, BLOCK_N=block_n, NUM_STAGES=num_stages,
        DIRECT=direct, num_warps=num_warps)
