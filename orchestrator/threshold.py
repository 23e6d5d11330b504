"""When to stream a layer's routed experts to the GPU instead of computing them on the CPU (prefill).

Computing T tokens of one MoE layer on the CPU costs cpu(T), measured (`measure.cpu_curve`).
Streaming costs the copy of the layer's experts in their compact format over PCIe, plus the GPU's
own work: with layer i+1 prefetched on a copy stream while layer i computes (double buffering),
one layer costs max(copy, gpu(T)); without the overlap copy + gpu(T). The threshold is the
smallest T at which streaming is no slower. Pure functions of measured numbers: the CPU tests
pin the arithmetic, `measure.py` supplies the numbers on a real machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuCurve:
    """Seconds of one MoE layer's routed experts on the CPU at measured token counts.

    Between points the time is interpolated linearly; below the first point it is the first
    point's time (a token batch never costs less than the weights it must read); above the last
    point it grows in proportion to T (large batches are compute-bound)."""

    points: tuple[tuple[int, float], ...]  # (tokens, seconds), tokens strictly increasing

    def __post_init__(self):
        if not self.points:
            raise ValueError("a CPU curve needs at least one (tokens, seconds) point")
        tokens = [t for t, _ in self.points]
        if tokens != sorted(set(tokens)) or tokens[0] < 1:
            raise ValueError(f"CPU curve token counts must be positive and strictly increasing, got {tokens}")
        if any(not s > 0 for _, s in self.points):
            raise ValueError(f"CPU curve times must be positive, got {[s for _, s in self.points]}")

    def seconds(self, tokens: float) -> float:
        pts = self.points
        if tokens <= pts[0][0]:
            return pts[0][1]
        for (ta, sa), (tb, sb) in zip(pts, pts[1:]):
            if tokens <= tb:
                return sa + (sb - sa) * (tokens - ta) / (tb - ta)
        t_last, s_last = pts[-1]
        return s_last * tokens / t_last


def stream_seconds(tokens: float, *, layer_bytes: float, pcie_gbs: float, gpu_ms_per_token: float = 0.0,
                   overlap: bool = True) -> float:
    """Seconds per layer of the streamed path: copy of the layer's experts and GPU compute of T tokens."""
    copy = layer_bytes / (pcie_gbs * 1e9)
    gpu = tokens * gpu_ms_per_token / 1e3
    return max(copy, gpu) if overlap else copy + gpu


def prefill_threshold(cpu: CpuCurve, *, layer_bytes: float, pcie_gbs: float, gpu_ms_per_token: float = 0.0,
                      overlap: bool = True) -> int | None:
    """Smallest token count at which streaming one layer's experts to the GPU is no slower than the
    CPU, or None when it never is (the GPU's own per-token cost is at least the CPU's)."""
    if not layer_bytes > 0 or not pcie_gbs > 0 or gpu_ms_per_token < 0:
        raise ValueError(f"need layer_bytes > 0, pcie_gbs > 0 and gpu_ms_per_token >= 0, got {layer_bytes}, "
                         f"{pcie_gbs}, {gpu_ms_per_token}")
    cost = dict(layer_bytes=layer_bytes, pcie_gbs=pcie_gbs, gpu_ms_per_token=gpu_ms_per_token, overlap=overlap)
    # Both sides are piecewise linear in T; the streamed side bends once (copy = gpu) when overlapped.
    breaks = [1.0] + [float(t) for t, _ in cpu.points]
    if overlap and gpu_ms_per_token > 0:
        breaks.append(layer_bytes / (pcie_gbs * 1e9) / (gpu_ms_per_token / 1e3))
    breaks = sorted({b for b in breaks if b >= 1})
    for lo, hi in zip(breaks, breaks[1:] + [math.inf]):
        found = _first_crossing(cpu, cost, lo, hi)
        if found is not None:
            return found
    return None


def _first_crossing(cpu: CpuCurve, cost: dict, lo: float, hi: float) -> int | None:
    """Smallest integer T in [lo, hi] with cpu(T) >= stream(T); both sides are linear on [lo, hi]."""
    def gain(t):  # >= 0: streaming is no slower
        return cpu.seconds(t) - stream_seconds(t, **cost)

    first = math.ceil(lo)
    if first > hi:
        return None
    if gain(first) >= 0:
        return first
    slope = gain(lo + 1) - gain(lo) if math.isinf(hi) else (gain(hi) - gain(lo)) / (hi - lo)
    if slope <= 0:
        return None
    t = max(first, math.ceil(lo - gain(lo) / slope - 1e-9))
    while t <= hi and gain(t) < 0:  # rounding of the division above
        t += 1
    return t if t <= hi else None


def layer_stream_bytes(fmt: str, *, num_experts: int, hidden: int, inter: int) -> int:
    """Bytes of one layer's routed experts in their compact (GGUF block) format: what crosses PCIe."""
    from cpu_experts.formats import get_format

    f = get_format(fmt)
    return num_experts * (2 * inter * f.row_bytes(hidden) + hidden * f.row_bytes(inter))
