"""nn.Linear with fp8 e4m3 weights in 128x128 blocks (DeepSeek-V3's checkpoint format).

`weight` [out, in] e4m3 and `weight_scale_inv` [ceil(out/128), ceil(in/128)] fp32 carry the
checkpoint's own tensor names, so the loader fills them as they are stored (no dequantize /
requantize). Forward: Triton kernels on CUDA (runtime/fp8_kernels.py); on the CPU a correct but
slow fallback (the weight dequantized to fp32 on every call, then an fp32 matmul). The output has
the activations' dtype.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import dequantize_fp8_blocks

BLOCK = (128, 128)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class FP8Linear(nn.Module):
    """y = x @ (weight * scale_inv per block).T, no bias (DeepSeek's projections have none)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rows, cols = -(-out_features // BLOCK[0]), -(-in_features // BLOCK[1])
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.empty(rows, cols, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda and _have_triton():
            from .fp8_kernels import fp8_linear

            y = fp8_linear(x2, self.weight, self.weight_scale_inv)
        else:
            y = F.linear(x2.float(), self.dequantized(torch.float32)).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in dtype (a new tensor on every call)."""
        if self.weight.is_cuda and _have_triton():
            from .fp8_kernels import weight_dequant

            return weight_dequant(self.weight, self.weight_scale_inv, dtype=dtype)
        return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, BLOCK, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {BLOCK[0]}x{BLOCK[1]}"


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear (as stored) or of an FP8Linear (dequantized to dtype):
    for code that reads a projection's weight instead of calling it (MLA's absorbed form)."""
    if isinstance(linear, FP8Linear):
        return linear.dequantized(dtype)
    return linear.weight


def to_fp8(model: nn.Module, unit: str, *, device: str, vector_dtype: torch.dtype) -> None:
    """Give the (meta) module `unit` of `model` storage on `device` with every nn.Linear inside it
    (or the unit itself) an FP8Linear; its other tensors (norms) in vector_dtype."""
    for name, module in list(model.get_submodule(unit).named_modules(prefix=unit)):
        if isinstance(module, nn.Linear):
            assert module.bias is None, f"{name}: fp8 linears carry no bias"
            model.set_submodule(name, FP8Linear(module.in_features, module.out_features, device="meta"))
    root = model.get_submodule(unit)
    root.to_empty(device=device)
    for module in root.modules():
        if isinstance(module, FP8Linear):
            continue
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = nn.Parameter(p.to(vector_dtype), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(vector_dtype)
