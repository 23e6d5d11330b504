"""The peer, timed like `hmoe bench-moe` in the same run: kt-kernel's (ktransformers) CPU MoE layer.

anchors.md gives kt-kernel's AMXINT8 / AMXINT4 figures from one earlier run of the GPU machine; the
machine behind the device tool has changed since (two hosts, prefill rates 1.5x apart for the same
code), so the issue's "≥ kt-kernel" comparison is only fair against kt-kernel measured beside us.
This script loads kt-kernel's compiled extension straight from its .so (a wheel's
`kt_kernel/_kt_kernel_ext_amx.cpython-*.so` with `kt_kernel.libs/` beside it: nothing to install, the
device machine has no network), builds one layer of random bf16 weights that kt-kernel quantizes
itself (online, nothing written to disk), and times it exactly as cpu_experts.bench.time_layer does:
the same routing (distinct experts per token, every expert present at large batches), the last-level
cache evicted before each call by a read on all cores that is also the call's yardstick (a
`PoolFlusher` on a pool of ours whose workers sleep at once after it, so they leave kt-kernel's
cores alone), median of the calls, GFLOP/s = 6·T·k·H·I / time, GB/s of the weight bytes touched,
and pct_bandwidth = the median over calls of the call's GB/s / its read's. Calls follow each other as
in a decode loop (with 100 ms of idle between them kt-kernel's 1-token call took 2-3x longer: run 3
in cpu_experts/NOTES.md); kt-kernel's workers still poll after a call and slow the next read, so its
pct_bandwidth reads high: compare milliseconds.

kt-kernel's weight bytes per expert are counted as its payload (int4: 0.5 byte per weight, int8: 1)
plus one fp32 scale per output row (0.1-0.2% of the payload).

`--accuracy FMTS` instead measures what each format costs in accuracy: one layer of E experts at the
shape's H and I from the same random bf16 weights, through kt-kernel's METHOD and through CPUExperts
in each of our formats, error against the float64 MoE of the bf16 weights (relative Frobenius norm).
A format written FMT:row or FMT:bf16amx runs every expert on that AMX prefill path (the i8row kernel
for gate/up and down, or the bf16 one), FMT:vec on the vector kernels (exact per-block scales, as at
decode), instead of the path 16 tokens would take.

Getting the extension (11 MB of the 100 MB wheel; the GPU machine's Python is 3.12):

    pip download kt-kernel==0.7.2 --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/kt
    mkdir -p _dev/kt && unzip /tmp/kt/kt_kernel-*.whl 'kt_kernel/_kt_kernel_ext_amx.*' 'kt_kernel.libs/*' -d _dev/kt

    python benchmarks/kt_peer.py --ext DIR/kt_kernel/_kt_kernel_ext_amx.cpython-312-x86_64-linux-gnu.so \
        --method AMXINT4 --shape v3 --threads 15 --tokens 1,8,512,2048 --out kt.json
    python benchmarks/kt_peer.py --ext ... --accuracy q4_k,q4_0,q8_0 --experts 8 --out acc.json
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpu_experts.bandwidth import PoolFlusher, measure_read_bandwidth  # noqa: E402
from cpu_experts.bench import SHAPES, pct_paired, repeats_for, routing  # noqa: E402
from cpu_experts.experts import CPUExperts  # noqa: E402
from cpu_experts.pool import WorkerPool  # noqa: E402
from runtime.bench_common import script_metadata, write_json  # noqa: E402

METHODS = {"AMXINT4": ("AMXInt4_MOE", 0.5), "AMXINT8": ("AMXInt8_MOE", 1.0)}


def load_ext(path: str):
    spec = importlib.util.spec_from_file_location("kt_kernel_ext", path)
    if spec is None:
        raise SystemExit(f"error: {path}: not a Python extension module")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def random_bf16(shape, seed: int) -> torch.Tensor:
    """[E, rows, cols] bf16, N(0, 0.02) values from a 16M-value pool tiled over the tensor: the values
    only need to be plausible weights for the quantizer; generating 11G normals would take minutes."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for s in range(0, flat.numel(), pool.numel()):
        n = min(pool.numel(), flat.numel() - s)
        flat[s:s + n] = pool[:n]
    return out


