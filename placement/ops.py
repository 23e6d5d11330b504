"""What can implement each module: the one table of ops, the module kinds they run, and the
formats each accepts on each device type.

`today` lists the (device type, format) pairs the runtime runs now; the rest of the table is the
contract for parts being built (gpu_attention kernels, fp8 GEMMs, expert streaming), so rules can
be written and checked before those land, and `explain` says which are not there yet.
"""

from __future__ import annotations

from dataclasses import dataclass

# Module kinds (see placement/modules.py); names follow the checkpoint's module names.
KINDS = ("embed", "attention", "norm", "mlp", "gate", "experts", "shared_experts", "lm_head")

_FLOATS = ("fp32", "bf16", "fp16")
_BLOCKS = ("q8_0", "q4_0", "q4_k", "q6_k")


@dataclass(frozen=True)
class Op:
    name: str
    what: str
    kinds: tuple[str, ...]
    formats: dict  # device type ("cpu" | "cuda") -> formats accepted there
    today: dict  # device type -> formats the runtime runs now
    weights_on_host: bool = False  # weights live in RAM whatever the compute device (streaming)


OPS = {
    # fp8: the linears become runtime/fp8_linear.FP8Linear: Triton block-scaled fp8 GEMM/GEMV on
    # CUDA; on the CPU a correct but slow fallback (dequantized to fp32 on every call)
    "torch": Op("torch", "the reference torch module (runtime/model.py, runtime/moe.py)", KINDS,
                formats={"cpu": _FLOATS + ("fp8",), "cuda": _FLOATS + ("fp8",)},
                today={"cpu": _FLOATS + ("fp8",), "cuda": _FLOATS + ("fp8",)}),
    "jit": Op("jit", "cpu_experts: the fused routed-experts kernels, JIT-compiled for this CPU", ("experts",),
              formats={"cpu": ("bf16",) + _BLOCKS}, today={"cpu": ("bf16",) + _BLOCKS}),
    # the attention module on a GPU: Triton kernels over the paged latent cache, fp8 linears as above
    "mla": Op("mla", "gpu_attention: MLA kernels over the latent cache", ("attention",),
              formats={"cuda": ("bf16", "fp8")}, today={"cuda": ("bf16", "fp8")}),
    "stream": Op("stream", "routed experts kept in host RAM, streamed to the GPU layer by layer (double-buffered)",
                 ("experts",), formats={"cuda": ("bf16", "fp8") + _BLOCKS}, today={}, weights_on_host=True),
}


def device_type(device: str) -> str:
    return device.split(":")[0]


def device_problem(op: str, device: str) -> str | None:
    """Why `op` cannot run on `device`, or None."""
    if device_type(device) not in OPS[op].formats:
        return f"op '{op}' runs on {' or '.join(OPS[op].formats)}, not on {device}"
    return None


def format_problem(op: str, device: str, fmt: str) -> str | None:
    """Why `op` cannot run weights in `fmt` on `device`, or None."""
    accepted = OPS[op].formats[device_type(device)]
    if fmt not in accepted:
        return f"op '{op}' on {device_type(device)} runs {', '.join(accepted)}, not {fmt}"
    return None


def weights_home(op: str, device: str) -> str:
    """Where the weights of a module live: in RAM for streamed ops, else on the compute device."""
    return "cpu" if OPS[op].weights_on_host else device


def runs_today(op: str, device: str, fmt: str) -> bool:
    return fmt in OPS[op].today.get(device_type(device), ())


# fp8 replaces nn.Linear layers (FP8Linear): the kinds whose matrices are all linears; the others
# (embedding, router, lm_head tied to the embedding) keep a float dtype.
FP8_KINDS = ("attention", "mlp", "shared_experts")

# (op, device type, format) that run today only as a correct but slow fallback: explain says so.
SLOW_FALLBACKS = {("torch", "cpu", "fp8"): "fp8 weights dequantized to fp32 on every call (for tests; use bf16 on a CPU)"}

# Rule features and whether the runtime runs them (issue 6: the hybrid orchestrator); the plan and
# explain handle all of them, assembly refuses the missing ones by name and tune does not write them.
# gpu_experts: runtime/split_experts.py (the fast part in torch, so in the formats torch runs today).
# prefill: only `op: stream` for routed experts run by `jit` on the CPU (orchestrator/streamed.py).
FEATURES_TODAY = {"gpu_experts": True, "prefill": True}


def gpu_experts_run_today(device: str, fmt: str) -> bool:
    """Experts kept on a GPU are a stacked torch module: float formats only (no fp8 experts yet)."""
    return fmt in _FLOATS and runs_today("torch", device, fmt)


def prefill_problem(kind: str, op: str, prefill_op: str, prefill_device: str, attention_device: str,
                    gpu_experts: bool = False) -> str | None:
    """Why a prefill override cannot run today, or None: the runtime streams routed experts that
    the CPU kernels (`jit`) hold to the GPU that runs the layer's attention."""
    if not FEATURES_TODAY["prefill"]:
        return "a prefill override (needs expert streaming)"
    if kind != "experts" or op != "jit" or prefill_op != "stream":
        return f"a prefill override to op '{prefill_op}' (today only routed experts with op 'jit' stream, op 'stream')"
    if prefill_device != attention_device:
        return (f"prefill streaming to {prefill_device} while the layer's attention runs on {attention_device} "
                f"(today the experts stream to the attention's GPU)")
    if gpu_experts:
        return "prefill streaming of a layer that also keeps gpu_experts (not combined yet)"
    return None


def runtime_gaps(p, attention_device: str) -> list[str]:
    """What the runtime cannot run yet of placement `p` (a plan.Placement) whose layer's attention
    runs on attention_device: one phrase per gap, [] when it runs. Assembly refuses on these,
    `rules explain` lists them."""
    gaps = []
    if not runs_today(p.op, p.device, p.format):
        today = OPS[p.op].today.get(device_type(p.device), ())
        gaps.append(f"op '{p.op}' on {p.device} in {p.format} (today: {', '.join(today) if today else 'not at all'})")
    if p.format == "fp8" and p.unit.kind not in FP8_KINDS:
        gaps.append(f"fp8 for a {p.unit.kind} module (fp8 runs the linears of {', '.join(FP8_KINDS)})")
    g = p.gpu_experts
    if g and not FEATURES_TODAY["gpu_experts"]:
        gaps.append("gpu_experts (needs the hybrid orchestrator)")
    elif g and not gpu_experts_run_today(g.device, g.format):
        gaps.append(f"gpu_experts in {g.format} on {g.device} (today: {', '.join(_FLOATS)})")
    if p.prefill:
        problem = prefill_problem(p.unit.kind, p.op, p.prefill.op, p.prefill.device, attention_device, bool(g))
        if problem:
            gaps.append(problem)
    return gaps
