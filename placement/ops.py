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
    "torch": Op("torch", "the reference torch module (runtime/model.py, runtime/moe.py)", KINDS,
                # fp8 on CUDA: block-scaled fp8 GEMM as in DeepSeek's inference code
                formats={"cpu": _FLOATS, "cuda": _FLOATS + ("fp8",)},
                today={"cpu": _FLOATS, "cuda": _FLOATS}),
    "jit": Op("jit", "cpu_experts: the fused routed-experts kernels, JIT-compiled for this CPU", ("experts",),
              formats={"cpu": ("bf16",) + _BLOCKS}, today={"cpu": ("bf16",) + _BLOCKS}),
    "mla": Op("mla", "gpu_attention: MLA kernels over the latent cache", ("attention",),
              formats={"cuda": ("bf16", "fp8")}, today={}),
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


# Rule features whose runtime parts are not built yet (issue 6: the hybrid orchestrator); the plan
# and explain handle them, assembly refuses them by name and tune does not write them.
# prefill: only `op: stream` for routed experts run by `jit` on the CPU (orchestrator/streamed.py).
FEATURES_TODAY = {"gpu_experts": False, "prefill": True}


def prefill_problem(kind: str, op: str, prefill_op: str, prefill_device: str, attention_device: str) -> str | None:
    """Why a prefill override cannot run today, or None: the runtime streams routed experts that
    the CPU kernels (`jit`) hold to the GPU that runs the layer's attention."""
    if not FEATURES_TODAY["prefill"]:
        return "a prefill override (needs expert streaming)"
    if kind != "experts" or op != "jit" or prefill_op != "stream":
        return f"a prefill override to op '{prefill_op}' (today only routed experts with op 'jit' stream, op 'stream')"
    if prefill_device != attention_device:
        return (f"prefill streaming to {prefill_device} while the layer's attention runs on {attention_device} "
                f"(today the experts stream to the attention's GPU)")
    return None