class KtLayer:
    def __init__(self, ext, method: str, E: int, k: int, H: int, I: int, threads: int, max_len: int, seed: int):
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count, cfg.subpool_numa_map, cfg.subpool_thread_count = 1, [0], [threads]
        self.cpu = ext.CPUInfer(cfg)
        self.mask = torch.zeros(E, dtype=torch.bool)   # no expert on the GPU
        gate, up = random_bf16((E, I, H), seed), random_bf16((E, I, H), seed + 1)
        down = random_bf16((E, H, I), seed + 2)
        c = ext.moe.MOEConfig(E, k, H, I, self.mask.data_ptr())
        c.layer_idx, c.pool, c.max_len = 0, self.cpu.backend_, max_len
        c.save, c.load = False, False   # quantize online from the bf16 tensors, keep in memory only
        c.gate_proj, c.up_proj, c.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
        c.path = "/nonexistent"
        self.moe = getattr(ext.moe, METHODS[method][0])(c)
        logical = torch.arange(E, dtype=torch.int64)
        t0 = time.perf_counter()
        self.cpu.submit(self.moe.load_weights_task(logical.data_ptr()))
        self.cpu.sync()
        self.quantize_s = time.perf_counter() - t0
        self.k, self.H = k, H
        self.weights = (gate, up, down)   # the accuracy check reads them; the timing drops them

    def forward(self, bsz: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
        self.cpu.submit(self.moe.forward_task(bsz.data_ptr(), self.k, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                              out.data_ptr(), False))
        self.cpu.sync(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ext", required=True, help="path of kt-kernel's compiled extension (.so)")
    ap.add_argument("--method", choices=sorted(METHODS), default="AMXINT4")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="v3")
    ap.add_argument("--threads", type=int, default=15, help="kt-kernel's worker threads (it wants cores - 1)")
    ap.add_argument("--tokens", default="1,8,512,2048")
    ap.add_argument("--repeats", type=int, default=10, help="as bench-moe: all up to 64 tokens, a third above")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accuracy", default=None, metavar="FMTS",
                    help="instead of timing: errors of kt-kernel's METHODs and of these hmoe formats")
    ap.add_argument("--experts", type=int, default=8, help="--accuracy: experts in the layer")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.accuracy:
        return accuracy(a, argv)
    s = SHAPES[a.shape]
    E, k, H, I = s["num_experts"], s["topk"], s["hidden"], s["inter"]
    tokens = [int(t) for t in a.tokens.split(",") if t]
    ext = load_ext(a.ext)
    t0 = time.perf_counter()
    layer = KtLayer(ext, a.method, E, k, H, I, a.threads, -(-max(tokens) // 64) * 64, a.seed)   # its buffers: whole tiles
    layer.weights = None
    print(f"# kt-kernel {a.method} {a.shape}: built in {time.perf_counter() - t0:.1f} s "
          f"(quantize {layer.quantize_s:.1f} s), {a.threads} threads", flush=True)
    bytes_per_expert = 3 * H * I * METHODS[a.method][1] + 4 * (2 * I + H)
    cpus = list(range(a.threads + 1))
    readings = [measure_read_bandwidth(a.threads + 1, cpus=cpus)]
    # a pool of ours only for the reads (spin=0: its workers sleep as soon as a read is done)
    reader = CPUExperts.random(fmt="q8_0", num_experts=1, hidden=256, inter=256, threads=1)
    flush = PoolFlusher(WorkerPool(reader.lib, a.threads + 1, cpus=cpus, spin=0))
    rng = np.random.default_rng(a.seed)
    rows = []
    for T in tokens:
        x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(torch.bfloat16)
        w = torch.from_numpy(rng.uniform(0.1, 1.0, (T, k)).astype(np.float32))
        out = torch.zeros(T, H, dtype=torch.bfloat16)
        bsz = torch.tensor([T], dtype=torch.int32)
        layer.forward(bsz, x, torch.from_numpy(routing(rng, T, E, k)), w, out)   # warm
        calls = []
        for _ in range(repeats_for(T, a.repeats)):
            ids = routing(rng, T, E, k)
            ids_t = torch.from_numpy(ids)
            reading = flush()
            t1 = time.perf_counter()
            layer.forward(bsz, x, ids_t, w, out)
            calls.append((time.perf_counter() - t1, len(np.unique(ids)) * bytes_per_expert, reading))
        times = [t for t, _, _ in calls]
        dt = float(np.median(times))
        nbytes = float(np.mean([n for _, n, _ in calls]))
        row = dict(tokens=T, ms=dt * 1e3, ms_min=min(times) * 1e3, experts_touched=nbytes / bytes_per_expert,
                   weight_gb=nbytes / 1e9, gbs=nbytes / dt / 1e9, gflops=6.0 * T * k * H * I / dt / 1e9,
                   read_gbs=float(np.median([r for _, _, r in calls])), pct_bandwidth=pct_paired(calls))
        rows.append(row)
        print(f"tokens {T:5d}  {row['ms']:9.3f} ms  {row['gbs']:7.1f} GB/s  {row['pct_bandwidth']:5.1f}% (reads "
              f"{row['read_gbs']:.1f} GB/s)  {row['gflops']:8.1f} GFLOP/s", flush=True)
    readings.append(measure_read_bandwidth(a.threads + 1, cpus=cpus))
    write_json(a.out, dict(**script_metadata("benchmarks/kt_peer.py", argv), peer="kt-kernel", ext=Path(a.ext).name,
                           method=a.method, shape=a.shape, threads=a.threads, bytes_per_expert=bytes_per_expert,
                           read_bandwidth_before_after_gbs=readings, read_bandwidth_threads=a.threads + 1,
                           quantize_s=layer.quantize_s, results=rows))
    return 0


def accuracy(a, argv) -> int:
    """Relative error of each engine against float64 math on the same bf16 weights (16 tokens, top-k)."""
    from cpu_experts.reference import moe_reference
    ext = load_ext(a.ext)
    s = SHAPES[a.shape]
    E, k, H, I = a.experts, min(s["topk"], a.experts), s["hidden"], s["inter"]
    rng = np.random.default_rng(a.seed)
    T = 16
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    results, ref, weights = [], None, None
    for method in sorted(METHODS):
        layer = KtLayer(ext, method, E, k, H, I, a.threads, 64, a.seed)
        if ref is None:
            weights = [t.float().numpy() for t in layer.weights]
            # x as kt-kernel gets it (bf16), so that only the weights' format differs
            x = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
            ref = moe_reference(x, ids, w, *weights)
        out = torch.zeros(T, H, dtype=torch.bfloat16)
        layer.forward(torch.tensor([T], dtype=torch.int32), torch.from_numpy(x).to(torch.bfloat16),
                      torch.from_numpy(ids), torch.from_numpy(w), out)
        err = float(np.linalg.norm(out.float().numpy() - ref) / np.linalg.norm(ref))
        results.append(dict(engine=f"kt-kernel {method}", rel_err=err))
        print(f"kt-kernel {method:8s} rel err {err:.4f}", flush=True)
        del layer
    for spec in a.accuracy.split(","):
        fmt, _, path = spec.partition(":")   # FMT:row / FMT:bf16amx / FMT:vec: every expert on that path
        tiles = None
        if path in ("row", "bf16amx"):
            from cpu_experts.codegen.moe import Tiles
            row = path == "row"
            tiles = Tiles(tokens=8, amx=True, amx_min_slots=1, amx_bf16_min_slots=1, amx_row=row, amx_row_down=row)
        ex = CPUExperts.from_tensors(*weights, fmt=fmt, threads=a.threads + 1, tiles=tiles,
                                     amx=False if path == "vec" else None)
        err = float(np.linalg.norm(ex.forward(x, ids, w) - ref) / np.linalg.norm(ref))
        ex.close()
        results.append(dict(engine=f"hmoe {spec}", rel_err=err))
        print(f"hmoe {spec:14s} rel err {err:.4f}", flush=True)
    write_json(a.out, dict(**script_metadata("benchmarks/kt_peer.py", argv), shape=a.shape, experts=E, top_k=k, tokens=T,
                           weights="N(0, 0.02) bf16, tiled 16M-value pool",
                           reference="float64 MoE of the bf16 weights, bf16-rounded x", results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
