"""Build the model on the meta device and fill it tensor by tensor from the checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .errors import CheckpointError
from .model import DeepseekForCausalLM
from .moe import TorchExperts

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_names(model: DeepseekForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint tensor name, destination tensor) for every weight the model needs.

    Stacked routed experts [E, ...] are filled from the per-expert tensors `experts.{e}.*.weight`.
    The MTP layer (`model.layers.{num_hidden_layers}.*`) is never asked for, so it is skipped.
    """
    stacked = {}
    for module_name, module in model.named_modules():
        if isinstance(module, TorchExperts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stacked[f"{module_name}.{proj}"] = True
                param = getattr(module, proj)
                for e in range(param.shape[0]):
                    yield f"{module_name}.{e}.{proj}.weight", param[e]
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name in stacked:
            continue
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        yield name, tensor


def resolve_dtype(cfg: ModelConfig, dtype: str) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype (bf16 for FP8 checkpoints)."""
    if dtype == "auto":
        return DTYPE_NAMES.get(cfg.torch_dtype, torch.bfloat16)
    return DTYPE_NAMES[dtype]


def load_model(model_dir: str | Path, *, dtype: str = "auto", device: str = "cpu",
               progress: bool | None = None) -> DeepseekForCausalLM:
    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir, cfg.fp8_block_size)
    torch_dtype = resolve_dtype(cfg, dtype)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model.to_empty(device=device)
    model.to(torch_dtype)
    for module in model.modules():  # router math stays fp32 (transformers keeps the bias in fp32)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    targets = list(checkpoint_names(model))
    show = sys.stderr.isatty() if progress is None else progress
    for name, dest in tqdm(targets, desc=f"loading {Path(model_dir).name}", unit="tensor", disable=not show,
                           leave=False):
        if name not in ckpt:
            raise CheckpointError(f"{model_dir}: missing tensor '{name}'")
        with torch.no_grad():
            dest.copy_(ckpt.read(name, tuple(dest.shape), dtype=dest.dtype))
    model.eval()
    return model
