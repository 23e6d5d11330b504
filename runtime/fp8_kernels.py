"""Triton kernels for fp8 e4m3 weights with 128x128 block scales (DeepSeek-V3's format), on CUDA.

Two GEMM paths for y = x @ W.T with W = w_fp8 * scale_inv per 128x128 block:
- `fp8_gemm` (prefill, many rows): activations quantized per 128-value group of each row to e4m3
  with one fp32 scale (`act_quant`), then fp8 tensor-core dots over K in steps of one 128-block,
  each step's product rescaled by the row's group scale and the weight block's scale (the
  technique of DeepSeek's inference kernel.py).
- `fp8_decode` (decode, up to 16 rows): memory-bound, so the activations stay bf16 (no fp8
  rounding): each fp8 weight tile is widened to bf16 in registers (exact: every e4m3 value is a
  bf16 value) for a bf16 tensor-core dot, and the block scale is applied to the dot's result; K
  is split over CTAs so even a 576-row projection fills the GPU, the partial sums reduced in
  torch (deterministic).
Plus `weight_dequant` (kv_b_proj for MLA's absorbed form, which needs W_UK/W_UV in bf16).
Launchers take tensors and keyword sizes only; shapes: x [M, K], w [N, K], scale_inv [ceil(N/128), ceil(K/128)].
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 128  # the checkpoint's scale block (both dims); one K step of the GEMM is one block
FP8_MAX = 448.0
# Rows up to this may take the decode kernel (one 16-row tensor-core tile: the weights are read
# once). Measured on the H100 (benchmarks/results/2026-11-21-gpu-machine-h100-fp8-gemm.json, GPU
# time, weights out of L2), M = 1..16: o_proj 7168x16384 55.6-62.6 us against the fp8 GEMM's 75-76
# and bf16 cuBLAS's 88-93; kv_a_proj 576x7168 11.1-12.6 us against the GEMM's 34; but q_b_proj
# 24576x1536 27-31 us against the GEMM's 18.3-18.9: when N alone gives every SM a 128-column
# tile, the GEMM's unsplit, pipelined K loop wins (see `takes_decode_kernel`).
DECODE_MAX_ROWS = 16
_DECODE_TARGET_CTAS = 1024  # ~8 per SM on an H100: enough loads in flight to stream HBM


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def takes_decode_kernel(M: int, N: int, device: torch.device) -> bool:
    """Decode kernel for few rows and weights too narrow to fill the GPU without splitting K."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return M <= DECODE_MAX_ROWS and triton.cdiv(N, 128) < _sm_count(index)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, stride_xm, num_kb, BLOCK_K: tl.constexpr):
    m, kb = tl.program_id(0), tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0  # FP8_MAX
    tl.store(y_ptr + m * K + offs, (x / s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * num_kb + kb, s)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/128)]): x ≈ q * scale per 128-value group."""
    M, K = x.shape
    assert x.stride(1) == 1, "rows must be contiguous"
    num_kb = triton.cdiv(K, BLOCK)
    y = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, num_kb, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(M, num_kb)](x, y, s, K, x.stride(0), num_kb, BLOCK_K=BLOCK)
    return y, s


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K, num_kb, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]  # W.T tile [BLOCK_K, BLOCK_N]
    a_s_ptrs = a_s_ptr + offs_m * num_kb
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * num_kb  # BLOCK_K == the scale block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(num_kb):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        a_s = tl.load(a_s_ptrs + kb, mask=m_ok, other=0.0)
        b_s = tl.load(b_s_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm_config(M: int) -> dict:
    """Tile sizes of the fp8 GEMM for M rows (BLOCK_N <= 128 keeps one weight scale row per column)."""
    if M <= 32:
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=128, num_warps=4, num_stages=4)
    if M < 256:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=4)
    # H100, o_proj at 512 rows: 242 us against 279-322 for 64x128/8/4, 64x64/4/4, 128x64/4/4
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, *, out_dtype: torch.dtype,
             config: dict | None = None) -> torch.Tensor:
    """x [M, K] (any float) @ dequant(w).T -> [M, N] in out_dtype, through fp8 tensor cores."""
    M, K = x.shape
    N = w.shape[0]
    cfg = config or gemm_config(M)
    a, a_s = act_quant(x)
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _fp8_gemm_kernel[grid](a, a_s, w, scale_inv, out, M, N, K, triton.cdiv(K, BLOCK), out.stride(0),
                           BLOCK_K=BLOCK, **cfg)
    return out


@triton.jit
def _fp8_decode_kernel(x_ptr, w_ptr, s_ptr, part_ptr, M, N, K, stride_xm, num_kb, kb_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(kb_per_split):
        kb = split * kb_per_split + i
        k = kb * BLOCK_K + offs_k
        k_ok = k < K  # also false past the last block (kb >= num_kb)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        s = tl.load(s_ptr + (offs_n // BLOCK_K) * num_kb + kb, mask=n_ok & (kb < num_kb), other=0.0)
        acc += tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16)) * s[None, :]
    parts = part_ptr + (split * M + offs_m)[:, None] * N + offs_n[None, :]
    tl.store(parts, acc, mask=m_ok[:, None] & n_ok[None, :])


def fp8_decode(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """Up to 16 rows: x [M, K] (as bf16) @ dequant(w).T -> [M, N]; weights read once, K split over CTAs."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= DECODE_MAX_ROWS and x.stride(1) == 1
    block_n = 128
    num_kb = triton.cdiv(K, BLOCK)
    tiles = triton.cdiv(N, block_n)
    kb_per_split = triton.cdiv(num_kb, max(1, min(num_kb, _DECODE_TARGET_CTAS // tiles)))
    splits = triton.cdiv(num_kb, kb_per_split)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    _fp8_decode_kernel[(tiles, splits)](x, w, scale_inv, part, M, N, K, x.stride(0), num_kb, kb_per_split,
                                        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=BLOCK, num_warps=4, num_stages=4)
    return (part[0] if splits == 1 else part.sum(0)).to(out_dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the decode kernel (bf16 activations) for few rows of a narrow
    weight, else the fp8 GEMM (e4m3 activations)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    if takes_decode_kernel(x.shape[0], w.shape[0], x.device):
        return fp8_decode(x, w, scale_inv, out_dtype=x.dtype)
    return fp8_gemm(x, w, scale_inv, out_dtype=x.dtype)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, num_kb, BLOCK_K: tl.constexpr):
    nb, kb = tl.program_id(0), tl.program_id(1)
    offs_n = nb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = offs_n[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + ptrs, mask=mask, other=0.0).to(tl.float32) * tl.load(s_ptr + nb * num_kb + kb)
    tl.store(out_ptr + ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """w [N, K] e4m3 -> [N, K] in dtype (one pass, one block per CTA)."""
    N, K = w.shape
    out = torch.empty(N, K, dtype=dtype, device=w.device)
    num_kb = triton.cdiv(K, BLOCK)
    _dequant_kernel[(triton.cdiv(N, BLOCK), num_kb)](w, scale_inv, out, N, K, num_kb, BLOCK_K=BLOCK)
    return out
