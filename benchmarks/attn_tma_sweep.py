"""Generic vs TMA MLA decode kernels on the GPU machine (issue 5): each configuration at 1K-128K
context, 16 and 128 heads, batch 1, graph-replay and CUPTI kernel-only times against the roofline
measured in the same run. Usage: python3 benchmarks/attn_tma_sweep.py --out FILE [--seconds S]."""

import argparse
import json
import subprocess
import time

import torch

from gpu_attention import bench
from gpu_attention.triton_decode import _sm_count

GENERIC = [dict(kernel="generic")]  # its defaults for the shape
TMA = {  # kernel, (block_h, num_warps, block_n, num_stages), waves; page size 64 unless a 4th item says
    128: [("default", None, None), ("tma", (64, 8, 64, 2), 1), ("tma_keys", (32, 4, 64, 2), 1),
          ("tma_keys", (32, 4, 64, 2), 2), ("tma_keys", (16, 4, 64, 2), 1), ("tma_keys", (32, 4, 64, 3), 1),
          ("tma_keys", (64, 8, 128, 1), 1, 128), ("tma_keys", (32, 8, 128, 1), 1, 128)],
    16: [("default", None, None), ("tma", (16, 4, 32, 2), 2), ("tma", (16, 4, 32, 2), 4),
         ("tma_keys", (16, 4, 64, 2), 1), ("tma_keys", (16, 4, 64, 2), 2), ("tma_keys", (16, 4, 64, 3), 2),
         ("tma_keys", (16, 4, 64, 2), 4)],
}

# one pipeline stage: <= 113 KB of shared memory and <= 255 registers x 128 threads, so that two CTAs
# share an SM and one's softmax can run under the other's products (decode_kernel_report.py: keys-major
# 32x4x64 110.6 KB, 255 registers, 432 spill stores; 16x4x64 92.2 KB, 12 spill stores); waves = programs
# per SM. On the H200 (Triton 3.6) the first of them stopped with an illegal memory access: see NOTES.md
TWO_PER_SM = {
    128: [("default", None, None), ("tma_keys", (32, 4, 64, 1), 2), ("tma_keys", (32, 4, 64, 1), 4),
          ("tma_keys", (16, 4, 64, 1), 2), ("tma_keys", (16, 4, 64, 1), 4)],
    16: [("default", None, None), ("tma_keys", (16, 4, 64, 1), 2), ("tma_keys", (16, 4, 64, 1), 4)],
}
TABLES = {"tma": TMA, "two_per_sm": TWO_PER_SM}


def configs(heads: int, ctx: int, sms: int, table: dict = TMA) -> dict[int, list[dict]]:
    """Configurations by the page size of the cache they run on."""
    out = {64: list(GENERIC)}
    for kernel, block, waves, *page in table[heads]:
        if kernel == "default":
            cfg = dict(kernel=None)  # absorbed_decode's choice
        else:
            bh, w, bn, st = block
            splits = max(1, min(-(-waves * sms // -(-heads // bh)), -(-ctx // 64)))
            cfg = dict(kernel=kernel, block_h=bh, num_warps=w, block_n=bn, num_stages=st, num_splits=splits)
        group = out.setdefault(page[0] if page else 64, [])
        if cfg not in group:
            group.append(cfg)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--heads", default="128,16")
    ap.add_argument("--ctx", default="131072,32768,8192,1024")
    ap.add_argument("--table", choices=sorted(TABLES), default="tma", help="which configurations besides the generic kernel")
    args = ap.parse_args()
    dev = torch.device("cuda")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    res = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), commit=commit,
               command="python3 benchmarks/attn_tma_sweep.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                         if k != "out"),
               triton=__import__("triton").__version__, torch=torch.__version__)
    res["hbm_copy_gbs"] = bw = bench.hbm_bandwidth(dev)
    res["bf16_matmul_tflops"] = tf = bench.matmul_tflops(dev)
    sms = _sm_count(dev)
    heads = [int(h) for h in args.heads.split(",")]
    ctxs = [int(c) for c in args.ctx.split(",")]
    end = time.monotonic() + args.seconds
    res["rows"] = []
    for i, h in enumerate(heads):
        for j, ctx in enumerate(ctxs):
            left = len(heads) * len(ctxs) - (i * len(ctxs) + j)
            roof = max(ctx * 1152 / bw / 1e3, bench.decode_flops(h, ctx, 1) / tf / 1e6)
            rows = []
            for page, cfgs in configs(h, ctx, sms, TABLES[args.table]).items():
                s = bench.Shape(heads=h, ctx=ctx, batch=1, page_size=page, dtype="bf16", device=dev)
                got = bench.sweep_decode(s, cfgs, time.monotonic() + (end - time.monotonic()) / left / 2, rep=30,
                                         cupti=True)
                rows += [r | dict(page_size=page) for r in got]
                del s
            for r in rows:
                r["roofline_us"] = roof
                if "us" in r:
                    r["x_roofline"] = r["us"] / roof
                    r["kernel_only_x_roofline"] = r["kernel_only_us"] / roof
                    r["tflops"] = bench.decode_flops(h, ctx, 1) / r["us"] / 1e6
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                  if k != "resolved"}), flush=True)
            res["rows"] += rows
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
