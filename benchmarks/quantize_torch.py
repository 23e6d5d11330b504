"""Time expert quantization: numpy (formats.quantize, one expert per thread as from_tensors runs it)
against formats_torch on the CPU and on CUDA, and a whole V2-Lite layer's CPUExperts.from_tensors
(quantize + repack). Writes JSON (one object, rewritten after each part so a time-out keeps the rest).

  python benchmarks/quantize_torch.py --out results.json [--cpu-experts 16] [--numpy-experts 16]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cpu_experts import formats  # noqa: E402
from cpu_experts.experts import CPUExperts  # noqa: E402
from cpu_experts.formats_torch import quantize_torch  # noqa: E402

E, I, H = 64, 1408, 2048  # one DeepSeek-V2-Lite MoE layer: 64 routed experts, gate/up [I, H], down [H, I]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.02 for s in ((E, I, H), (E, I, H), (E, H, I))]


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def main():
    global E
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-experts", type=int, default=16, help="experts of gate timed on torch-CPU")
    ap.add_argument("--numpy-experts", type=int, default=16, help="experts of gate timed in numpy")
    ap.add_argument("--experts", type=int, default=64, help="experts in the layer (64 = V2-Lite; fewer for a smoke test)")
    ap.add_argument("--chunks", default="32,128", help="CUDA chunk sizes in M weights")
    a = ap.parse_args()
    E = a.experts
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "commit": os.environ.get("HMOE_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"],
                                                                      capture_output=True, text=True).stdout.strip(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "shape": {"experts": E, "inter": I, "hidden": H,
                     "note": "gate, up [E, I, H] and down [E, H, I] as [E, I, H]-shaped rows of 2048 for the "
                             "format timings (q4_k/q6_k rows must be 256-multiples); from_tensors uses the real down "
                             "shape with down_fmt q4_0 as llama.cpp's fallback"},
           "quantize": {}}

    def save():
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)

    gate, up, down = layer()
    full = torch.stack([gate, up, down.reshape(E, I, H)])   # 554 M weights in rows of 2048
    n_full = full.numel()
    for fmt in ("q4_k", "q6_k", "q4_0", "q8_0"):
        r = res["quantize"].setdefault(fmt, {})
        if torch.cuda.is_available():
            for c in (int(c) for c in a.chunks.split(",")):
                quantize_torch(full[0, :1], fmt, device="cuda")  # warm-up (CUDA context, kernels)
                torch.cuda.reset_peak_memory_stats()
                dt, q = timed(lambda: quantize_torch(full, fmt, device="cuda", chunk_weights=c << 20))
                r[f"cuda_chunk{c}M"] = {"weights": n_full, "seconds": round(dt, 3),
                                        "Mweights_per_s": round(n_full / dt / 1e6, 1),
                                        "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
                print(fmt, "cuda", r[f"cuda_chunk{c}M"], flush=True)
                save()
            # byte identity on real-size data: one expert against numpy
            r["cuda_equals_numpy_expert0_gate"] = bool(np.array_equal(q[0, 0].numpy(), formats.quantize(
                gate[0].numpy(), fmt)))
            save()
        sub = gate[:a.cpu_experts]
        dt, _ = timed(lambda: quantize_torch(sub, fmt, device="cpu"))
        r["torch_cpu"] = {"weights": sub.numel(), "threads": torch.get_num_threads(), "seconds": round(dt, 3),
                          "Mweights_per_s": round(sub.numel() / dt / 1e6, 1)}
        print(fmt, "torch_cpu", r["torch_cpu"], flush=True)
        save()
        subn = gate[:a.numpy_experts].numpy()
        threads = min(len(subn), os.cpu_count())
        def run_numpy():
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(lambda e: formats.quantize(subn[e], fmt), range(len(subn))))
        dt, _ = timed(run_numpy)
        r["numpy_threads_per_expert"] = {"weights": subn.size, "threads": threads, "seconds": round(dt, 3),
                                         "Mweights_per_s": round(subn.size / dt / 1e6, 1)}
        print(fmt, "numpy", r["numpy_threads_per_expert"], flush=True)
        save()
    del full

    # the whole layer as the loader builds it: from_tensors (quantize where auto says + repack), and
    # from_blocks on the same blocks (construction + repack only: what is left after quantization)
    from cpu_experts.formats_torch import quant_device, quantize
    kw = dict(fmt="q4_k", down_fmt="q4_0", numa="interleave")
    small = CPUExperts.from_tensors(gate[:2], up[:2], down[:2], **kw)   # JIT library compiled/cached once
    small.close()
    dt, ex = timed(lambda: CPUExperts.from_tensors(gate, up, down, **kw))
    ex.close()
    where = quant_device("q4_k")
    dq, blocks = timed(lambda: [quantize(w, f, where) for w, f in ((gate, "q4_k"), (up, "q4_k"), (down, "q4_0"))])
    dr, ex = timed(lambda: CPUExperts.from_blocks(*blocks, fmt="q4_k", down_fmt="q4_0", hidden=H, inter=I,
                                                  numa="interleave"))
    ex.close()
    res["from_tensors_v2lite_layer_q4k"] = {"quant_device": where, "seconds": round(dt, 3),
                                            "quantize_only_seconds": round(dq, 3),
                                            "from_blocks_repack_seconds": round(dr, 3),
                                            "weights": 3 * E * I * H, "layers_26_estimate_s": round(26 * dt, 1)}
    print("from_tensors", res["from_tensors_v2lite_layer_q4k"], flush=True)
    save()


if __name__ == "__main__":
    main()
