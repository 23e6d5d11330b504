"""`hmoe chat`: an interactive conversation, streaming replies."""

from __future__ import annotations

import sys

from ..demo import demo_model_dir
from ..errors import ContextLimitError
from ..session import add_graph_arg, add_model_args, add_sampling_args, open_generator, sampling_params

HELP = "commands: /reset clears the conversation, /exit leaves; Ctrl-C stops a reply"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (the built-in demo model if --model is not given)",
                       description="Chat with a model. Replies stream as they are produced; after each one a line "
                                   f"gives prompt and generation speed. {HELP}.")
    add_graph_arg(p)
    add_model_args(p, required=False)
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message that starts the conversation")
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=run)


def run(args) -> int:
    params = sampling_params(args)
    model_dir = args.model
    if model_dir is None:
        print("No --model given: using the built-in demo model. Its weights are random, so its words are noise.",
              file=sys.stderr)
        model_dir = demo_model_dir()
    gen = open_generator(model_dir, args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"hmoe chat: {model_dir} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            gen.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; {HELP}]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            prompt_ids = gen.tokenizer.encode_chat(history)
            reply = []
            try:
                for piece in gen.stream(prompt_ids, params):
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                gen.stats.finish_reason = "interrupted"
        except ContextLimitError as e:
            history.pop()
            print(f"[{e}]", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        s = gen.stats
        print(f"[prompt {s.prompt_tokens} tok ({s.prefilled_tokens} new), {s.prefill_tps:.1f} t/s | "
              f"reply {s.generated_tokens} tok, {s.decode_tps:.1f} t/s | {s.finish_reason}]", file=sys.stderr)
