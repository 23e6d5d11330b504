"""Build the model on the meta device and fill it tensor by tensor from the checkpoint."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .fp8 import quantize_fp8_blocks
from .model import DeepseekForCausalLM
from .moe import MoE, TorchExperts

if TYPE_CHECKING:
    from placement.plan import Plan

    from .jit_experts import PackedCache

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


def reference_plan(cfg: ModelConfig, *, dtype: str = "auto", device: str = "cpu") -> "Plan":
    """The plan of the plain torch model: every module on `device` in `dtype` (the parity reference)."""
    from placement.formats import auto_format
    from placement.inventory import detect, hypothetical
    from placement.plan import build_plan
    from placement.schema import parse_rules

    fmt = auto_format(cfg.torch_dtype if dtype == "auto" else dtype)
    machine = hypothetical([], 1) if device == "cpu" else detect()
    rules = parse_rules(f"name: reference\ndefaults: {{device: '{device}', op: torch, dtype: {fmt}}}\n"
                        f"rules:\n  - match: '.*'\n", f"<--device {device} --dtype {dtype}>", machine)
    return build_plan(rules, cfg, ctx=min(4096, cfg.max_position_embeddings))


def load_model(model_dir: str | Path, *, dtype: str = "auto", device: str = "cpu", plan: "Plan | None" = None,
               progress: bool | None = None, packed_cache: "PackedCache | None" = None) -> DeepseekForCausalLM:
    """The model as `plan` places it (default: the torch reference on `device` in `dtype`).

    Everything but the routed experts is filled first; then each MoE layer's experts, one layer at
    a time: read into a reference module and handed to their op (quantized and packed for `jit`),
    or read straight from `packed_cache` when it holds that layer already."""
    from placement.assemble import cache_options, check_runnable, connect, materialize

    cfg = load_config(model_dir)
    plan = plan or reference_plan(cfg, dtype=dtype, device=device)
    check_runnable(plan)
    ckpt = open_weights(model_dir, cfg)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    placements = {p.name: p for p in plan.placements}
    pending = []  # routed experts: built after the rest, one layer at a time
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE) and placements[f"model.layers.{i}.mlp.experts"].op != "torch":
            pending.append((i, layer.mlp, layer.mlp.experts))
            layer.mlp.experts = nn.Identity()
    materialize(model, plan)
    show = sys.stderr.isatty() if progress is None else progress
    total = len(list(checkpoint_names(model))) + 3 * cfg.n_routed_experts * len(pending)
    with tqdm(total=total, desc=f"loading {Path(model_dir).name}", unit="tensor", disable=not show, leave=False) as bar:
        _fill(ckpt, model_dir, checkpoint_names(model), bar)
        attention = plan.attention_devices
        for i, moe, reference in pending:
            p = placements[f"model.layers.{i}.mlp.experts"]
            if p.threads is None and attention[i].startswith("cuda"):  # driven by a GPU: a core for the hand-over
                from orchestrator.hybrid import default_workers

                p = dataclasses.replace(p, threads=default_workers())
            moe.experts = _build_experts(ckpt, model_dir, cfg, p, i, reference, packed_cache, bar)
    for layer in model.model.layers:  # one GEMM for q(_a) and kv_a where both are plain linears
        layer.self_attn.fuse_input_projections()
    _overlap_on_gpu(model, cfg, plan, [(i, moe) for i, moe, _ in pending])
    connect(model, plan)
    model.cache_options = cache_options(plan)
    model.eval()
    return model


def open_weights(model_dir: str | Path, cfg: ModelConfig):
    """The weight source: safetensors `Checkpoint`, or `GGUFWeights` for a .gguf file (same interface)."""
    if Path(model_dir).suffix.lower() == ".gguf":
        from .gguf_weights import GGUFWeights

        return GGUFWeights(model_dir, cfg)
    return Checkpoint(model_dir, cfg.fp8_block_size)


# Host buffers of the hybrid path hold this many tokens; longer prompts go through them in chunks.
HYBRID_STAGING_TOKENS = 1024


def _overlap_on_gpu(model, cfg: ModelConfig, plan, moe_layers) -> None:
    """CPU experts of layers whose attention runs on a GPU: computed stream-ordered (HybridExperts),
    overlapping the GPU's shared experts, instead of a synchronous copy to the CPU and back."""
    attention = plan.attention_devices
    hybrid = []  # (module, attribute) holding CPU-kernel experts: the layer's `experts`, or a split's `slow`
    for i, moe in moe_layers:
        holder, name = (moe.experts, "slow") if hasattr(moe.experts, "slow") else (moe, "experts")
        if attention[i].startswith("cuda") and hasattr(getattr(holder, name), "engine"):
            hybrid.append((holder, name))
    if not hybrid:
        return
    from orchestrator.hybrid import HostStaging, HybridExperts

    staging = HostStaging(max_tokens=HYBRID_STAGING_TOKENS, hidden=cfg.hidden_size, top_k=cfg.num_experts_per_tok)
    for holder, name in hybrid:
        setattr(holder, name, HybridExperts(getattr(holder, name).engine, staging))
    # long prompts: the experts of whole-layer CPU placements stream to the GPU (split layers do not)
    _stream_prefill(plan, [(i, moe) for i, moe in moe_layers if isinstance(moe.experts, HybridExperts)])


