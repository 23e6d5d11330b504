"""`hmoe generate`: complete one prompt, streaming the text (or printing JSON)."""

from __future__ import annotations

import json
import sys

from ..session import add_graph_arg, add_model_args, add_sampling_args, open_generator, sampling_params


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt",
                       description="Complete one prompt with a model, streaming text to stdout; timings go to stderr.")
    add_graph_arg(p)
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn in the model's chat template")
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt and generated token ids, text, finish reason, timings")
    p.add_argument("--collect-routing", metavar="FILE", default=None,
                   help="count the routed experts each MoE layer chooses for this prompt and reply, added to FILE "
                        "(JSON, as `hmoe bench --collect-routing`)")
    p.set_defaults(func=run)


def run(args) -> int:
    params = sampling_params(args)
    gen = open_generator(args.model, args)
    tok = gen.tokenizer
    counter = None
    if args.collect_routing:
        from ..routing_stats import RoutingCounter

        counter = RoutingCounter(gen.model)
    prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    pieces = []
    for piece in gen.stream(prompt_ids, params):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    s = gen.stats
    if counter is not None:
        from pathlib import Path

        from ..routing_stats import model_fingerprint

        counter.close()
        counter.write(args.collect_routing, model=Path(args.model).name, fingerprint=model_fingerprint(args.model))
    if args.json:
        print(json.dumps({
            "model": str(args.model), "prompt": args.prompt, "prompt_token_ids": prompt_ids,
            "generated_token_ids": s.token_ids, "text": "".join(pieces), "finish_reason": s.finish_reason,
            "timings": {"prefill_s": round(s.prefill_s, 6), "decode_s": round(s.decode_s, 6),
                        "prefill_tokens_per_s": round(s.prefill_tps, 2), "decode_tokens_per_s": round(s.decode_tps, 2)},
        }))
    else:
        print()
        print(f"[prompt {s.prompt_tokens} tok, {s.prefill_tps:.1f} t/s | generated {s.generated_tokens} tok, "
              f"{s.decode_tps:.1f} t/s | {s.finish_reason}]", file=sys.stderr)
    return 0
