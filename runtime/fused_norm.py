"""RMSNorm in one Triton kernel on the GPU.

The torch form (float copy, square, mean, add, rsqrt, multiply, cast back, multiply by the weight)
launches eight kernels per call; a decode step calls it 3-4 times per layer, and at one token each
of those kernels is a few microseconds of launch-bound work (`hmoe bench --breakdown` counted 104
of a 4-layer V2-Lite step's ~250 GPU kernels there). Same math as `runtime.model.RMSNorm`: the
row's mean square in fp32, x * rsqrt(mean + eps) rounded to x's dtype, then times the weight in
the weight's and x's promoted dtype (torch multiplies bf16 in fp32 and rounds once, as here). Only
the order of the sum differs from torch's reduction.
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
