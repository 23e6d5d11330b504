"""What every model command shares: its command-line options and opening a model with them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .generate import Generator
from .jit_experts import FORMATS, jit_experts_factory
from .loader import load_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", "-m", required=required, metavar="DIR",
                   help="model directory: config.json, *.safetensors (or an index), tokenizer.json")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto keeps the checkpoint's (bf16 for FP8 checkpoints)")
    p.add_argument("--ctx", type=int, default=4096, metavar="N",
                   help="context limit in tokens: prompt plus reply (default 4096, at most the model's)")
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--experts", default="torch", choices=("torch",) + FORMATS,
                   help="how routed experts run: 'torch' (reference), or cpu_experts' JIT kernels with the "
                        "weights quantized at load to this format")
    p.add_argument("--experts-threads", type=int, default=None, metavar="N",
                   help="worker threads of the JIT experts (default: one per physical core)")
    p.add_argument("--numa", default="interleave", choices=["interleave", "split", "replicate", "none"],
                   help="NUMA policy of the JIT experts' weight memory (default interleave)")


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


def open_generator(model_dir: str | Path, args) -> Generator:
    if args.threads:
        torch.set_num_threads(args.threads)
    factory = None
    if args.experts != "torch":
        factory = jit_experts_factory(args.experts, threads=args.experts_threads, numa=args.numa)
    model = load_model(model_dir, dtype=args.dtype, progress=sys.stderr.isatty(), experts_factory=factory)
    tokenizer = Tokenizer(model_dir, model.cfg.eos_token_ids)
    return Generator(model, tokenizer, max_context=args.ctx)
