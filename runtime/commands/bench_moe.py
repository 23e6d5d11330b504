"""`hmoe bench-moe`: time one MoE layer's routed experts on the CPU against the measured read bandwidth."""
import argparse
import json


def register(subparsers):
    p = subparsers.add_parser("bench-moe", help="benchmark the CPU fused MoE layer",
                              description="Random weights and routing at a model's expert shape; per token count "
                                          "prints ms/layer, GB/s of weight bytes touched, %% of the read "
                                          "bandwidth (each call against the mean of the 512 MiB reads that evict the "
                                          "last-level cache right before and after it, run by the same workers; "
                                          "and against the largest reading of the run), and GFLOP/s.")
    p.add_argument("--shape", choices=["v2-lite", "v3"], default="v2-lite", help="expert shape (default v2-lite)")
    p.add_argument("--fmt", default="q8_0", help="weight format: bf16, q8_0, q4_0, q4_k, q6_k (default q8_0)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: physical cores)")
    p.add_argument("--tokens", default="1,8,64,512,2048", help="comma-separated token counts")
    p.add_argument("--numa", default="interleave", help="NUMA policy: interleave, split, replicate, none")
    p.add_argument("--isa", default=None, help="force an ISA (avx2, avxvnni, avx512, avx512vnni; default: best)")
    p.add_argument("--amx", choices=["auto", "on", "off"], default="auto",
                   help="AMX tiles for large batches: auto (where host and format allow), on, off; which formats "
                        "take int8 tiles with one scale per row: $HMOE_INT8_ROWS=auto|on|off (README)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed runs per token count up to 64 tokens (a third of them above); median reported")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the bound native submit/wait, the path a GPU decode step calls (default on; "
                        "the difference to the Python forward() is its Python)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from cpu_experts import bench
    from cpu_experts.experts import default_threads
    from cpu_experts.formats import get_format
    try:
        get_format(args.fmt)
        tokens = [int(t) for t in args.tokens.split(",") if t]
        if not tokens or min(tokens) < 1:
            raise ValueError(f"--tokens must be positive integers, got {args.tokens!r}")
    except ValueError as e:
        print(f"error: {e}")
        return 2
    threads = args.threads or default_threads()
    quiet = (lambda *a, **k: None) if args.json else print
    try:
        amx = {"auto": None, "on": True, "off": False}[args.amx]
        result = bench.run(args.shape, args.fmt, threads, tokens, numa=args.numa, isa=args.isa, amx=amx,
                           repeats=args.repeats, native=args.native, log=quiet)
    except (ValueError, RuntimeError, MemoryError) as e:
        print(f"error: {e}")
        return 1
    result["command"] = "hmoe bench-moe " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("func", "json", "out", "command")
        and v is not None)
    if args.json:
        print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
