"""What every model command shares: its command-line options and opening a model with them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from placement.formats import auto_format
from placement.schema import NUMA_POLICIES

from .config import load_config
from .errors import HmoeError
from .generate import Generator
from .jit_experts import FORMATS, PackedCache
from .loader import load_model
from .model import DeepseekForCausalLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from placement.plan import Plan



# How the host waits for the GPU (orchestrator.cuda_host.SYNC_FLAGS); HMOE_CUDA_SYNC overrides it.
# Blocking: CUDA's default spin-wait takes a core from the CPU expert workers (orchestrator/NOTES.md).
HOST_SYNC_DEFAULT = "blocking"

CTX_HELP = ("context limit in tokens: prompt plus reply (default 4096, at most the model's)", 4096)


def add_model_args(p: argparse.ArgumentParser, required: bool = True, ctx_help: tuple[str, int] = CTX_HELP) -> None:
    p.add_argument("--model", "-m", required=required, metavar="DIR|GGUF",
                   help="model directory (config.json, *.safetensors or an index, tokenizer.json), or a llama.cpp "
                        "deepseek2 .gguf file (for a split one, any of its -0000K-of-0000N.gguf shards)")
    p.add_argument("--rules", default=None, metavar="FILE|NAME",
                   help="placement rules: a YAML file or the name of one in rules/ (docs/rules.md); default: tuned "
                        "for this machine from what the runtime runs (`hmoe rules explain --model DIR` shows it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="what the rules' 'dtype: auto' means; auto keeps the checkpoint's (bf16 for FP8 checkpoints)")
    p.add_argument("--ctx", type=int, default=ctx_help[1], metavar="N", help=ctx_help[0])
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--experts", default="auto", choices=("auto",) + FORMATS,
                   help="format of the routed experts on the CPU in the default rules (auto: the most precise "
                        "that fits RAM; for a .gguf, the file's own format, so its blocks load unchanged); with "
                        "--rules, set 'quant' in the file instead")
    p.add_argument("--experts-threads", type=int, default=None, metavar="N",
                   help="worker threads of the CPU experts, overriding the rules (default: one per physical core)")
    p.add_argument("--numa", default=None, choices=NUMA_POLICIES,
                   help="NUMA policy of the CPU experts' memory, overriding the rules (default interleave)")
    p.add_argument("--no-pack-cache", action="store_true",
                   help="do not read or write packed CPU experts under $HMOE_CACHE_DIR/packed (default: cached, "
                        "so the next start skips quantizing)")


def add_graph_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-graph", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (debugging; runtime/graph.py)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (1 = off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop))


def make_plan(model_dir: str | Path, args) -> Plan:
    """The placement plan for this model, these options and this machine, checked to fit (nothing read yet)."""
    from placement import preflight
    from placement.defaults import default_rules, open_rules
    from placement.inventory import detect
    from placement.plan import build_plan

    cfg = load_config(model_dir)
    inventory = detect()
    if args.rules and args.experts != "auto":
        raise HmoeError(f"--experts {args.experts} sets the format of the default rules; with --rules {args.rules}, "
                        f"set 'quant' on its experts rule instead")
    if args.rules:
        rules = open_rules(args.rules, inventory)
    else:
        rules = default_rules(cfg, inventory, ctx=min(args.ctx, cfg.max_position_embeddings),
                              expert_quant=default_expert_quant(model_dir, args.experts))
    auto = None if args.dtype == "auto" else auto_format(args.dtype)
    ctx = min(args.ctx, cfg.max_position_embeddings)  # the Generator clamps the same way
    plan = build_plan(rules, cfg, ctx=ctx, numa_nodes=inventory.numa_nodes, auto_dtype=auto,
                      stored_experts=stored_expert_formats(model_dir))
    for w in plan.warnings:
        print(f"hmoe: warning: {w}", file=sys.stderr)
    fits = preflight.check(plan, inventory)
    used = ", ".join(f"{f.device} {preflight.gib(f.weights + f.cache)}" for f in fits)
    print(f"hmoe: placement {rules.source}: {used}; {experts_summary(plan)}", file=sys.stderr)
    overrides = {k: v for k, v in (("threads", args.experts_threads), ("numa", args.numa)) if v is not None}
    if overrides:
        plan = dataclasses.replace(plan, placements=tuple(
            dataclasses.replace(p, **overrides) if p.op == "jit" else p for p in plan.placements))
    return plan


def default_expert_quant(model_dir: str | Path, experts: str) -> str:
    """--experts auto for a GGUF is the format its experts are stored in (or nearest to)."""
    if experts == "auto" and Path(model_dir).suffix.lower() == ".gguf":
        from .gguf_weights import GGUFWeights

        return GGUFWeights(model_dir).expert_format() or experts
    return experts


def stored_expert_formats(model_dir: str | Path | None) -> dict[int, tuple[str, str]] | None:
    """A GGUF's layers whose routed experts keep down_proj in a format of its own (Q4_K_M's Q6_K)."""
    if model_dir and Path(model_dir).suffix.lower() == ".gguf":
        from .gguf_weights import GGUFWeights

        return GGUFWeights(model_dir).stored_formats()
    return None


def experts_summary(plan: Plan) -> str:
    kinds = sorted({(p.op, p.format_text, p.device) for p in plan.placements if p.unit.kind == "experts"})
    return "routed experts " + ", ".join(f"{op} {fmt} on {device}" for op, fmt, device in kinds)


def open_model(model_dir: str | Path, args) -> DeepseekForCausalLM:
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():  # host waits for the GPU sleep rather than spin on an expert worker's core
        from orchestrator.cuda_host import set_host_sync

        set_host_sync(os.environ.get("HMOE_CUDA_SYNC", HOST_SYNC_DEFAULT))
    plan = make_plan(model_dir, args)
    cache = None if args.no_pack_cache else PackedCache()
    return load_model(model_dir, plan=plan, progress=sys.stderr.isatty(), packed_cache=cache)


def open_generator(model_dir: str | Path, args) -> Generator:
    model = open_model(model_dir, args)
    tokenizer = Tokenizer(model_dir, model.cfg.eos_token_ids)
    return Generator(model, tokenizer, max_context=args.ctx, graph=not getattr(args, "no_graph", False))
