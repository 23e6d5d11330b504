"""`hmoe perplexity`: llama-perplexity style PPL of a model on a text file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import HmoeError
from ..perplexity import chunk_perplexities
from ..session import add_model_args, open_model
from ..tokenizer import Tokenizer


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file",
                       description="Perplexity like llama-perplexity: the file is cut into --ctx token chunks, the "
                                   "second half of each is scored; prints the running PPL per chunk and a final "
                                   "'PPL = x +/- y' (one standard error).")
    add_model_args(p, ctx_help=("tokens per chunk (default 512)", 512))
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score at most N chunks (default: all)")
    p.add_argument("--json", action="store_true", help="print the final result as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.file)
    if not path.exists():
        raise HmoeError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HmoeError(f"{path}: not UTF-8 text ({e})") from None
    model = open_model(args.model, args)
    tok = Tokenizer(args.model, model.cfg.eos_token_ids)
    tokens = tok.encode(text)
    if args.ctx > model.cfg.max_position_embeddings:
        raise HmoeError(f"--ctx {args.ctx} exceeds the model's max_position_embeddings {model.cfg.max_position_embeddings}")
    print(f"perplexity: {len(tokens)} tokens, {len(tokens) // args.ctx} chunks of {args.ctx}", file=sys.stderr)
    t0 = time.perf_counter()
    result = None
    progress = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the object alone
    for i, ppl, result in chunk_perplexities(model, tokens, args.ctx, tok.bos_id, args.chunks):
        print(f"[{i}]{ppl:.4f},", end="", flush=True, file=progress)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"ppl": result.ppl, "uncertainty": result.uncertainty, "tokens_scored": result.tokens_scored,
                          "chunks": len(result.chunk_ppls), "ctx": args.ctx, "seconds": round(seconds, 3)}))
    else:
        print()
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.uncertainty:.5f}")
    return 0
