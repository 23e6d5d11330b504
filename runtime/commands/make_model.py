"""`hmoe make-model`: write a random-weight DeepSeek checkpoint at a preset shape."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..errors import HmoeError
from ..make_model import DTYPES, PRESETS, preset_config, tensor_specs, write_model


def register(sub) -> None:
    p = sub.add_parser("make-model", help="write a random-weight DeepSeek checkpoint (tests, demos, benchmarks)",
                       description="Write a Hugging Face style DeepSeek checkpoint with random weights: config.json, "
                                   "sharded safetensors, tokenizer.json and tokenizer_config.json with a chat template. "
                                   "Deterministic for a seed; streamed to disk, so full-size presets need little RAM.")
    p.add_argument("--preset", required=True, choices=list(PRESETS),
                   help="tiny-v2 / tiny-v3 / tiny-v32: small models for tests; v2-lite, v3, v32: real shapes")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="keep only the first N layers (e.g. v3 --layers 4)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="weight dtype; fp8 writes e4m3 weights with 128x128 block scales as DeepSeek-V3 does")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shard-gb", type=float, default=4.0, metavar="G", help="largest safetensors shard in GB (default 4)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise HmoeError(f"{out}: exists and is not empty; choose a new --out directory")
    raw = preset_config(args.preset, args.layers)
    need = sum(s.nbytes for s, _ in tensor_specs(raw, DTYPES[args.dtype]))
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free:
        raise HmoeError(f"{out}: the checkpoint needs {need / 1e9:.1f} GB, the disk has {free / 1e9:.1f} GB free")
    write_model(out, args.preset, layers=args.layers, dtype=args.dtype, seed=args.seed, shard_gb=args.shard_gb,
                progress=sys.stderr.isatty())
    print(f"wrote {args.preset} ({need / 1e9:.2f} GB, {args.dtype}, seed {args.seed}) to {out}")
    return 0