def _stream_prefill(plan, hybrid) -> None:
    """Layers whose rule says `prefill: {op: stream}`: long prompts stream their experts to the GPU
    of their attention (check_runnable refuses any other); one StreamedPrefill per device, layers
    in model order."""
    prefill = {p.unit.layer: p.prefill for p in plan.placements if p.unit.kind == "experts" and p.prefill}
    by_device: dict[str, list] = {}
    for i, moe in hybrid:
        if i in prefill and prefill[i].op == "stream":
            by_device.setdefault(prefill[i].device, []).append((i, moe))
    if not by_device:
        return
    from orchestrator import streamed

    for device, layers in by_device.items():  # each layer streams from its own rule's min_tokens
        streamed.attach([(moe, moe.experts) for _, moe in layers], device,
                        min_tokens=[prefill[i].min_tokens for i, _ in layers])


def _build_experts(ckpt: Checkpoint, model_dir, cfg: ModelConfig, p, layer: int, reference: TorchExperts,
                   cache, bar) -> nn.Module:
    """One layer's routed experts for a non-torch op (today: cpu_experts' `jit`)."""
    from .jit_experts import build

    prefix = f"model.layers.{layer}.mlp.experts"
    if p.gpu_experts:
        return _build_split_experts(ckpt, model_dir, cfg, p, layer, cache, bar)
    targets = list(module_tensors(reference, prefix))
    path = None
    down_fmt = p.down_format or p.format
    if cache is not None:
        path = cache.path(ckpt.fingerprint([name for name, _ in targets]), layer, p.format, down_fmt)
        cached = cache.load(path, fmt=p.format, down_fmt=down_fmt, num_experts=cfg.n_routed_experts,
                            hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size, threads=p.threads, numa=p.numa)
        if cached is not None:
            bar.update(len(targets))
            return cached
    if hasattr(ckpt, "expert_blocks"):  # GGUF: the file's blocks, requantized only if not in p.format
        from .jit_experts import build_from_blocks

        experts = build_from_blocks(layer, p.format, *ckpt.expert_blocks(layer, p.format, down_fmt),
                                    hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size, threads=p.threads,
                                    numa=p.numa, down_fmt=down_fmt)
        bar.update(len(targets))
    else:
        reference = reference.to_empty(device="cpu").to(resolve_dtype(cfg, "auto"))
        _fill(ckpt, model_dir, module_tensors(reference, prefix), bar)
        experts = build(layer, p.format, reference, threads=p.threads, numa=p.numa, down_fmt=down_fmt)
    if cache is not None:
        cache.save(path, experts)
    return experts


