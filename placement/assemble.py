"""Assembly: the model built from a plan. Each module gets its op, device and format.

The loader (runtime/loader.py) builds the model on the meta device and then:

    check_runnable(plan)              # before anything is read: refuse what the runtime cannot run yet
    materialize(model, plan)          # torch-op modules get storage on their device, in their dtype
    ... fill them from the checkpoint; build each layer's routed experts (runtime/experts_builder.py)
    connect(model, plan)              # activations follow the modules across devices

Modules on other devices than their neighbours get hooks that move their inputs to their device
and their outputs back, and each decoder layer keeps its residual stream on its attention's
device; a plan on one device gets no hooks at all.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from runtime.errors import HmoeError
from runtime.fp8_linear import to_fp8

from .plan import Plan

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_MODULE_OPS = ("torch", "mla")  # ops the runtime's torch modules implement (mla: their GPU kernels)


class AssemblyError(HmoeError):
    pass


def check_runnable(plan: Plan) -> None:
    """Refuse, by rule and module, any placement whose op or feature the runtime cannot run yet."""
    gaps = plan.gaps()
    for p in plan.placements:
        missing = gaps[p.name]
        if missing:
            where = p.rule.label if p.rule else "'defaults'"
            raise AssemblyError(f"{plan.rules.source}: {where} places {p.name} with {' and '.join(missing)}, "
                                f"which the runtime cannot run yet; `hmoe rules explain` shows every such module")


def materialize(model: nn.Module, plan: Plan) -> None:
    """Storage for every module a torch-module op (torch, mla) runs, on its device and in its dtype (uninitialised).
    Modules of other ops (the routed experts' `jit`) are built by the loader instead; the loader
    has run `check_runnable` before reading anything."""
    for p in plan.placements:
        if p.op not in TORCH_MODULE_OPS:
            continue
        if p.format == "fp8":  # its linears become FP8Linear (e4m3 + block scales), its norms the compute dtype
            to_fp8(model, p.name, device=p.device, vector_dtype=TORCH_DTYPES[plan.base])
            continue
        module = model.get_submodule(p.name)
        module.to_empty(device=p.device)
        module.to(TORCH_DTYPES[p.format])
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:  # router math stays fp32 whatever the module's dtype
            module.e_score_correction_bias = bias.float()
    torch_units = [p.name for p in plan.placements if p.op in TORCH_MODULE_OPS]
    left = [f"{unit}.{n}" for unit in torch_units for n, t in _tensors(model.get_submodule(unit)) if t.is_meta]
    assert not left, f"the plan left tensors on the meta device: {left[:3]}"


def connect(model: nn.Module, plan: Plan) -> None:
    """Hooks that carry activations between the plan's devices, only where they change device: each
    decoder layer's residual stream lives on its attention's device, so a module there needs none
    (the decode step pays for no hook it does not need); a one-device plan gets no hooks at all."""
    if len({p.device for p in plan.placements}) == 1:
        return
    attention = plan.attention_devices
    for p in plan.placements:
        module = model.get_submodule(p.name)
        if p.unit.layer is not None and p.device == attention[p.unit.layer]:
            continue  # its inputs are on its device already
        if getattr(module, "moves_its_own_data", False):  # e.g. CPU experts called stream-ordered from a GPU
            continue
        module.register_forward_pre_hook(functools.partial(_inputs_to, torch.device(p.device)), with_kwargs=True)
        module.register_forward_hook(_outputs_back)
    previous = None
    for i, layer in enumerate(model.model.layers):
        if attention[i] != previous:  # the first layer (the embedding answers on its caller's device) and each change
            layer.register_forward_pre_hook(functools.partial(_inputs_to, torch.device(attention[i]), remember=False),
                                            with_kwargs=True)
        previous = attention[i]


def cache_options(plan: Plan) -> list[dict]:
    """Per layer, the latent cache's storage dtype and page size, as the attention rules set them."""
    attention = sorted((p.unit.layer, p) for p in plan.placements if p.unit.kind == "attention")
    return [{"dtype": p.cache_dtype, "page_size": p.page_size} for _, p in attention]


def allocated_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights per device (what the plan's weight bytes must equal): torch
    tensors, plus the packed buffers of CPU experts (anything with `nbytes_by_device()`)."""
    out: dict[str, int] = {}

    def add(device: str, n: int) -> None:
        out[device] = out.get(device, 0) + n

    for module in model.modules():
        for _, t in _tensors(module, recurse=False):
            add("cpu" if t.device.type == "cpu" else str(t.device), t.numel() * t.element_size())
        if hasattr(module, "nbytes_by_device"):
            for device, n in module.nbytes_by_device().items():
                add(device, n)
    return out


def _tensors(module: nn.Module, recurse: bool = True):
    return list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))


def _inputs_to(device: torch.device, module, args, kwargs, remember: bool = True):
    if remember:  # where the caller keeps its activations: outputs go back there
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        module._hmoe_caller_device = first.device if first is not None else device
    return _move(args, device), _move(kwargs, device)


def _outputs_back(module, args, output):
    return _move(output, module._hmoe_caller_device)


def _move(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        # host -> GPU may be asynchronous (stream-ordered); GPU -> host must be complete when read
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj
