"""`hmoe rules tune`: write rules that put as much on the GPU as fits, in the order that helps decode most.

Decode reads every active weight once per token, so what runs on the GPU is what its bandwidth
speeds up. Order:
  1. attention + latent cache, routers, norms, dense MLPs, shared experts, lm_head: every token
     uses all of them (bf16; fp8 for attention/MLPs when bf16 does not fit);
  2. routed experts, whole layers first: a layer on the GPU takes its experts off the CPU's
     critical path entirely;
  3. then N experts of every remaining layer (each removes N/E of that layer's CPU work on average);
  4. the rest of the routed experts on the CPU, in the most precise format that fits RAM.
The embedding table stays in RAM: a lookup reads one row per token, nothing for a GPU to speed up.
The result is written as YAML, parsed back and planned like any user file, and must fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_attention.latent_cache import DEFAULT_PAGE_SIZE
from runtime.config import ModelConfig
from runtime.errors import HmoeError

from .formats import PRECISION_ORDER, auto_format, cache_bytes_per_token
from .inventory import Inventory
from .modules import Unit, model_units
from .ops import FEATURES_TODAY, OPS, gpu_experts_run_today, runs_today
from .plan import Plan, build_plan, raw_bytes
from .preflight import RESERVE, check, gib
from .schema import AUTO, RuleSet, parse_rules

# Default rules keep experts on the GPU beside CPU ones only when at least this share of a layer's
# experts fits: a split layer launches ~20 more small GPU kernels per step (runtime/split_experts.py),
# which a 1-of-256 split does not repay while the step is launch-bound.
MIN_GPU_EXPERTS_SHARE = 20

PAGE_SIZE = DEFAULT_PAGE_SIZE  # latent cache page (tokens)

ATTN = r"model\.layers\.\d+\.self_attn"
MLPS = r"model\.layers\.\d+\.mlp(\.shared_experts)?"
EXPERTS = r"model\.layers\.\d+\.mlp\.experts"
EMBED = r"model\.embed_tokens"


@dataclass(frozen=True)
class Tuned:
    text: str  # the rules file
    reasons: tuple[str, ...]
    rules: RuleSet
    plan: Plan


def tune(cfg: ModelConfig, inventory: Inventory, *, ctx: int, expert_quant: str = AUTO,
         source: str = "<tuned>", runnable_only: bool = False) -> Tuned:
    """runnable_only: use only what the runtime runs today (the default rules hmoe loads with);
    otherwise plan with every op of the table (a file for the runtime as it is being built)."""
    if expert_quant != AUTO and expert_quant not in OPS["jit"].formats["cpu"]:
        raise HmoeError(f"--expert-quant '{expert_quant}' is not a CPU expert format; choose auto or one of "
                        f"{', '.join(OPS['jit'].formats['cpu'])}")
    units = model_units(cfg)
    base = auto_format(cfg.torch_dtype)
    experts = [u for u in units if u.kind == "experts"]
    embed = [u for u in units if u.kind == "embed"]
    reasons: list[str] = []
    ram = inventory.ram_bytes - RESERVE["cpu"]
    say = reasons.append

    gpu = _gpu_core(cfg, units, inventory, ctx, say, runnable_only) if inventory.gpus else None
    if not inventory.gpus:
        say("no GPU: everything runs on the CPU")
    rules: list[str] = []
    on_gpu_layers: list[int] = []
    per_layer_gpu = 0
    if gpu is not None:
        core_fmt, cache_dtype, left = gpu
        # experts on the GPU use the format the core settled on, where the runtime runs experts in it
        gpu_fmt = core_fmt if not runnable_only or gpu_experts_run_today("cuda:0", core_fmt) else "bf16"
        layer_bytes = _sum(experts[:1], gpu_fmt, base) if experts else 0
        n_whole = min(left // layer_bytes, len(experts)) if layer_bytes else 0
        on_gpu_layers = [u.layer for u in experts[:n_whole]]
        left -= n_whole * layer_bytes
        if experts:
            say(f"routed experts: one layer is {gib(layer_bytes)} in {gpu_fmt}; {n_whole} of {len(experts)} "
                f"layers fit whole on cuda:0" + (f" (layers {_span(on_gpu_layers)})" if n_whole else ""))
        if on_gpu_layers:
            rules.append(_rule(EXPERTS, layers=_span(on_gpu_layers), device="cuda:0", quant=gpu_fmt))
        rest = experts[n_whole:]
        per_expert = layer_bytes // cfg.n_routed_experts if experts else 0
        if rest and per_expert and runnable_only and not FEATURES_TODAY["gpu_experts"]:
            say(f"{gib(left)} of VRAM stays unused: keeping some experts of each CPU layer on the GPU "
                "(gpu_experts) needs the hybrid orchestrator, which is not in the runtime yet")
        elif rest and per_expert:
            per_layer_gpu = min(left // (per_expert * len(rest)), cfg.n_routed_experts - 1)
            if runnable_only and 0 < per_layer_gpu * MIN_GPU_EXPERTS_SHARE < cfg.n_routed_experts:
                say(f"{per_layer_gpu} experts of each CPU layer would fit on cuda:0, under 1/{MIN_GPU_EXPERTS_SHARE} "
                    f"of the layer's {cfg.n_routed_experts}: not worth the split's extra GPU work per layer")
                per_layer_gpu = 0
            elif per_layer_gpu:
                left -= per_layer_gpu * per_expert * len(rest)
                say(f"then {per_layer_gpu} experts of each of the other {len(rest)} layers on cuda:0 "
                    f"({gib(per_layer_gpu * per_expert * len(rest))}); {gib(left)} of VRAM stays unused")
            else:
                say(f"{gib(left)} of VRAM left is less than one expert ({gib(per_expert)}) in each of the "
                    f"{len(rest)} CPU layers")
        embed_bytes = _sum(embed, "bf16", base)
        if not rest and left >= embed_bytes:
            rules.append(_rule(EMBED, device="cuda:0", dtype="bf16"))
            say("everything fits on cuda:0, the embedding table too")
        if rest:
            say("prefill streaming (op: stream) is not set: it needs two layers of expert buffers on the GPU, "
                "and this VRAM is better spent on decode")
    else:
        rest = experts

    # The CPU side: routed experts that stay, the embedding table, and everything when there is no GPU.
    cpu_bytes = 0 if gpu is not None else sum(_sum([u], base, base) for u in units if u.kind not in ("experts",))
    if gpu is not None and not any(r.startswith(f"  - match: '{EMBED}'") for r in rules):
        cpu_bytes += _sum(embed, "bf16", base)
    if rest:
        fmt = _expert_format(rest, expert_quant, base, ram - cpu_bytes, per_layer_gpu, cfg, say)
        fields = dict(layers=_span([u.layer for u in rest]) if on_gpu_layers else None, device="cpu", op="jit",
                      quant=fmt, threads="auto")
        if per_layer_gpu:
            fields["gpu_experts"] = f"{{count: {per_layer_gpu}, device: cuda:0, quant: {gpu_fmt}}}"
        rules.append(_rule(EXPERTS, **fields))
    if gpu is not None:
        core_fmt, cache_dtype, _ = gpu
        attn_op = "mla" if runs_today("mla", "cuda:0", core_fmt) or not runnable_only else "torch"
        rules.append(_rule(ATTN, device="cuda:0", op=attn_op, quant=core_fmt,
                           cache=f"{{dtype: {cache_dtype}, page_size: {PAGE_SIZE}}}"))
        rules.append(_rule(MLPS, device="cuda:0", quant=core_fmt))
        if not any(r.startswith(f"  - match: '{EMBED}'") for r in rules):
            rules.append(_rule(EMBED, device="cpu", dtype="bf16"))
        rules.append(_rule(".*", device="cuda:0", dtype="bf16"))
    else:
        rules.append(_rule(".*", device="cpu", dtype=AUTO))

    where = f"cuda:0 with {gib(inventory.gpus[0].free_bytes)} free" if inventory.gpus else "no GPU"
    header = [f"# Written by `hmoe rules tune` for {where}, {gib(inventory.ram_bytes)} of RAM, {ctx} tokens of context.",
              "# Reasoning:"] + [f"#   {r}" for r in reasons]
    text = "\n".join(header + [f"name: tuned for {where} and {gib(inventory.ram_bytes)} of RAM at {ctx} tokens",
                               "rules:"] + rules) + "\n"
    ruleset = parse_rules(text, source, inventory)
    plan = build_plan(ruleset, cfg, ctx=ctx, numa_nodes=inventory.numa_nodes)
    check(plan, inventory)  # RAM may still be short; a GPU overflow here would be a bug in the sums above
    return Tuned(text, tuple(reasons), ruleset, plan)


def _gpu_core(cfg: ModelConfig, units: tuple[Unit, ...], inventory: Inventory, ctx: int,
              say, runnable_only: bool) -> tuple[str, str, int] | None:
    """(format, cache dtype, VRAM left) for everything but the routed experts and the embedding, or None."""
    base = auto_format(cfg.torch_dtype)
    vram = inventory.gpus[0].free_bytes - RESERVE["cuda"]
    say(f"cuda:0 has {gib(inventory.gpus[0].free_bytes)} free; {gib(RESERVE['cuda'])} stays in reserve")
    heavy = [u for u in units if u.kind in ("attention", "mlp", "shared_experts")]
    light = [u for u in units if u.kind in ("gate", "norm", "lm_head")]  # kept in bf16: small, precision-critical
    rows = -(-ctx // PAGE_SIZE) * PAGE_SIZE
    # fp8 weights before an fp8 cache: DeepSeek-V3 was trained with fp8 weights, not an fp8 cache
    for fmt, cache_dtype in (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp8")):
        if runnable_only and not (runs_today("torch", "cuda:0", fmt) or runs_today("mla", "cuda:0", fmt)):
            say(f"{fmt} weights on the GPU are not in the runtime yet: not tried")
            continue
        cache = cfg.num_hidden_layers * rows * cache_bytes_per_token(cfg, cache_dtype)
        core = _sum(heavy, fmt, base) + _sum(light, "bf16", base)
        fits = core + cache <= vram
        say(f"attention, dense MLPs, shared experts in {fmt}, routers/norms/lm_head in bf16: {gib(core)}; "
            f"latent cache for {ctx} tokens in {cache_dtype}: {gib(cache)}: "
            + ("fits" if fits else f"does not fit in {gib(vram)}"))
        if fits:
            return fmt, cache_dtype, vram - core - cache
    say("the GPU cannot hold attention and its cache even in fp8: everything runs on the CPU "
        "(a smaller --ctx may change this)")
    return None


def _expert_format(rest: list[Unit], wanted: str, base: str, ram: int, on_gpu: int, cfg: ModelConfig, say) -> str:
    share = (cfg.n_routed_experts - on_gpu) / cfg.n_routed_experts
    candidates = [wanted] if wanted != AUTO else [f for f in PRECISION_ORDER if f in OPS["jit"].formats["cpu"]]
    tried = []
    for fmt in candidates:
        size = _sum(rest, fmt, base, allow_misfit=True, op="jit")
        if size is None:
            tried.append(f"{fmt} (rows of {cfg.moe_intermediate_size} do not fill its blocks)")
            continue
        size = int(size * share)
        if size <= ram:
            say(f"routed experts on the CPU: {fmt}, {gib(size)} of {gib(ram)} usable RAM" +
                (" (the most precise format that fits)" if wanted == AUTO else ""))
            return fmt
        tried.append(f"{fmt} ({gib(size)})")
    raise HmoeError(f"the routed experts do not fit the {gib(ram)} of RAM left for them (after the reserve and the "
                    f"other modules): tried {', '.join(tried)}; use a machine with more RAM or a smaller model")


def _sum(units: list[Unit], fmt: str, base: str, allow_misfit: bool = False, op: str = "torch") -> int | None:
    sizes = [raw_bytes(u, fmt, base, op) for u in units]
    if None in sizes:
        assert allow_misfit, (fmt, [u.name for u in units])
        return None
    return sum(sizes)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _rule(match: str, **fields) -> str:
    lines = [f"  - match: '{match}'"]
    lines += [f"    {k}: {v}" for k, v in fields.items() if v is not None]
    return "\n".join(lines)
