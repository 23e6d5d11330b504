"""Small decode-step ops in one Triton kernel each on the GPU: RMSNorm and the RoPE rotation.

At one token a decode step is launch-bound: each torch op is a kernel of a few microseconds.
`hmoe bench --breakdown` counted ~250 GPU kernels in a 4-layer V2-Lite step, 104 of them in
RMSNorm's eight-kernel torch form (float copy, square, mean, add, rsqrt, multiply, cast back,
multiply by the weight), 3-4 calls per layer; RoPE is ~8 more per call, two calls per layer.

RMSNorm: the math of `runtime.model.RMSNorm`: the row's mean square in fp32, x * rsqrt(mean + eps)
rounded to x's dtype, then times the weight in their promoted dtype (torch multiplies bf16 in fp32
and rounds once, as here); only the order of the sum differs from torch's reduction.
RoPE (`runtime.rope.RotaryTables.apply`): fp32 math reading x through its strides (q_pe and k_pe
are views into the projections' outputs); the compiler may fuse a product and a sum into one FMA,
so a result can differ from torch's in the last fp32 bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_out, BLOCK: tl.constexpr,
                     X_DTYPE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * r).to(X_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] on a GPU, weight [D] -> [..., D] in torch.promote_types(weight, x)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    BLOCK = triton.next_power_of_2(D)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, D, eps, rows.stride(0), out.stride(0), BLOCK=BLOCK,
                                       X_DTYPE=_TL[x.dtype], num_warps=min(16, max(1, BLOCK // 512)))
    return out.view(*x.shape[:-1], D)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, sxb, sxt, sxh, HALF: tl.constexpr,
                 INTERLEAVE: tl.constexpr):
    pid = tl.program_id(0)  # one (b, t, head) vector per program
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    i = tl.arange(0, HALF)
    src = x_ptr + b * sxb + t * sxt + h * sxh
    if INTERLEAVE:  # pairs (x0, x1), (x2, x3), ...
        lo, hi = 2 * i, 2 * i + 1
    else:  # halves
        lo, hi = i, i + HALF
    a = tl.load(src + lo).to(tl.float32)
    c = tl.load(src + hi).to(tl.float32)
    cos = tl.load(cos_ptr + t * HALF + i)
    sin = tl.load(sin_ptr + t * HALF + i)
    dst = out_ptr + pid * (2 * HALF)
    dtype = out_ptr.dtype.element_ty
    tl.store(dst + lo, (a * cos - c * sin).to(dtype))
    tl.store(dst + hi, (c * cos + a * sin).to(dtype))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, T, heads, dim] on a GPU (any strides, the last one 1), cos/sin [T, dim/2] fp32 ->
    rotated, contiguous, in x's dtype."""
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    _rope_kernel[(B * T * H,)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), HALF=D // 2,
                               INTERLEAVE=interleave, num_warps=1)
    return out
