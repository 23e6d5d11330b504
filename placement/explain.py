"""`hmoe rules explain`: the plan as a table grouped by layer ranges, then totals per device against
capacity; or the same as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from .formats import row_fallback
from .ops import FEATURES_TODAY, SLOW_FALLBACKS, device_type
from .plan import Placement, Plan
from .preflight import Fit, gib


@dataclass
class Run:
    """Consecutive layers whose module `suffix` is placed the same way."""
    suffix: str
    first: Placement
    layers: list[int] = field(default_factory=list)
    bytes: int = 0
    gpu_bytes: int = 0
    cache_bytes: int = 0

    @property
    def layer_text(self) -> str:
        if not self.layers:
            return "-"
        return str(self.layers[0]) if len(self.layers) == 1 else f"{self.layers[0]}-{self.layers[-1]}"


def _signature(p: Placement) -> tuple:
    return (p.device, p.op, p.format_text, p.home, p.rule and p.rule.index, p.gpu_experts, p.prefill, p.cache_dtype,
            p.page_size, p.threads, p.numa, p.replicas)


def runs(plan: Plan) -> list[Run]:
    out: list[Run] = []
    open_runs: dict[str, Run] = {}
    for p in plan.placements:
        run = open_runs.get(p.unit.suffix) if p.unit.layer is not None else None
        if run is None or _signature(run.first) != _signature(p) or run.layers[-1] != p.unit.layer - 1:
            run = Run(p.unit.suffix, p)
            out.append(run)
            if p.unit.layer is not None:
                open_runs[p.unit.suffix] = run
        if p.unit.layer is not None:
            run.layers.append(p.unit.layer)
        run.bytes += p.bytes
        run.gpu_bytes += p.gpu_bytes
        run.cache_bytes += p.cache_bytes
    return out


def _notes(run: Run) -> str:
    p = run.first
    notes = []
    if p.home != p.device:
        notes.append(f"weights in {'RAM' if p.home == 'cpu' else p.home}")
    if p.replicas > 1:
        notes.append(f"{p.replicas} NUMA replicas")
    if p.down_format:
        row = next(t.shape[-1] for t in p.unit.tensors if t.name.startswith("down_proj"))
        if p.down_format == row_fallback(p.format, row):
            notes.append(f"down_proj rows of {row} do not fill {p.format} blocks: {p.down_format}")
    if p.gpu_experts:
        g = p.gpu_experts
        which = f"the most used in {g.routing}" if g.routing else f"experts 0-{g.count - 1}, no routing statistics"
        notes.append(f"+{g.count} experts/layer on {g.device} {g.format} ({gib(run.gpu_bytes)}; {which})")
    if p.prefill:
        start = p.prefill.min_tokens or "auto"
        notes.append(f"prefill >= {start} tokens: {p.prefill.op} on {p.prefill.device}")
    if p.cache_dtype:
        page = f", pages of {p.page_size}" if p.page_size else ""
        notes.append(f"cache {p.cache_dtype}{page} {gib(run.cache_bytes)}")
    if p.threads or p.numa:
        notes.append(f"threads {p.threads or 'auto'}, numa {p.numa or 'default'}")
    return "; ".join(notes)


def render(plan: Plan, result: list[Fit], model_label: str) -> str:
    rows = [("layers", "module", "device", "op", "format", "weights", "rule", "notes")]
    for run in runs(plan):
        p = run.first
        rule = f"{p.rule.index} (line {p.rule.line})" if p.rule else "defaults"
        rows.append((run.layer_text, run.suffix, p.device, p.op, p.format_text, gib(run.bytes), rule, _notes(run)))
    lines = [f"{plan.rules.name}", f"  rules: {plan.rules.source}   model: {model_label}   context: {plan.ctx} tokens", ""]
    lines += _table(rows)
    lines.append("")
    totals = [("device", "weights", "cache", "streaming", "reserve", "need", "free", "use", "")]
    for f in result:
        totals.append((f.device, gib(f.weights), gib(f.cache), gib(f.staging), gib(f.reserve), gib(f.need),
                       gib(f.capacity), f"{100 * f.need / f.capacity:.0f}%" if f.capacity else "-",
                       "fits" if f.fits else "DOES NOT FIT"))
    lines += _table(totals)
    experts = sum(p.bytes + p.gpu_bytes for p in plan.placements if p.unit.kind == "experts")
    total = plan.total_weight_bytes
    lines.append("")
    lines.append(f"weights {gib(total)} in all; routed experts {gib(experts)} ({100 * experts / total:.1f}%)")
    defaulted = [p.name for p in plan.placements if p.rule is None]
    if defaulted:
        lines.append(f"placed by defaults (no rule matches): {len(defaulted)} modules, e.g. {', '.join(defaulted[:3])}")
    gaps = plan.gaps()
    missing = sorted({f"{gap} ({p.rule.label if p.rule else 'defaults'})" for p in plan.placements for gap in gaps[p.name]})
    if missing:
        lines.append(f"not in the runtime yet: {', '.join(missing)}")
    slow = sorted({f"{p.op} on {device_type(p.device)} ({p.format}): {SLOW_FALLBACKS[p.op, device_type(p.device), p.format]}"
                   for p in plan.placements if (p.op, device_type(p.device), p.format) in SLOW_FALLBACKS})
    if slow:
        lines.append(f"slow fallback: {'; '.join(slow)}")
    return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def to_json(plan: Plan, result: list[Fit], model_label: str) -> dict:
    gaps = plan.gaps()

    def module(p: Placement) -> dict:
        g = p.gpu_experts
        return {
            "name": p.name, "kind": p.unit.kind, "layer": p.unit.layer, "device": p.device, "op": p.op,
            "format": p.format, "down_format": p.down_format, "home": p.home, "bytes": p.bytes, "replicas": p.replicas,
            "rule": p.rule.index if p.rule else None, "line": p.rule.line if p.rule else None,
            "gpu_experts": {"count": g.count, "device": g.device, "format": g.format, "bytes": p.gpu_bytes,
                            "experts": list(p.gpu_expert_ids), "routing": g.routing} if g else None,
            "prefill": {"device": p.prefill.device, "op": p.prefill.op, "min_tokens": p.prefill.min_tokens or "auto"}
            if p.prefill else None,
            "cache": {"dtype": p.cache_dtype, "page_size": p.page_size, "bytes": p.cache_bytes} if p.cache_dtype else None,
            "threads": p.threads, "numa": p.numa,
            "runs_today": not gaps[p.name],
        }

    experts_by_device: dict[str, int] = {}
    for p in plan.placements:
        if p.unit.kind == "experts":
            experts_by_device[p.home] = experts_by_device.get(p.home, 0) + p.bytes
            if p.gpu_experts:
                d = p.gpu_experts.device
                experts_by_device[d] = experts_by_device.get(d, 0) + p.gpu_bytes
    return {
        "rules": {"name": plan.rules.name, "description": plan.rules.description, "source": plan.rules.source},
        "model": model_label, "ctx": plan.ctx,
        "modules": [module(p) for p in plan.placements],
        "devices": {f.device: {"weights": f.weights, "cache": f.cache, "staging": f.staging, "reserve": f.reserve,
                               "need": f.need, "free": f.capacity, "fits": f.fits} for f in result},
        "fits": all(f.fits for f in result),
        "total_weight_bytes": plan.total_weight_bytes,
        "routed_expert_bytes": experts_by_device,
        "warnings": list(plan.warnings),
        "features_today": dict(FEATURES_TODAY),
    }
