"""Benchmark of one MoE layer's routed experts (random weights and routing), used by `hmoe bench-moe`."""
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import time

import numpy as np

from .bandwidth import PoolFlusher, measure_read_bandwidth
from .experts import CPUExperts
from .pool import NATIVE_FN

SHAPES = {  # routed experts, top-k, hidden, moe inter
    "v2-lite": dict(num_experts=64, topk=6, hidden=2048, inter=1408),
    "v3": dict(num_experts=256, topk=8, hidden=7168, inter=2048),
}


def save_result(res: dict, module: str, args) -> None:
    """Record the command line (argparse namespace, `--out` left out) in res and write it to args.out if set."""
    res["command"] = f"python -m {module} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def routing(rng, T: int, E: int, k: int) -> np.ndarray:
    """Distinct experts per token; consecutive tokens walk a permutation so that T*k >= E covers all."""
    perm = rng.permutation(E)
    if T * k >= E:
        flat = np.concatenate([perm, rng.integers(0, E, T * k)])[:T * k]
        ids = flat.reshape(T, k)
        for t in range(T):  # keep experts distinct within a token
            row = ids[t]
            if len(set(row.tolist())) < k:
                extra = [e for e in rng.permutation(E) if e not in set(row.tolist())]
                _, first = np.unique(row, return_index=True)
                dup = sorted(set(range(k)) - set(first.tolist()))
                row[dup] = extra[:len(dup)]
        return ids
    return np.stack([rng.permutation(E)[:k] for _ in range(T)])


