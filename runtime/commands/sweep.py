"""`hmoe sweep`: CPU expert settings (threads × NUMA policy × tokens) for one MoE layer; table, plot, best."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="find the best threads / NUMA policy for the CPU experts",
        description="Times one MoE layer of routed experts (random weights and routing) on the CPU for every "
                    "combination of threads, NUMA policy and token count: ms per layer, GB/s of weights "
                    "touched, % of the read bandwidth of all physical cores (measured in the same run) and "
                    "GFLOP/s. Prints a table and the best setting per token count; settings this machine cannot "
                    "run are listed as skipped with the reason. Progress goes to stderr.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shape", choices=["v2-lite", "v3"], help="a DeepSeek expert shape")
    what.add_argument("--model", "-m", metavar="DIR", help="take the expert shape from this model's config.json")
    p.add_argument("--fmt", default="q4_k", help="weight format: bf16, q8_0, q4_0, q4_k, q6_k (default q4_k)")
    p.add_argument("--threads", default=None, metavar="LIST",
                   help="comma-separated worker thread counts (default: a quarter, half, three quarters, all "
                        "but one and all of the physical cores)")
    p.add_argument("--numa", default="interleave,none", metavar="LIST",
                   help="comma-separated NUMA policies: interleave, split, replicate, none (default interleave,none)")
    p.add_argument("--tokens", default="1,64,512", metavar="LIST", help="comma-separated token counts (default 1,64,512)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed runs per point up to 64 tokens (a third of them above); median reported (default 10)")
    p.add_argument("--isa", default=None, help="force an ISA (avx2, avxvnni, avx512, avx512vnni; default: best)")
    p.add_argument("--amx", choices=["auto", "on", "off"], default="auto", help="AMX tiles for large batches")
    p.add_argument("--bw-gib", type=float, default=2.0, help="buffer of the read-bandwidth test in GiB (default 2)")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw ms/layer against threads into this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", metavar="FILE", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def default_threads(cores: int) -> str:
    counts = sorted({max(1, c) for c in (cores // 4, cores // 2, 3 * cores // 4, cores - 1, cores)})
    return ",".join(map(str, counts))


def run(args) -> int:
    from cpu_experts.formats import get_format
    from cpu_experts.numa import POLICIES, physical_cpus

    from ..bench_common import command_line, int_list, metadata
    from ..bench_sweep import model_shape, named_shape, plot, run_sweep, table
    from ..errors import HmoeError

    try:
        get_format(args.fmt)
    except ValueError as e:
        raise HmoeError(f"--fmt: {e}") from None
    threads = int_list(args.threads or default_threads(len(physical_cpus())), "--threads")
    tokens = int_list(args.tokens, "--tokens")
    policies = [p.strip() for p in args.numa.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise HmoeError(f"--numa takes comma-separated policies from {', '.join(POLICIES)}, got '{args.numa}'")
    if args.repeats < 1 or not args.bw_gib > 0:
        raise HmoeError("--repeats must be >= 1 and --bw-gib > 0")
    shape = model_shape(args.model) if args.model else named_shape(args.shape)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    result = run_sweep(shape, args.fmt, threads, policies, tokens, repeats=args.repeats,
                       bw_bytes=int(args.bw_gib * 2**30), isa=args.isa,
                       amx={"auto": None, "on": True, "off": False}[args.amx], log=log)
    result = {**metadata(command_line("sweep", args, skip=("json", "out", "plot"))), **result}
    if args.plot:
        plot(result, args.plot)
        log(f"plot written to {args.plot}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0
