"""The placement plan: every module's device, op, format and bytes, from the rules and the config.

No weights are read: bytes come from tensor shapes (placement/modules.py) and format sizes
(placement/formats.py). Problems that need the model (an op that cannot run a module kind, a
block format that does not divide a row, `dtype: auto` resolving to a format the op cannot run)
are RulesErrors at the rule's line; rules that place nothing are warnings.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

from runtime.config import ModelConfig
from runtime.errors import HmoeError

from gpu_attention.latent_cache import DEFAULT_PAGE_SIZE

from .formats import FORMATS, auto_format, cache_bytes_per_token, fits_rows, jit_bytes_per_weight, row_fallback
from .match import assign, unused_rule_warnings
from .modules import Unit, model_units
from .ops import OPS, format_problem, runtime_gaps, weights_home
from .schema import AUTO, GpuExperts, Prefill, Rule, RuleSet
from .yaml_lines import RulesError

STAGING_BUFFERS = 2  # streamed experts are double-buffered: layer i+1 is copied while layer i computes


@dataclass(frozen=True)
class Placement:
    unit: Unit
    rule: Rule | None  # None: placed by `defaults`
    device: str  # where it computes
    op: str
    format: str
    home: str  # where its weights live (RAM for streamed experts)
    bytes: int  # weight bytes at `home`, NUMA replicas included
    replicas: int = 1
    gpu_experts: GpuExperts | None = None
    gpu_bytes: int = 0  # bytes of the experts kept on gpu_experts.device
    gpu_expert_ids: tuple[int, ...] = ()  # which experts those are (ascending)
    prefill: Prefill | None = None
    streamed_bytes: int = 0  # bytes copied per forward when streamed (main op or prefill)
    cache_dtype: str | None = None
    page_size: int | None = None
    cache_bytes: int = 0  # latent cache (and V3.2 indexer keys) of this attention layer, on `device`
    threads: int | None = None
    numa: str | None = None
    down_format: str | None = None  # jit experts whose source keeps down_proj in another kernel format

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def format_text(self) -> str:
        return f"{self.format}/{self.down_format}" if self.down_format else self.format


@dataclass(frozen=True)
class DeviceUse:
    weights: int = 0
    cache: int = 0
    staging: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.staging


@dataclass(frozen=True)
class Plan:
    rules: RuleSet
    cfg: ModelConfig
    ctx: int
    placements: tuple[Placement, ...]
    staging: tuple[tuple[str, int], ...]  # device -> bytes of streaming buffers
    warnings: tuple[str, ...]
    base: str = "bf16"  # the compute dtype: vectors (norms) of quantized modules are stored in it

    def usage(self) -> dict[str, DeviceUse]:
        weights, cache = defaultdict(int), defaultdict(int)
        for p in self.placements:
            weights[p.home] += p.bytes
            if p.gpu_experts:
                weights[p.gpu_experts.device] += p.gpu_bytes
            cache[p.device] += p.cache_bytes
        staging = dict(self.staging)
        devices = sorted(set(weights) | set(cache) | set(staging), key=_device_order)
        return {d: DeviceUse(weights[d], cache[d], staging.get(d, 0)) for d in devices}

    @property
    def total_weight_bytes(self) -> int:
        return sum(p.bytes + p.gpu_bytes for p in self.placements)

    @property
    def attention_devices(self) -> dict[int, str]:
        """Layer -> the device its attention (and so its residual stream and latent cache) is on."""
        return {p.unit.layer: p.device for p in self.placements if p.unit.kind == "attention"}

    def gaps(self) -> dict[str, list[str]]:
        """Per module, what the runtime cannot run yet of its placement (assembly refuses on these,
        `rules explain` lists them)."""
        attention = self.attention_devices
        return {p.name: runtime_gaps(p, attention.get(p.unit.layer, "none")) for p in self.placements}


def build_plan(rules: RuleSet, cfg: ModelConfig, *, ctx: int, numa_nodes: int = 1, auto_dtype: str | None = None,
               stored_experts: dict[int, tuple[str, str]] | None = None) -> Plan:
    """auto_dtype: what `dtype: auto` means (default: the checkpoint's dtype; bf16 for FP8 ones).
    stored_experts: layer -> (gate/up, down) formats of a weight source (a GGUF) that stores routed
    experts' down_proj in another format the kernels run: a `jit` placement in the gate/up format
    keeps that down format (no requantization), and its bytes count it."""
    if ctx < 1 or ctx > cfg.max_position_embeddings:
        raise HmoeError(f"--ctx {ctx} is outside the model's context of 1-{cfg.max_position_embeddings} tokens")
    units = model_units(cfg)
    assigned = assign(rules, units)
    base = auto_dtype or auto_format(cfg.torch_dtype)  # norms, biases of quantized modules: the compute dtype
    placements = tuple(_place(rules, cfg, unit, rule, base, ctx, numa_nodes, stored_experts or {})
                       for unit, rule in assigned)
    _check_fields_apply(rules, assigned)
    staging: dict[str, int] = defaultdict(int)
    for p in placements:
        for op, device in ((p.op, p.device), (p.prefill.op, p.prefill.device) if p.prefill else (None, None)):
            if op is not None and OPS[op].weights_on_host:
                staging[device] = max(staging[device], STAGING_BUFFERS * p.streamed_bytes)
    warnings = unused_rule_warnings(rules, units, assigned, cfg.num_hidden_layers)
    warnings += [f"{rule.label}: gpu_experts keeps experts 0-{rule.gpu_experts.count - 1} of each layer on "
                 f"{rule.gpu_experts.device}, as no routing statistics were given (add 'routing: FILE' from "
                 f"`hmoe bench --collect-routing FILE` to keep the most used ones)"
                 for rule in rules.rules if rule.gpu_experts and rule.gpu_experts.routing is None
                 and any(p.rule is rule and p.gpu_experts for p in placements)]
    return Plan(rules, cfg, ctx, placements, tuple(sorted(staging.items())), tuple(warnings), base)


def _place(rules: RuleSet, cfg: ModelConfig, unit: Unit, rule: Rule | None, base: str, ctx: int,
           numa_nodes: int, stored_experts: dict[int, tuple[str, str]]) -> Placement:
    d = rules.defaults
    device = (rule and rule.device) or d.device
    op = (rule and rule.op) or d.op
    fmt = (rule and rule.format) or d.format
    where = Blame(rules, rule)
    if unit.kind not in OPS[op].kinds:
        where.fail("op", f"op '{op}' runs {', '.join(OPS[op].kinds)}, but {where.who} places {unit.name} "
                         f"(kind {unit.kind}); narrow 'match' or put a rule for it first")
    if fmt == AUTO:
        fmt = base
        problem = format_problem(op, device, fmt)
        if problem:
            where.fail("dtype", f"dtype auto is {fmt} for this checkpoint and {problem}; set 'quant' or 'dtype'")
    stored = stored_experts.get(unit.layer) if unit.kind == "experts" and op == "jit" else None
    down_fmt = stored[1] if stored and stored[0] == fmt and stored[1] != fmt else None
    if down_fmt is None and unit.kind == "experts" and op == "jit":  # V2-Lite's down rows in q4_k: q4_0
        down_fmt = row_fallback(fmt, cfg.moe_intermediate_size)
    gpu = rule.gpu_experts if rule and unit.kind == "experts" else None
    prefill = rule.prefill if rule else None
    if prefill and unit.kind not in OPS[prefill.op].kinds:
        where.fail("prefill", f"prefill op '{prefill.op}' runs {', '.join(OPS[prefill.op].kinds)}, but "
                              f"{where.who} places {unit.name} (kind {unit.kind})")

    gpu_ids: tuple[int, ...] = ()
    if gpu is None:
        weight_bytes = unit_bytes(unit, fmt, base, where, "quant", op, down_fmt)
        gpu_bytes = 0
    else:
        experts = cfg.n_routed_experts
        if gpu.count >= experts:
            where.fail("gpu_experts", f"gpu_experts {gpu.count} is every one of the layer's {experts} experts; "
                                      f"place the experts on {gpu.device} with 'device' instead")
        per_expert = unit_bytes(unit, fmt, base, where, "quant", op, down_fmt) // experts
        weight_bytes = per_expert * (experts - gpu.count)
        gpu_bytes = unit_bytes(unit, gpu.format, base, where, "gpu_experts") // experts * gpu.count
        gpu_ids = _gpu_expert_ids(gpu, unit.layer, experts, where)

    replicas = numa_nodes if rule and rule.numa == "replicate" else 1
    streamed = weight_bytes if (OPS[op].weights_on_host or (prefill and OPS[prefill.op].weights_on_host)) else 0
    cache_dtype = page_size = None
    cache_bytes = 0
    if unit.kind == "attention":
        options = rule.cache if rule else None
        cache_dtype = (options and options.dtype) or (fmt if FORMATS[fmt].is_float else "bf16")
        page_size = (options and options.page_size) or DEFAULT_PAGE_SIZE
        rows = math.ceil(ctx / page_size) * page_size  # whole pages, one sequence
        cache_bytes = rows * cache_bytes_per_token(cfg, cache_dtype)
    return Placement(unit, rule, device, op, fmt, weights_home(op, device), weight_bytes * replicas, replicas,
                     gpu, gpu_bytes, gpu_ids, prefill, streamed, cache_dtype, page_size, cache_bytes,
                     rule.threads if rule else None, rule.numa if rule else None, down_fmt)


def _gpu_expert_ids(gpu: GpuExperts, layer: int, experts: int, where: "Blame") -> tuple[int, ...]:
    """The layer's experts to keep on the GPU: the most used in the statistics, else 0..count-1."""
    if gpu.routing is None:
        return tuple(range(gpu.count))
    from .routing import load_routing

    try:
        return load_routing(gpu.routing, n_routed_experts=experts).most_used(layer, gpu.count)
    except HmoeError as e:
        where.fail("gpu_experts", str(e))


def raw_bytes(unit: Unit, fmt: str, base: str, op: str = "torch", down_fmt: str | None = None) -> int | None:
    """Weight bytes of `unit` stored in `fmt` by `op` (vectors in `base`; experts' down_proj in
    down_fmt when given); None if a row does not fill whole blocks. The `jit` op stores cpu_experts'
    repacked layout, not GGUF blocks."""
    if down_fmt and down_fmt != fmt:
        down = [t for t in unit.tensors if t.name.startswith("down_proj")]
        rest = dataclasses.replace(unit, tensors=tuple(t for t in unit.tensors if t not in down))
        parts = (raw_bytes(rest, fmt, base, op), raw_bytes(dataclasses.replace(unit, tensors=tuple(down)), down_fmt,
                                                          base, op))
        return None if None in parts else sum(parts)
    f = FORMATS[fmt]
    per_weight = jit_bytes_per_weight(fmt) if op == "jit" else None
    total = 0
    for t in unit.tensors:
        if t.keep_fp32:
            total += 4 * math.prod(t.shape)
        elif len(t.shape) == 1:
            total += FORMATS[fmt if f.is_float else base].block_bytes * t.shape[0]
        elif not fits_rows(fmt, t.shape[-1]):
            return None
        elif per_weight is not None:
            total += round(math.prod(t.shape) * per_weight)
        else:
            total += f.matrix_bytes(t.shape)
    return total


def unit_bytes(unit: Unit, fmt: str, base: str, blame: "Blame", key: str, op: str = "torch",
               down_fmt: str | None = None) -> int:
    """raw_bytes, or a RulesError at the rule's `key` naming the tensor whose rows do not fit the blocks."""
    total = raw_bytes(unit, fmt, base, op, down_fmt)
    if total is None:
        t = next(t for t in unit.tensors if len(t.shape) > 1 and not fits_rows(fmt, t.shape[-1]))
        ok = [name for name in FORMATS if fits_rows(name, t.shape[-1]) and name != fmt]
        blame.fail(key, f"{fmt} packs rows in blocks of {FORMATS[fmt].block_elems} values, but "
                        f"{unit.name}.{t.name} has rows of {t.shape[-1]}; choose a format whose block divides it "
                        f"({', '.join(ok)})")
    return total


def _check_fields_apply(rules: RuleSet, assigned: list[tuple[Unit, Rule | None]]) -> None:
    """A field that applies to none of a rule's modules is a mistake, not something to ignore."""
    kinds: dict[int, set[str]] = defaultdict(set)
    for unit, rule in assigned:
        if rule is not None:
            kinds[rule.index].add(unit.kind)
    for rule in rules.rules:
        if rule.index not in kinds:
            continue  # places nothing: a warning of its own
        if rule.cache and "attention" not in kinds[rule.index]:
            Blame(rules, rule).fail("cache", f"'cache' sets up the latent cache of attention modules, but "
                                              f"{rule.label} places no self_attn module")
        if rule.gpu_experts and "experts" not in kinds[rule.index]:
            Blame(rules, rule).fail("gpu_experts", f"'gpu_experts' is for routed experts, but {rule.label} "
                                                    f"places no mlp.experts module")


class Blame:
    """The file:line to blame for a field: the rule's key if it sets it, else `defaults`."""

    def __init__(self, rules: RuleSet, rule: Rule | None):
        self.rules, self.rule = rules, rule
        self.who = rule.label if rule else "'defaults'"

    def fail(self, key: str, message: str):
        if self.rule is None:
            line = self.rules.defaults.line
        else:
            keys = dict(self.rule.key_lines)
            alias = {"dtype": ("dtype", "quant", "op"), "quant": ("quant", "dtype"), "op": ("op", "device")}
            line = next((keys[k] for k in alias.get(key, (key,)) if k in keys), self.rule.line)
        raise RulesError(f"{self.rules.source}:{line}: {message}")


def _device_order(device: str):
    return (0, 0) if device == "cpu" else (1, int(device.split(":")[1]))