def _commit() -> str:
    """HEAD of this tree; $HMOE_COMMIT first (a copied tree inside another checkout would report that one's)."""
    if os.environ.get("HMOE_COMMIT"):
        return os.environ["HMOE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return ""
    return out if re.fullmatch(r"[0-9a-f]{40}", out) else ""


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def repeats_for(tokens: int, repeats: int) -> int:
    """All repeats up to 64 tokens, a third of them (at least 2) above: big batches are slow and steady."""
    return repeats if tokens <= 64 else max(2, repeats // 3)


def _timed(call, ex: CPUExperts, flush) -> tuple[float, float | None]:
    """flush() (evict the last-level cache; a PoolFlusher also returns the GB/s it read), workers
    spinning as between a decode step's layers, then the call's seconds; and flush's reading."""
    reading = flush()
    if reading is None:
        ex.pool.wake()   # an empty job; PoolFlusher's read was a job of this pool already
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0, reading


def time_layer(ex: CPUExperts, tokens: int, *, top_k: int, repeats: int, rng: np.random.Generator, flush,
               native: bool = False) -> dict:
    """One layer at `tokens`: random routing with distinct experts per token, a warm-up call, then per
    timed call `flush()` (evict the last-level cache; see _timed), median of the calls. One row: tokens,
    ms, ms_min, experts_touched, weight_gb, gbs, gflops; with a PoolFlusher also read_gbs (median of the
    calls' yardsticks: the mean of the reads right before and right after each) and pct_paired (median
    over calls of the call's GB/s / its yardstick).
    native: also time the bound native submit/wait (`CPUExperts.bind`, the path a GPU-driven decode
    step calls) on other routings, alternating with `forward`: ms_native, gbs_native (pct_paired_native);
    the difference is `forward`'s Python."""
    E, H, I = ex.E, ex.H, ex.I
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    ex.forward(x, routing(rng, tokens, E, top_k), w)  # warm: scratch allocation, page faults
    ids_bound, out_bound = np.zeros((tokens, top_k), np.int64), np.empty((tokens, H), np.float32)
    submit, wait, _ = ex.bind(x, ids_bound, w, out_bound)
    submit, wait = NATIVE_FN(submit), NATIVE_FN(wait)   # made once, outside the timed calls
    seq = []   # (kind, seconds, bytes, the reading before) per timed call, in the order run
    for _ in range(repeats):
        ids = routing(rng, tokens, E, top_k)
        dt, reading = _timed(lambda: ex.forward(x, ids, w), ex, flush)
        seq.append(("", dt, len(np.unique(ids)) * ex.bytes_per_expert(), reading))
        if native:
            ids_bound[:] = routing(rng, tokens, E, top_k)
            job = ex.bind(x, ids_bound, w, out_bound)[2]   # forward() re-pointed the job at its own arrays
            dt, reading = _timed(lambda: (submit(job), wait(job)), ex, flush)
            seq.append(("_native", dt, len(np.unique(ids_bound)) * ex.bytes_per_expert(), reading))
    # each call sits between two reads, the one before it and the next call's (or a last one): its
    # yardstick is their mean, so a bandwidth that moves during the call counts on both sides
    after = [r for _, _, _, r in seq[1:]] + [flush()]
    calls = {"": [], "_native": []}   # (seconds, bytes, reading) per timed call
    for (kind, dt, n, before), nxt in zip(seq, after):
        calls[kind].append((dt, n, None if before is None else (before + nxt) / 2))
    everything = calls[""] + calls["_native"]
    nbytes = float(np.mean([n for _, n, _ in everything]))
    times = [t for t, _, _ in calls[""]]
    dt = float(np.median(times))
    row = dict(tokens=tokens, ms=dt * 1e3, ms_min=min(times) * 1e3, experts_touched=nbytes / ex.bytes_per_expert(),
               weight_gb=nbytes / 1e9, gbs=nbytes / dt / 1e9, gflops=2.0 * 3 * tokens * top_k * H * I / dt / 1e9)
    if native:
        dn = float(np.median([t for t, _, _ in calls["_native"]]))
        row.update(ms_native=dn * 1e3, gbs_native=nbytes / dn / 1e9)
    if everything[0][2] is not None:
        reads = [r for *_, r in seq] + after[-1:]
        row["read_gbs"] = float(np.median([r for _, _, r in everything]))
        row["read_gbs_range"] = [min(reads), max(reads)]
        for suffix, cs in calls.items():
            if cs:
                row["pct_paired" + suffix] = pct_paired(cs)
    return row


def pct_paired(calls) -> float:
    """calls: (seconds, bytes, yardstick GB/s) per call -> the median over calls of the call's GB/s as a %
    of its yardstick."""
    return 100 * float(np.median([n / t / 1e9 / r for t, n, r in calls]))


def run(shape: str, fmt: str, threads: int, tokens: list[int], numa: str = "interleave", isa: str | None = None,
        amx: bool | None = None, repeats: int = 10, seed: int = 0, native: bool = True, log=print) -> dict:
    s = SHAPES[shape]
    E, k, H, I = s["num_experts"], s["topk"], s["hidden"], s["inter"]
    t0 = time.perf_counter()
    ex = CPUExperts.random(fmt=fmt, num_experts=E, hidden=H, inter=I, threads=threads, numa=numa, isa=isa,
                           amx=amx, seed=seed)
    build_s = time.perf_counter() - t0
    bw0 = measure_read_bandwidth(threads, cpus=ex.pool.cpus)
    log(f"# {shape} {fmt} isa={ex.isa.name} amx={ex.tiles.amx} threads={threads} cpus={ex.pool.cpus} numa={ex.numa} "
        f"read bandwidth {bw0:.1f} GB/s (weights built in {build_s:.1f} s)")
    rng = np.random.default_rng(seed)
    # 512 MiB read by the pool's workers before each call: evicts the LLC (300 MiB on the GPU machine); the
    # reads before and after a call are its yardstick (pct_bandwidth: the median over calls of GB/s / it)
    flush = PoolFlusher(ex.pool)
    rows = [time_layer(ex, T, top_k=k, repeats=repeats_for(T, repeats), rng=rng, flush=flush, native=native)
            for T in tokens]
    bw1 = measure_read_bandwidth(threads, cpus=ex.pool.cpus)
    bw = max([bw0, bw1] + [r["read_gbs_range"][1] for r in rows])
    log(f"# read bandwidth {bw0:.1f} GB/s before, {bw1:.1f} after; the reads around the calls "
        f"{min(r['read_gbs_range'][0] for r in rows):.1f}-{max(r['read_gbs_range'][1] for r in rows):.1f}; "
        f"% = each call against the mean of the reads right before and after it (median), and against the "
        f"largest reading {bw:.1f}")
    for row in rows:
        row["pct_bandwidth"] = row["pct_paired"]
        row["pct_of_max_reading"] = 100 * row["gbs"] / bw
        native_txt = f"  native {row['ms_native']:9.3f} ms {row['pct_paired_native']:5.1f}%" if native else ""
        log(f"tokens {row['tokens']:5d}  {row['ms']:9.3f} ms  {row['gbs']:7.1f} GB/s  {row['pct_bandwidth']:5.1f}% "
            f"(reads {row['read_gbs']:.1f} GB/s; {row['pct_of_max_reading']:5.1f}% of the max)  {row['gflops']:8.1f} "
            f"GFLOP/s{native_txt}")
    ex.close()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=cpu_model(), isa=ex.isa.name, amx=ex.tiles.amx, cpu=ex.isa.cpu, threads=threads, cpus=ex.pool.cpus,
                numa=ex.numa, shape=shape, fmt=fmt, read_bandwidth_gbs=bw, read_bandwidth_before_after_gbs=[bw0, bw1],
                bytes_per_expert=ex.bytes_per_expert(), tiles=dataclasses.asdict(ex.tiles),
                commit=_commit(), results=rows)
