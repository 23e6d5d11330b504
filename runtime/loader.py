"""Build the model on the meta device and fill it tensor by tensor from the checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .errors import CheckpointError
from .model import DeepseekForCausalLM
from .moe import MoE, TorchExperts

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def module_tensors(module: nn.Module, prefix: str, tie_word_embeddings: bool = False
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint tensor name, destination tensor) for every weight of `module` named `prefix`.

    Stacked routed experts [E, ...] are filled from the per-expert tensors `experts.{e}.*.weight`.
    The MTP layer (`model.layers.{num_hidden_layers}.*`) is never asked for, so it is skipped.
    """
    stacked = set()
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, TorchExperts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                param = getattr(sub, proj)
                stacked.add(param)
                for e in range(param.shape[0]):
                    yield f"{name}.{e}.{proj}.weight", param[e]
    for name, tensor in list(module.named_parameters(prefix=prefix)) + list(module.named_buffers(prefix=prefix)):
        if any(tensor is p for p in stacked):
            continue
        if name == "lm_head.weight" and tie_word_embeddings:
            name = "model.embed_tokens.weight"
        yield name, tensor


def checkpoint_names(model: DeepseekForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    return module_tensors(model, "", model.cfg.tie_word_embeddings)


def resolve_dtype(cfg: ModelConfig, dtype: str) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype (bf16 for FP8 checkpoints)."""
    if dtype == "auto":
        return DTYPE_NAMES.get(cfg.torch_dtype, torch.bfloat16)
    return DTYPE_NAMES[dtype]


# Builds the module that computes one MoE layer's routed experts from the loaded reference
# weights (e.g. cpu_experts' JIT kernels); called once per layer, so only one layer's
# reference weights exist at a time.
ExpertsFactory = Callable[[int, TorchExperts], nn.Module]


def load_model(model_dir: str | Path, *, dtype: str = "auto", device: str = "cpu", progress: bool | None = None,
               experts_factory: ExpertsFactory | None = None) -> DeepseekForCausalLM:
    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir, cfg.fp8_block_size)
    torch_dtype = resolve_dtype(cfg, dtype)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    # Routed experts are materialised layer by layer, after the rest of the model.
    moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    pending = []
    for i, moe in moe_layers:
        pending.append((i, moe, moe.experts))
        moe.experts = nn.Identity()
    model.to_empty(device=device)
    model.to(torch_dtype)
    for module in model.modules():  # router math stays fp32 (transformers keeps the bias in fp32)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    show = sys.stderr.isatty() if progress is None else progress
    total = len(list(checkpoint_names(model))) + 3 * cfg.n_routed_experts * len(pending)
    with tqdm(total=total, desc=f"loading {Path(model_dir).name}", unit="tensor", disable=not show, leave=False) as bar:
        _fill(ckpt, model_dir, checkpoint_names(model), bar)
        for i, moe, experts in pending:
            experts = experts.to_empty(device=device).to(torch_dtype)
            _fill(ckpt, model_dir, module_tensors(experts, f"model.layers.{i}.mlp.experts"), bar)
            moe.experts = experts_factory(i, experts) if experts_factory else experts
    model.eval()
    return model


def _fill(ckpt: Checkpoint, model_dir, targets, bar) -> None:
    for name, dest in targets:
        if name not in ckpt:
            raise CheckpointError(f"{model_dir}: missing tensor '{name}'")
        with torch.no_grad():
            dest.copy_(ckpt.read(name, tuple(dest.shape), dtype=dest.dtype))
        bar.update()
