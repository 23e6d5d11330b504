"""`hmoe bench-attn`: MLA decode and prefill kernels on the GPU against the measured HBM bandwidth."""

from __future__ import annotations

import json
import time

from ..bench_common import command_line, int_list, markdown_table, metadata
from ..errors import HmoeError


def register(subparsers):
    p = subparsers.add_parser(
        "bench-attn", help="benchmark MLA attention (paged latent cache) on the GPU",
        description="DeepSeek's MLA shape (latent 512+64, heads of 128+64/128) on random data. Decode: µs per call "
                    "of the Triton absorbed kernel, GB/s and % of the HBM bandwidth measured in the same run, "
                    "TFLOP/s, times the roofline max(bytes/bandwidth, FLOPs/matmul rate), and the naive torch "
                    "version. Prefill: a chunk of new tokens in both forms.")
    p.add_argument("--heads", default="16,128", help="query head counts (default 16,128: V2-Lite, V3)")
    p.add_argument("--ctx", default="1024,8192,32768,131072", help="cached tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--page-size", type=int, default=64, help="latent cache page size (default 64)")
    p.add_argument("--cache-dtype", choices=["bf16", "fp8"], default="bf16", help="latent cache storage")
    p.add_argument("--prefill-tokens", type=int, default=2048,
                   help="new tokens of a prefill chunk (0: no prefill rows; capped at ctx)")
    p.add_argument("--crossover", default=None,
                   help="cached lengths at which to find the absorbed/decompressed crossover, e.g. 8192,32768")
    p.add_argument("--crossover-tokens", default="16,32,64,96,128,192,256,384,512,1024",
                   help="new-token counts tried for --crossover")
    p.add_argument("--sweep", action="store_true", help="also time kernel block configurations (tuning)")
    p.add_argument("--sweep-seconds", type=float, default=120, help="time limit of the decode sweep (default 120)")
    p.add_argument("--e2e", default=None, help="contexts for an end-to-end V2-Lite-shape decode (random weights)")
    p.add_argument("--e2e-layers", type=int, default=None, help="layers of the end-to-end model (default all 27)")
    p.add_argument("--dsa", action="store_true",
                   help="also time V3.2 sparse attention decode (indexer top-2048 + attention over the selected "
                        "rows) against dense decode at each --ctx; --cache-dtype sets the indexer-key cache")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only --crossover, with the plain-torch path")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gpu_attention import bench

    heads, ctxs = int_list(args.heads, "--heads"), int_list(args.ctx, "--ctx")
    cross = int_list(args.crossover, "--crossover") if args.crossover else []
    cross_tokens = int_list(args.crossover_tokens, "--crossover-tokens")
    e2e = int_list(args.e2e, "--e2e") if args.e2e else []
    if args.device == "cpu" and not cross:
        raise HmoeError("bench-attn --device cpu only measures the crossover: give --crossover CACHED[,CACHED...]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HmoeError("bench-attn needs a CUDA GPU (use --device cpu --crossover N for the plain-torch path)")
    if args.device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise HmoeError("bench-attn needs Triton on the GPU: pip install triton") from None
    say = (lambda *a: None) if args.json else print
    result = metadata(command_line("bench-attn", args, skip=("json", "out")))
    device = torch.device(args.device)
    shape = dict(batch=args.batch, page_size=args.page_size, dtype=args.cache_dtype, device=device)
    if args.device == "cpu":
        result["crossover"] = [bench.crossover(bench.Shape(heads=h, ctx=c, capacity=c + max(cross_tokens), **shape),
                                               cross_tokens, "torch") for h in heads for c in cross]
        return _finish(result, args, say)

    result["gpu"] = torch.cuda.get_device_name()
    result["hbm_copy_gbs"] = bw = bench.hbm_bandwidth(device)
    result["bf16_matmul_tflops"] = tflops = bench.matmul_tflops(device)
    say(f"{result['gpu']}: HBM copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    try:
        result["launch_floor"] = bench.launch_floor_us()
    except Exception as e:  # noqa: BLE001 - a diagnostic; the measurements go on without it
        result["launch_floor"] = dict(error=str(e).splitlines()[0][:160])
    if args.sweep:
        result["sweep"] = _sweep(bench, heads, ctxs, args, shape)
        _save(result, args)
    best = {}  # (heads, ctx) -> fastest decode blocks and splits of the sweep
    for r in result.get("sweep", []):
        key = (r["heads"], r["ctx"])
        if "block_h" in r and "us" in r and r["us"] < best.get(key, {}).get("us", float("inf")):
            best[key] = r
    best = {k: {f: r[f] for f in ("block_h", "block_n", "num_warps", "num_stages", "num_splits", "v_split")
                if r.get(f)}
            for k, r in best.items()}
    result["decode"], result["prefill"] = [], []
    for h in heads:
        for ctx in ctxs:
            s = bench.Shape(heads=h, ctx=ctx, **shape)
            result["decode"].append(bench.decode_row(s, bw, tflops, tuned=best.get((h, ctx))))
            if args.prefill_tokens:
                result["prefill"].append(bench.prefill_row(s, min(args.prefill_tokens, ctx), tflops))
            del s
            torch.cuda.empty_cache()
            _save(result, args)
    say(markdown_table(
        ["heads", "ctx", "batch", "kernel µs", "GB/s", "% HBM", "TFLOP/s", "× roofline", "op µs", "naive torch µs",
         "swept best µs"],
        [[r["heads"], r["ctx"], r["batch"], f"{r['kernel_us']:.1f}", f"{r['gbs']:.0f}", f"{r['pct_hbm']:.0f}",
          f"{r['tflops']:.1f}", f"{r['x_roofline']:.2f}", f"{r['op_us']:.1f}", f"{r['naive_torch_us']:.1f}",
          f"{r['tuned_us']:.1f}" if "tuned_us" in r else "-"]
         for r in result["decode"]]))
    if result["prefill"]:
        say(markdown_table(
            ["heads", "ctx", "new", "decompressed µs", "TFLOP/s", "absorbed µs", "TFLOP/s", "naive torch µs"],
            [[r["heads"], r["ctx"], r["new_tokens"], f"{r['decompressed_us']:.0f}", f"{r['decompressed_tflops']:.0f}",
              f"{r['absorbed_us']:.0f}", f"{r['absorbed_tflops']:.0f}",
              f"{r['naive_torch_decompressed_us']:.0f}" if "naive_torch_decompressed_us" in r else "-"]
             for r in result["prefill"]]))
    result["crossover"] = []
    for h in heads:
        for c in cross:
            result["crossover"].append(bench.crossover(
                bench.Shape(heads=h, ctx=c, capacity=c + max(cross_tokens), **shape), cross_tokens, "triton"))
            torch.cuda.empty_cache()
    if args.dsa:
        from gpu_attention.dsa_bench import time_decode
        result["dsa"] = time_decode(ctxs, index_dtype=args.cache_dtype)
        say(markdown_table(["ctx", "dense µs", "DSA µs", "indexer µs", "DSA µs / first ctx"],
                           [[r["ctx"], f"{r['dense_us']:.1f}" if "dense_us" in r else "-", f"{r['dsa_us']:.1f}",
                             f"{r['indexer_us']:.1f}", f"{r['dsa_us'] / result['dsa'][0]['dsa_us']:.2f}"]
                            for r in result["dsa"]]))
    if e2e:
        result["e2e"] = bench.e2e_decode(e2e, layers=args.e2e_layers, device=device)
        say(markdown_table(["ctx", "layers", "ms/token", "speed vs first"],
                           [[r["ctx"], r["layers"], f"{r['ms_per_token']:.2f}", f"{r['speed_vs_first']:.3f}"]
                            for r in result["e2e"]]))
    return _finish(result, args, say)


def _sweep(bench, heads, ctxs, args, shape) -> list[dict]:
    """Decode blocks and split counts at every context of 8K or more (32K if none; longest first), then prefill
    blocks; split counts are given as programs per SM (waves) over the 132-SM H100."""
    import torch

    from gpu_attention.triton_decode import _sm_count
    sms = _sm_count(torch.device(args.device))
    rows = []
    sweep_ctxs = sorted((c for c in ctxs if c >= 8192), reverse=True) or [32768]  # longest first
    for h in heads:
        if h <= 16:  # one head block: the split count sets how many programs share the GPU
            blocks = [dict(block_h=16, block_n=bn, num_warps=w, num_stages=st)
                      for bn, w, st in ((64, 4, 2), (64, 8, 2), (32, 4, 2))]
        else:  # 64-row blocks: 8 warps for a [64, 512] fp32 accumulator, or value halves (v_split 2)
            blocks = [dict(block_h=bh, block_n=64, num_warps=w, num_stages=2, v_split=v)
                      for bh, w, v in ((64, 8, 1), (64, 8, 2), (64, 4, 2), (32, 4, 1), (32, 4, 2), (16, 4, 1))]
        end = time.monotonic() + args.sweep_seconds / len(heads)
        for i, ctx in enumerate(sweep_ctxs):
            s = bench.Shape(heads=h, ctx=ctx, **shape)
            configs = []
            for b in blocks:
                head_blocks = -(-h // b["block_h"]) * args.batch * b.get("v_split", 1)
                for waves in (1, 2) if h > 16 else (1, 2, 4):
                    cfg = b | dict(num_splits=max(1, min(-(-waves * sms // head_blocks), ctx // 64)))
                    if cfg not in configs:
                        configs.append(cfg)
            # compiles happen at the first context: it gets the larger share of the time
            share = 0.5 if i == 0 and len(sweep_ctxs) > 1 else 1 / (len(sweep_ctxs) - i)
            rows += bench.sweep_decode(s, configs, time.monotonic() + share * (end - time.monotonic()), rep=20)
            del s
            torch.cuda.empty_cache()
    deadline = time.monotonic() + 90
    for h in sorted(heads, reverse=True) if args.prefill_tokens else []:  # 128 heads first if time runs out
        s = bench.Shape(heads=h, ctx=8192, **shape)
        configs = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                   for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for st in (2, 3)]
        rows += bench.sweep_prefill(s, args.prefill_tokens, configs, deadline)
        del s
    return rows


def _finish(result: dict, args, say) -> int:
    for c in result.get("crossover", []):
        say(f"crossover, {c['heads']} heads, {c['cached']} cached ({c['backend']}): decompressed from "
            f"{c['crossover_new_tokens']} new tokens; " + ", ".join(
                f"{r['new_tokens']}: {r['absorbed_us']:.0f}/{r['decompressed_us']:.0f} µs" for r in c["rows"]))
    if args.json:
        print(json.dumps(result, indent=1))
    _save(result, args)
    return 0


def _save(result: dict, args) -> None:
    """Write what has been measured so far (a run cut short still leaves its numbers)."""
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
