"""The `hmoe` command line: one sub-command per module in runtime/commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import HmoeError

COMMANDS = ["chat", "generate", "perplexity", "make_model", "rules", "bench_moe", "doctor", "bench", "sweep", "bench_attn", "convert"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmoe",
        description="hmoe runs DeepSeek-style Mixture-of-Experts models (V2, V2-Lite, V3, R1, V3.2) on one machine. "
                    "Run `hmoe COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"runtime.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HmoeError as e:
        print(f"hmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
