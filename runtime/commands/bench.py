"""`hmoe bench`: llama-bench style rates of a whole model (pp, tg, at depths) and its decode roofline."""

from __future__ import annotations

import json
import sys

from ..session import add_graph_arg, add_model_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="prompt and generation speed of a model (llama-bench style) against the decode roofline",
        description="Runs llama-bench style tests on a model: ppN (an N-token prompt in one pass), tgN (N tokens "
                    "generated one step at a time) and either at depth D ('tgN @ dD': D tokens already in the "
                    "cache, filled by an untimed prefill). Each test runs -r times after one warm-up; t/s is mean "
                    "± standard deviation. It also prints the decode roofline: routed-expert bytes each token must "
                    "read (MoE layers × top-k × bytes per expert in its format) ÷ the read bandwidth measured in "
                    "the same run, and each tg row's fraction of it. The context (--ctx) is set to what the tests "
                    "need. Progress goes to stderr.")
    add_model_args(p)
    add_graph_arg(p)
    p.add_argument("-p", "--n-prompt", default="512", metavar="LIST", help="prompt lengths, comma-separated, 0 = none (default 512)")
    p.add_argument("-n", "--n-gen", default="128", metavar="LIST", help="generation lengths, comma-separated, 0 = none (default 128)")
    p.add_argument("-d", "--n-depth", default="0", metavar="LIST",
                   help="cache depths to run every test at, comma-separated (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N", help="repetitions of each test (default 5)")
    p.add_argument("-ub", "--ubatch", type=int, default=512, metavar="N",
                   help="tokens per forward pass in prompts and the depth fill (default 512)")
    p.add_argument("-o", "--output", choices=["md", "json", "csv"], default="md", help="output format (default md)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each test")
    p.add_argument("--bw-gib", type=float, default=2.0, help="buffer of the read-bandwidth test in GiB (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens (default 0)")
    p.add_argument("--compare-no-graph", action="store_true",
                   help="also run the tg tests with eager decode steps (rows marked 'no-graph'), same model load")
    p.add_argument("--breakdown", action="store_true",
                   help="after the tests, profile 16 decode steps with CUPTI (GPU only) and report where a step goes: "
                        "GPU work, the CPU experts' windows, the CPU experts alone (timed as above) and "
                        "so the hand-over's cost per layer (JSON key 'step_breakdown')")
    p.add_argument("--out", metavar="FILE", default=None, help="also write the JSON result to this file")
    p.add_argument("--collect-routing", metavar="FILE", default=None,
                   help="count how often each routed expert of each MoE layer is chosen over every token the bench "
                        "runs (prefill and decode) and write the counts to FILE as JSON (added to FILE's if it holds "
                        "this model's); `gpu_experts: {routing: FILE}` in the rules keeps the most used on the GPU")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from cpu_experts.bandwidth import PoolFlusher, measure_read_bandwidth

    from ..bench_common import command_line, int_list, metadata
    from ..bench_model import (Runner, as_csv, as_markdown, attach_outside, attach_roofline, context_needed,
                               cpu_expert_memory, cpu_experts_step_ms, expert_pools, experts_threads, make_tests,
                               roofline, routed_experts, run_tests)
    from ..config import load_config
    from ..errors import HmoeError
    from ..session import open_model
    from ..step_profile import breakdown

    tests = make_tests(int_list(args.n_prompt, "-p", 0), int_list(args.n_gen, "-n", 0), int_list(args.n_depth, "-d", 0))
    if args.repetitions < 1 or args.ubatch < 1 or not args.bw_gib > 0:
        raise HmoeError("-r and -ub must be >= 1 and --bw-gib > 0")
    need = context_needed(tests)
    limit = load_config(args.model).max_position_embeddings
    if need > limit:
        raise HmoeError(f"the tests need a context of {need} tokens (depth + test length); {args.model}/config.json "
                        f"allows {limit} (max_position_embeddings)")
    if args.breakdown:  # room for its 18 steps after the deepest test's depth
        need = max(need, max(t.n_depth for t in tests) + 18)
    args.ctx = need
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    model = open_model(args.model, args)
    if args.breakdown and model.lm_head.weight.device.type != "cuda":
        raise HmoeError("--breakdown profiles decode steps on a GPU: this model's output layer is on "
                        f"{model.lm_head.weight.device.type} (place it on a GPU with --rules)")
    experts = routed_experts(model)
    threads, cpus = experts_threads(model)
    log(f"measuring read bandwidth ({args.bw_gib:g} GiB, {threads} threads)...")
    bw_before = measure_read_bandwidth(threads, int(args.bw_gib * 2**30), cpus=cpus)
    log(f"read bandwidth {bw_before:.1f} GB/s (measured again after the tests; the larger sets the roofline)")
    experts_ms = cpu_experts_step_ms(model)
    if experts_ms is not None:
        log(f"CPU experts alone: {experts_ms:.3f} ms per decode token")
    host_memory = cpu_expert_memory(model)
    runner = Runner(model, max_len=need, ubatch=args.ubatch, seed=args.seed, graph=not args.no_graph, log=log)
    counter = None
    if args.collect_routing:
        from ..routing_stats import RoutingCounter

        counter = RoutingCounter(model)
    pools = expert_pools(model)
    # the yardstick of each decode repetition: the same read, by the experts' own workers, right before it
    read = PoolFlusher(pools[0], int(args.bw_gib * 2**30)) if pools else None
    results = run_tests(runner, tests, reps=args.repetitions, warmup=not args.no_warmup, read=read, log=log)
    graph_on, graph_reason = runner.decode.active, runner.decode.reason
    step_breakdown = breakdown(runner, experts_ms, depth=max(t.n_depth for t in tests)) if args.breakdown else None
    for r in results:
        r["graph"] = graph_on if r["n_gen"] else None  # prompts never run from a graph
    if args.compare_no_graph and runner.decode.active:
        del runner  # its cache
        eager = Runner(model, max_len=need, ubatch=args.ubatch, seed=args.seed, graph=False, log=log)
        for r in run_tests(eager, [t for t in tests if t.n_gen], reps=args.repetitions, warmup=not args.no_warmup,
                           log=log):
            results.append({**r, "test": r["test"] + " no-graph", "graph": False})
    if counter is not None:
        from ..routing_stats import model_fingerprint

        counter.close()
        counter.write(args.collect_routing, model=Path(args.model).name, fingerprint=model_fingerprint(args.model))
        log(f"routing statistics written to {args.collect_routing}")
    # the yardstick moves between processes (94-154 GB/s on the GPU machine): the larger of two readings
    bw_after = measure_read_bandwidth(threads, int(args.bw_gib * 2**30), cpus=cpus)
    roof = {**roofline(experts, max(bw_before, bw_after), threads), "read_bandwidth_readings_gbs": [bw_before, bw_after]}
    log(f"read bandwidth {bw_after:.1f} GB/s after the tests; decode roofline {roof['tokens_per_s']:.2f} t/s")
    attach_roofline(results, roof)
    attach_outside(results, experts_ms)
    from orchestrator.hybrid import handover_used

    result = {**metadata(command_line("bench", args, skip=("output", "out", "ctx", "collect_routing"))),
              "model": Path(args.model).name, "roofline": roof, "cpu_experts_step_ms": experts_ms, "results": results,
              "decode_graph": {"on": graph_on, "reason": graph_reason}, "handover": handover_used(model),
              "step_breakdown": step_breakdown, "host_memory": host_memory}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print({"md": as_markdown, "csv": as_csv, "json": lambda r: json.dumps(r, indent=1)}[args.output](result))
    return 0
