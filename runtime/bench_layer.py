"""Timing of one MoE layer's routed experts on the CPU at a token count (used by `hmoe sweep` and the
orchestrator's threshold measurement).

The method is cpu_experts.bench's (`hmoe bench-moe`): random routing with distinct experts per
token, a warm-up call, the last-level cache flushed before each timed call, median of the calls.
Unlike bench-moe it times an engine it is given, so the caller decides weights, threads and NUMA.
"""

from __future__ import annotations

import time

import numpy as np

FLUSH_BYTES = 128 << 20  # more than any last-level cache we run on


def flush_buffer(nbytes: int = FLUSH_BYTES) -> np.ndarray:
    return np.ones(max(nbytes // 8, 1), np.int64)


def time_layer(engine, tokens: int, *, top_k: int, repeats: int, rng: np.random.Generator,
               flush: np.ndarray) -> dict:
    """One row: tokens, ms (median), ms_min, experts_touched, weight_gb, gbs, gflops."""
    from cpu_experts.bench import routing

    E, H, I = engine.E, engine.H, engine.I
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    engine.forward(x, routing(rng, tokens, E, top_k), w)  # warm: scratch allocation, page faults
    times, touched = [], []
    for _ in range(repeats):
        ids = routing(rng, tokens, E, top_k)
        flush.sum()
        t0 = time.perf_counter()
        engine.forward(x, ids, w)
        times.append(time.perf_counter() - t0)
        touched.append(len(np.unique(ids)))
    dt = float(np.median(times))
    nbytes = float(np.mean(touched)) * engine.bytes_per_expert()
    return dict(tokens=tokens, ms=dt * 1e3, ms_min=min(times) * 1e3, experts_touched=float(np.mean(touched)),
                weight_gb=nbytes / 1e9, gbs=nbytes / dt / 1e9, gflops=2.0 * 3 * tokens * top_k * H * I / dt / 1e9)


def repeats_for(tokens: int, repeats: int) -> int:
    """bench-moe's rule: all repeats up to 64 tokens, a third of them (at least 2) above."""
    return repeats if tokens <= 64 else max(2, repeats // 3)
