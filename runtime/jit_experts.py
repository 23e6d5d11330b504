"""Routed experts computed by cpu_experts' JIT kernels, behind the model's experts interface."""

from __future__ import annotations

import torch
from torch import nn

from .errors import HmoeError
from .moe import TorchExperts

FORMATS = ("bf16", "q8_0", "q4_0", "q4_k", "q6_k")


class JitExperts(nn.Module):
    """One MoE layer's routed experts in packed CPU memory; forward(hidden[T, H], ids[T, k], w[T, k])."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = self.engine.forward(hidden.float(), topk_ids, topk_weights.float())
        return out.to(hidden.dtype)


def jit_experts_factory(fmt: str, *, threads: int | None = None, numa: str = "interleave"):
    """An `ExpertsFactory` for `load_model`: quantize each layer's experts to `fmt` and pack them."""
    from cpu_experts.experts import CPUExperts

    def make(layer: int, experts: TorchExperts) -> JitExperts:
        try:
            with torch.no_grad():
                engine = CPUExperts.from_tensors(experts.gate_proj.float(), experts.up_proj.float(),
                                                 experts.down_proj.float(), fmt=fmt, threads=threads, numa=numa)
        except ValueError as e:  # shapes the format cannot hold, e.g. q4_k needs rows of 256
            raise HmoeError(f"routed experts of layer {layer} cannot run as {fmt}: {e}") from None
        return JitExperts(engine)

    return make
