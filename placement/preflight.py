"""Preflight: does a plan fit the machine's free VRAM and available RAM, and if not, what to change.

Run before anything is loaded. Each device keeps a reserve the plan cannot use (see RESERVE).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import HmoeError

from .formats import CACHE_DTYPES, FORMATS, auto_format, cache_bytes_per_token
from .inventory import GiB, Inventory
from .ops import OPS, device_type
from .plan import Placement, Plan, raw_bytes

# Kept free on each device. GPU: the CUDA context, cuBLAS/Triton workspaces and one decode step's
# activations (a policy, not a measurement; raise it if a plan that "fits" runs out of memory).
# CPU: the OS, Python, torch and the tokenizer.
RESERVE = {"cuda": 1 * GiB, "cpu": 2 * GiB}


class PlanDoesNotFit(HmoeError):
    pass


@dataclass(frozen=True)
class Fit:
    device: str
    weights: int
    cache: int
    staging: int
    reserve: int
    capacity: int

    @property
    def need(self) -> int:
        return self.weights + self.cache + self.staging + self.reserve

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity


def fits(plan: Plan, inventory: Inventory) -> list[Fit]:
    return [Fit(d, u.weights, u.cache, u.staging, RESERVE[device_type(d)], inventory.capacity(d))
            for d, u in plan.usage().items()]


def check(plan: Plan, inventory: Inventory) -> list[Fit]:
    """The per-device fit; raises PlanDoesNotFit naming the first device that overflows and what to change."""
    result = fits(plan, inventory)
    for f in result:
        if not f.fits:
            over = f.need - f.capacity
            ideas = suggestions(plan, f, over)
            parts = [f"weights {gib(f.weights)}"] + ([f"latent cache {gib(f.cache)} for {plan.ctx} tokens"] if f.cache
                                                     else []) + \
                ([f"streaming buffers {gib(f.staging)}"] if f.staging else []) + [f"reserve {gib(f.reserve)}"]
            raise PlanDoesNotFit(
                f"{plan.rules.source}: the plan does not fit {f.device}: it needs {gib(f.need)} ({', '.join(parts)}) "
                f"and {gib(f.capacity)} is free; to free {gib(over)}: "
                + ("; or ".join(ideas) if ideas else "place fewer modules there"))
    return result


def suggestions(plan: Plan, f: Fit, over: int) -> list[str]:
    """Changes that each free bytes on f.device, largest first; enough to fit ones are marked."""
    ideas: list[tuple[int, str]] = []
    on_device = [p for p in plan.placements if p.home == f.device or p.device == f.device
                 or (p.gpu_experts and p.gpu_experts.device == f.device)]
    if f.cache:
        attention = [p for p in on_device if p.cache_bytes and p.device == f.device]
        per_token = sum(cache_bytes_per_token(plan.cfg, p.cache_dtype) for p in attention)
        page = max(p.page_size or 1 for p in attention)
        ctx_fit = (f.cache - over) // per_token // page * page  # whole pages only
        if ctx_fit >= 1:
            ideas.append((f.cache - per_token * ctx_fit, f"use --ctx {ctx_fit} or less"))
        dtypes = {p.cache_dtype for p in on_device if p.cache_bytes}
        if dtypes and min(CACHE_DTYPES[d] for d in dtypes) > 1:
            ideas.append((f.cache // 2, "set cache: {dtype: fp8} on the attention rule (halves the latent cache)"))
    by_rule: dict[object, list[Placement]] = {}
    for p in on_device:
        by_rule.setdefault(p.rule, []).append(p)
    for rule, group in by_rule.items():
        who = rule.label if rule else "'defaults'"
        here = sum(_bytes_on(p, f.device) for p in group)
        if not here:
            continue
        smaller = _smaller_format(plan, group, f.device)
        if smaller:
            fmt, saved = smaller
            ideas.append((saved, f"quant: {fmt} in {who} (saves {gib(saved)})"))
        gpu = group[0].gpu_experts
        if gpu and gpu.device == f.device:
            per = sum(p.gpu_bytes for p in group) / gpu.count
            fewer = max(gpu.count - int(-(-over // per)), 0)
            ideas.append((sum(p.gpu_bytes for p in group), f"gpu_experts: {fewer} in {who}" if fewer
                          else f"drop gpu_experts from {who}"))
        elif f.device != "cpu":
            names = sorted({p.unit.suffix for p in group})
            ideas.append((here, f"move {who} ({gib(here)} of {', '.join(names)}) to the CPU or narrow its layers"))
    if f.staging:
        ideas.append((f.staging, f"drop prefill streaming to {f.device} (its buffers take {gib(f.staging)})"))
    ideas.sort(key=lambda t: -t[0])
    return [text + (" (enough alone)" if saved >= over else "") for saved, text in ideas[:3]]


def _bytes_on(p: Placement, device: str) -> int:
    return (p.bytes if p.home == device else 0) + (p.gpu_bytes if p.gpu_experts and p.gpu_experts.device == device
                                                   else 0)


def _smaller_format(plan: Plan, group: list[Placement], device: str) -> tuple[str, int] | None:
    """The largest saving from a smaller format every placement of the group's op accepts."""
    group = [p for p in group if p.home == device]
    if not group:
        return None
    op = group[0].op
    accepted = OPS[op].formats[device_type(group[0].device)]
    now = sum(p.bytes for p in group)
    best = None
    for fmt in accepted:
        if FORMATS[fmt].block_bytes / FORMATS[fmt].block_elems >= \
                FORMATS[group[0].format].block_bytes / FORMATS[group[0].format].block_elems:
            continue
        sizes = [raw_bytes(p.unit, fmt, auto_format(plan.cfg.torch_dtype), op) for p in group]
        if None in sizes:
            continue  # rows not divisible by its block
        new = sum(size * p.replicas for size, p in zip(sizes, group))
        if best is None or now - new > best[1]:
            best = (fmt, now - new)
    return best


def gib(n: int | float) -> str:
    """A size for people: MiB below 1 GiB, else GiB."""
    if n < 2**10:
        return f"{n} B" if n else "0"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < GiB:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / GiB:.2f} GiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"
