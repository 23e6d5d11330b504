"""`hmoe convert`: a llama.cpp GGUF into an HF-style checkpoint directory, or the reverse."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..errors import HmoeError

# Kept here, not imported from gguf_convert: the `gguf` package is imported only when converting,
# so every other command runs where it is not installed.
EXPERT_FORMATS = ("f32", "bf16", "q8_0", "q4_0", "q4_k", "q6_k")
DENSE_FORMATS = ("f32", "f16", "bf16", "q8_0")
MLA_LAYOUTS = ("split", "kv_b")

SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF into an HF-style checkpoint directory, or the reverse",
                       description="The direction follows --model: a .gguf file (any shard of a split one) becomes a "
                                   "directory of config.json, bf16 or f32 safetensors and tokenizer files; a model "
                                   "directory becomes a deepseek2 GGUF as llama.cpp writes it, with the routed "
                                   "experts in one of the formats hmoe's CPU kernels run, so it loads without "
                                   "requantization.")
    p.add_argument("--model", "-m", required=True, metavar="DIR|GGUF", help="the model to convert")
    p.add_argument("--out", "-o", required=True, metavar="PATH",
                   help="a new directory (from a GGUF) or a new .gguf file (from a directory)")
    p.add_argument("--experts", default="q8_0", choices=list(EXPERT_FORMATS),
                   help="GGUF output: format of the routed experts (default q8_0; q4_k and q6_k need rows of 256)")
    p.add_argument("--dtype", default="bf16", choices=sorted(set(DENSE_FORMATS)),
                   help="format of the other weights: bf16 (default) or f32 for both directions; f16 or q8_0 for "
                        "GGUF output. Norms and the router stay f32 in a GGUF, as llama.cpp keeps them")
    p.add_argument("--mla", default="split", choices=MLA_LAYOUTS,
                   help="GGUF output: 'split' writes attn_k_b/attn_v_b (llama.cpp since 2025-04, default), "
                        "'kv_b' the older single attn_kv_b")
    p.add_argument("--split-max-size", default=None, metavar="SIZE",
                   help="GGUF output: split into shards of at most SIZE (e.g. 48G), named like llama.cpp's gguf-split")
    p.add_argument("--split-max-tensors", type=int, default=0, metavar="N",
                   help="GGUF output: split into shards of at most N tensors")
    p.add_argument("--shard-gb", type=float, default=4.0, metavar="G",
                   help="directory output: largest safetensors shard in GB (default 4)")
    p.set_defaults(func=run)


def parse_size(text: str | None) -> int:
    """48G -> bytes, with decimal units as llama.cpp's gguf-split counts them."""
    if text is None:
        return 0
    m = SIZE.match(text.strip())
    if not m:
        raise HmoeError(f"--split-max-size: expected a size like 48G or 500M, found {text!r}")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2].upper() or " "))


def run(args) -> int:
    from ..gguf_convert import gguf_to_hf, hf_to_gguf

    src, out = Path(args.model), Path(args.out)
    progress = sys.stderr.isatty()
    if src.suffix.lower() == ".gguf":
        if args.dtype not in ("bf16", "f32"):
            raise HmoeError(f"--dtype {args.dtype}: safetensors output is bf16 or f32")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HmoeError(f"{out}: exists and is not an empty directory; choose a new --out")
        gguf_to_hf(src, out, dtype=args.dtype, shard_gb=args.shard_gb, progress=progress)
        print(f"wrote {out} from {src.name} ({args.dtype} safetensors)")
        return 0
    if not src.is_dir():
        raise HmoeError(f"{src}: expected a model directory or a .gguf file")
    if out.suffix.lower() != ".gguf":
        raise HmoeError(f"{out}: the output of a directory is a GGUF; name it *.gguf")
    if out.exists():
        raise HmoeError(f"{out}: exists; choose a new --out")
    files = hf_to_gguf(src, out, experts=args.experts, dtype=args.dtype, mla=args.mla,
                       split_max_size=parse_size(args.split_max_size), split_max_tensors=args.split_max_tensors,
                       progress=progress)
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {', '.join(f.name for f in files)} ({size / 1e9:.2f} GB; experts {args.experts}, other weights "
          f"{args.dtype}, MLA {args.mla})")
    return 0
