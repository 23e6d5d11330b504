"""The loader's hook: give each module of a meta-built model storage on its planned device and dtype.

Usage (what runtime/loader.py would do instead of `model.to_empty(device=...)` + `model.to(dtype)`):

    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    materialize(model, plan)          # every tensor now lives where the plan says, uninitialised
    for name, dest in checkpoint_names(model):
        dest.copy_(ckpt.read(name, tuple(dest.shape), dtype=dest.dtype))

Only placements the runtime runs today (`ops.runs_today`: torch ops in fp32/bf16/fp16) can be
assembled; the others are refused by name until their ops are wired in.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.errors import HmoeError

from .ops import runs_today
from .plan import Plan

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AssemblyError(HmoeError):
    pass


def materialize(model: nn.Module, plan: Plan) -> None:
    for p in plan.placements:
        if not runs_today(p.op, p.device, p.format) or p.gpu_experts or p.prefill:
            where = f"{p.rule.label}" if p.rule else "'defaults'"
            raise AssemblyError(f"{plan.rules.source}: {where} places {p.name} with op '{p.op}' on {p.device} in "
                                f"{p.format}{' with gpu_experts' if p.gpu_experts else ''}"
                                f"{' and a prefill override' if p.prefill else ''}, which the runtime cannot "
                                f"assemble yet; today it runs op torch in fp32, bf16 or fp16")
        module = model.get_submodule(p.name)
        module.to_empty(device=p.device)
        module.to(TORCH_DTYPES[p.format])
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:  # router math stays fp32 whatever the module's dtype (as the loader does)
            module.e_score_correction_bias = bias.float()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"the plan left tensors on the meta device: {left[:3]}"


def allocated_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors per device (what the plan's weight bytes must equal)."""
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        device = "cpu" if t.device.type == "cpu" else str(t.device)
        out[device] = out.get(device, 0) + t.numel() * t.element_size()
    return out