def _build_split_experts(ckpt, model_dir, cfg: ModelConfig, p, layer: int, cache, bar) -> nn.Module:
    """gpu_experts: the plan's experts of this layer stacked in torch on their device, the rest in the
    CPU kernels (read from `cache` when it holds this subset), as one SplitExperts."""
    from placement.assemble import TORCH_DTYPES

    from .jit_experts import build
    from .split_experts import SplitExperts

    E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    prefix = f"model.layers.{layer}.mlp.experts"
    fast_ids = list(p.gpu_expert_ids)
    slow_ids = [e for e in range(E) if e not in set(fast_ids)]

    def targets(module, ids):  # the stacked module's rows are these experts of the checkpoint
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for row, e in enumerate(ids):
                yield f"{prefix}.{e}.{proj}.weight", getattr(module, proj)[row]

    def stacked(n, device, dtype):
        with torch.device("meta"):
            return TorchExperts(n, H, I).to_empty(device=device).to(dtype)

    fast = stacked(len(fast_ids), p.gpu_experts.device, TORCH_DTYPES[p.gpu_experts.format])
    _fill(ckpt, model_dir, targets(fast, fast_ids), bar)
    slow_names = [f"{prefix}.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj") for e in slow_ids]
    slow, path = None, None
    down_fmt = p.down_format or p.format  # a GGUF's own down format (Q4_K_M: q6_k)
    if cache is not None:
        path = cache.path(ckpt.fingerprint(slow_names), layer, p.format, down_fmt)  # the names pick the subset
        slow = cache.load(path, fmt=p.format, down_fmt=down_fmt, num_experts=len(slow_ids), hidden=H, inter=I,
                          threads=p.threads, numa=p.numa)
    if slow is not None:
        bar.update(len(slow_names))
        return SplitExperts(fast, slow, fast_ids, E)
    if hasattr(ckpt, "expert_blocks"):  # GGUF: the file's own blocks of the CPU experts
        from .jit_experts import build_from_blocks

        blocks = [b[slow_ids] for b in ckpt.expert_blocks(layer, p.format, down_fmt)]
        slow = build_from_blocks(layer, p.format, *blocks, hidden=H, inter=I, threads=p.threads, numa=p.numa,
                                 down_fmt=down_fmt)
        bar.update(len(slow_names))
    else:
        slow_ref = stacked(len(slow_ids), "cpu", resolve_dtype(cfg, "auto"))
        _fill(ckpt, model_dir, targets(slow_ref, slow_ids), bar)
        slow = build(layer, p.format, slow_ref, threads=p.threads, numa=p.numa, down_fmt=down_fmt)
    if cache is not None:
        cache.save(path, slow)
    return SplitExperts(fast, slow, fast_ids, E)


def _fill(ckpt: Checkpoint, model_dir, targets, bar) -> None:
    targets = list(targets)
    dests = dict(targets)
    # FP8Linear: weight and weight_scale_inv come as one pair (as stored, or quantized here)
    scales = {name + "_scale_inv" for name, dest in targets if dest.dtype == torch.float8_e4m3fn}
    for name, dest in targets:  # a missing tensor is the source's error: it names the file's own tensor
        if name in scales:
            bar.update()
            continue
        with torch.no_grad():
            if dest.dtype == torch.float8_e4m3fn:
                weight, scale_inv = _read_fp8(ckpt, name, tuple(dest.shape), dest.device)
                dest.copy_(weight)
                dests[name + "_scale_inv"].copy_(scale_inv)
            else:
                dest.copy_(ckpt.read(name, tuple(dest.shape), dtype=dest.dtype))
        bar.update()


def _read_fp8(ckpt, name: str, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(ckpt, "read_fp8"):  # safetensors: fp8 tensors as stored
        return ckpt.read_fp8(name, shape, device)
    return quantize_fp8_blocks(ckpt.read(name, shape, dtype=torch.float32).to(device))  # GGUF: dequantized first  # GGUF: dequantized, then fp8
