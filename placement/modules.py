"""The placeable modules of a model and their tensors' shapes, from the config alone.

The model is built on the meta device (no memory, no weights read), then walked: a module of a
known kind is one placement unit (rules match its dotted name) and is not split further; a
container (layers, the MoE block) is walked into. Units, in model order:

    model.embed_tokens                                         embed
    model.layers.N.self_attn                                   attention
    model.layers.N.mlp                (dense layers)           mlp
    model.layers.N.mlp.gate | .experts | .shared_experts       gate | experts | shared_experts
    model.layers.N.input_layernorm | .post_attention_layernorm norm
    model.norm                                                 norm
    lm_head                                                    lm_head
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from runtime.config import ModelConfig
from runtime.model import MLA, DeepseekForCausalLM, RMSNorm
from runtime.moe import MLP, Router, TorchExperts

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorShape:
    name: str  # relative to the unit, e.g. "q_a_proj.weight"
    shape: tuple[int, ...]
    keep_fp32: bool = False  # router math stays fp32 (the loader keeps this bias in fp32)


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str
    layer: int | None
    tensors: tuple[TensorShape, ...]

    @property
    def suffix(self) -> str:
        """The name without `model.layers.N.` (what explain groups layers by)."""
        return _LAYER.sub("", self.name, count=1) if self.layer is not None else self.name


def kind_of(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embed"
    if isinstance(module, MLA):
        return "attention"
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, Router):
        return "gate"
    if isinstance(module, TorchExperts):
        return "experts"
    if isinstance(module, MLP):
        return "shared_experts" if name.endswith(".shared_experts") else "mlp"
    if isinstance(module, nn.Linear) and name == "lm_head":
        return "lm_head"
    return None


def units_of(model: nn.Module) -> tuple[Unit, ...]:
    units: list[Unit] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            kind = kind_of(name, child)
            if kind is None:
                # a container must not hold weights of its own, or the plan would miss them
                assert not list(child.parameters(recurse=False)), f"{name} holds weights but is no placement unit"
                walk(name + ".", child)
                continue
            tensors = tuple(TensorShape(n, tuple(t.shape), keep_fp32=n == "e_score_correction_bias")
                            for n, t in list(child.named_parameters()) + list(child.named_buffers()))
            m = _LAYER.match(name + ".")
            units.append(Unit(name, kind, int(m[1]) if m else None, tensors))

    assert not list(model.parameters(recurse=False))
    walk("", model)
    return tuple(units)


@functools.lru_cache(maxsize=8)
def model_units(cfg: ModelConfig) -> tuple[Unit, ...]:
    with torch.device("meta"):
        return units_of(DeepseekForCausalLM(cfg))
