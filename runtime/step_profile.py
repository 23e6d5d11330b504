"""Where a hybrid decode step's time goes: `hmoe bench --breakdown`.

A decode step is one chain on the GPU stream. Per MoE layer with CPU experts the chain leaves the
GPU after the copies of hidden state, ids and weights to the host (the last device-to-host copy)
and comes back with the copy of the experts' output (the next host-to-device copy); in between
the CPU experts run, the shared experts run on the GPU, and the two hand-overs (start and join
the CPU job) cost what they cost. CUPTI (torch.profiler) gives every kernel and copy of a few
steps, graph replays included; the CPU experts' own time is the bench's (`cpu_experts_step_ms`:
every layer's native job back to back, random routing, no Python in between). So:

    step = GPU busy outside the CPU windows + CPU windows + idle gaps elsewhere
    CPU window - CPU experts alone = what the hand-over costs.

The worker pools also count, for the same profiled steps, each job's span from submit to its last
worker's exit (rdtsc): windows minus those spans is the hand-over measured without a second run,
and spans minus "alone" says whether the jobs themselves run slower inside a step.
"""

from __future__ import annotations

import time

import torch

from .bench_model import cpu_engines, cpu_part, expert_pools, job_cycles
from .moe import MoE


def hybrid_layers(model) -> list:
    """The HybridExperts (the CPU part of a split layer included) of every MoE layer that has one."""
    from orchestrator.hybrid import HybridExperts

    found = [cpu_part(layer.mlp.experts) for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    return [e for e in found if isinstance(e, HybridExperts)]


def _device_events(prof) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every kernel, copy and memset CUPTI saw, in start order."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            out.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(out)


def _is_d2h(name: str) -> bool:
    return "DtoH" in name or "Device -> Pinned" in name


def _is_h2d(name: str) -> bool:
    return "HtoD" in name or "Pinned -> Device" in name


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals (one merge pass)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def cpu_windows(events: list[tuple[float, float, str]]) -> list[tuple[float, float]]:
    """From the end of each run of device-to-host copies to the start of the next host-to-device copy."""
    windows, opened = [], None
    for i, (start, end, name) in enumerate(events):
        if _is_d2h(name) and (i + 1 == len(events) or not _is_d2h(events[i + 1][2])):
            opened = end
        elif _is_h2d(name) and opened is not None:
            windows.append((opened, max(opened, start)))
            opened = None
    return windows


def split_timeline(events: list[tuple[float, float, str]]) -> dict:
    """Totals (us) of a device timeline: the CPU windows, GPU busy time (union of events) inside
    and outside them, and idle time elsewhere (launch gaps, host waits)."""
    if not events:
        return {"span_us": 0.0, "cpu_windows_us": 0.0, "windows": 0, "gpu_busy_inside_windows_us": 0.0,
                "gpu_busy_outside_us": 0.0, "idle_elsewhere_us": 0.0}
    busy = _union([(s, e) for s, e, _ in events])
    windows = cpu_windows(events)
    span = max(e for _, e, _ in events) - events[0][0]
    inside = _overlap(busy, windows)
    outside = sum(e - s for s, e in busy) - inside
    total_windows = sum(e - s for s, e in windows)
    return {"span_us": span, "cpu_windows_us": total_windows, "windows": len(windows),
            "gpu_busy_inside_windows_us": inside, "gpu_busy_outside_us": outside,
            "idle_elsewhere_us": span - total_windows - outside}


def breakdown(runner, alone_ms: float | None, *, steps: int = 16, depth: int = 0) -> dict:
    """Profile `steps` decode steps of a bench Runner (after two warm-up steps). alone_ms: the CPU
    experts alone per step (`bench_model.cpu_experts_step_ms`, what the bench reports); the
    hand-over is the CPU windows minus it, when every CPU-kernel layer is GPU-driven (one window
    each). Per-step figures in ms."""
    from torch.profiler import ProfilerActivity, profile

    layers = hybrid_layers(runner.model)
    token = runner.test_ids[:1].to(runner.device)[None]
    for i in range(2):  # eager step and capture for this bucket
        token = runner.decode.step(token, depth + i)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    pools = expert_pools(runner.model)
    before = job_cycles(pools)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            token = runner.decode.step(token, depth + 2 + i)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cycles = job_cycles(pools) - before
    events = _device_events(prof)
    parts = split_timeline(events)
    if not layers or len(layers) != len(cpu_engines(runner.model)):
        alone_ms = None  # some CPU experts run without a window: windows - alone would mean nothing
    per_step = {k.removesuffix("_us") + "_ms": v / steps / 1e3 for k, v in parts.items() if k.endswith("_us")}
    window_ms = per_step["cpu_windows_ms"]
    jobs_ms = None
    if layers:
        from cpu_experts.pool import tsc_hz
        jobs_ms = cycles / tsc_hz() / steps * 1e3
    return {"steps": steps, "wall_step_ms": wall / steps * 1e3, **per_step,
            "cpu_jobs_in_step_ms": jobs_ms,
            "window_minus_jobs_per_layer_us": (window_ms - jobs_ms) / len(layers) * 1e3 if jobs_ms else None,
            "cpu_windows_per_step": parts["windows"] / steps, "hybrid_layers": len(layers),
            "cpu_experts_alone_native_ms": alone_ms,
            "handover_ms": window_ms - alone_ms if alone_ms else None,
            "handover_per_layer_us": (window_ms - alone_ms) / len(layers) * 1e3 if alone_ms else None,
            "top_gpu_ops": top_ops(events, steps)}


def top_ops(events: list[tuple[float, float, str]], steps: int, count: int = 15) -> list[dict]:
    """The GPU's kernels and copies by total time per step: what a step's GPU work is made of."""
    by_name: dict[str, list[float]] = {}
    for start, end, name in events:
        by_name.setdefault(name[:100], []).append(end - start)
    rows = [{"name": name, "calls_per_step": len(d) / steps, "us_per_step": sum(d) / steps}
            for name, d in by_name.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])[:count]


def describe(b: dict) -> str:
    text = (f"decode step {b['wall_step_ms']:.3f} ms (profiled span {b['span_ms']:.3f}): GPU busy outside the CPU "
            f"windows {b['gpu_busy_outside_ms']:.3f} ms, idle elsewhere {b['idle_elsewhere_ms']:.3f} ms, CPU windows "
            f"{b['cpu_windows_ms']:.3f} ms ({b['cpu_windows_per_step']:.0f} per step; GPU work inside them "
            f"{b['gpu_busy_inside_windows_ms']:.3f} ms)")
    if b["handover_ms"] is not None:
        text += (f"; CPU experts alone {b['cpu_experts_alone_native_ms']:.3f} ms, so the hand-over costs "
                 f"{b['handover_ms']:.3f} ms ({b['handover_per_layer_us']:.1f} us per layer)")
    if b.get("cpu_jobs_in_step_ms") is not None:
        text += (f"; the CPU jobs themselves (submit to last worker out) {b['cpu_jobs_in_step_ms']:.3f} ms, so "
                 f"{b['window_minus_jobs_per_layer_us']:.1f} us per layer of each window is copies and hand-over")
    if b.get("top_gpu_ops"):
        text += "\nGPU time per step by op: " + "; ".join(
            f"{r['name'][:60]} x{r['calls_per_step']:.0f} {r['us_per_step']:.0f} us" for r in b["top_gpu_ops"][:8])
    return text
