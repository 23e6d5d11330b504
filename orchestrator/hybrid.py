"""HybridExperts: a GPU model's routed experts computed by cpu_experts on the CPU, stream-ordered.

Per MoE layer on the GPU's current stream (DESIGN.md, "Data flow of one decode step"):

    start():  hidden, topk_ids, topk_weights -> page-locked host buffers (async copies)
              host function: the engine's native submit          (CPU workers start)
    ...       the caller runs the shared experts on the GPU meanwhile
    finish(): host function: the engine's native wait            (the stream waits for the CPU)
              routed output -> GPU (async copy)

Nothing here synchronizes the host with the GPU: the Python thread runs ahead and the stream
carries the order. Every buffer a launch touches is static: host buffers shared by all layers
(they run one after another on one stream), the engine's scratch sized once for the largest
launch, and one job array per layer and token count. So a step can be captured in a CUDA graph
once each token count has run eagerly. On CPU inputs the same buffers and jobs are used and the
calling thread plays the stream (it calls the native submit and wait itself): the stand-in that
CI runs. Batches larger than the buffers go in chunks; only the last overlaps the shared experts.

Two hand-overs (HostStaging.handover; `HMOE_HANDOVER`): the two host functions above, or `memops`:
the stream rings a mailbox in mapped host memory (cuStreamWriteValue32) that a native dispatcher
thread, pinned to a core the workers leave free, polls, and waits (cuStreamWaitValue32) for the DONE
word that thread writes after the job (doorbell.py; NOTES.md, "The memops hand-over"). The default,
`auto`, takes memops for decode-sized launches on a GPU when such a core exists and the driver can
(measured faster and steadier: CUDA's host-function thread lands on a worker's core at times), else
host functions. On CPU inputs with `memops` the calling thread plays the stream's part: it rings the
bell and polls DONE.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from runtime.errors import HmoeError

from . import cuda_host
from .cuda_host import launch_host_func
from .doorbell import BELL, DONE, Mailbox

HANDOVERS = ("auto", "hostfunc", "memops")


MEMOPS_MAX_TOKENS = 16  # launches of up to this many tokens use the memops hand-over when it is on


def default_workers() -> int:
    """CPU expert workers when the GPU drives them: one per physical core but one. The spare core
    runs what hands each layer over (CUDA's host-function thread or the memops dispatcher); with a
    worker pinned on every core that thread preempts one of them mid-task every layer. Whole
    DeepSeek-V2-Lite, q8_0, H200 + 16 cores: 51-65 t/s with 15 workers against 35-39 with 16
    (orchestrator/NOTES.md, "Whole V2-Lite")."""
    from cpu_experts.numa import physical_cpus

    cores = len(physical_cpus())
    return cores - 1 if cores >= 4 else cores


def handover_mode(value: str | None = None) -> str:
    """The hand-over asked for: `value`, else $HMOE_HANDOVER, else auto (memops on a GPU whose driver
    can and where the workers leave a core for the dispatcher, else host functions)."""
    mode = value if value is not None else (os.environ.get("HMOE_HANDOVER") or "auto")
    if mode not in HANDOVERS:
        raise HmoeError(f"HMOE_HANDOVER must be one of {', '.join(HANDOVERS)}, got {mode!r}")
    return mode


# job slots (cpu_experts.codegen.fields) that change from launch to launch: bind() writes the first
# ones, the native code the last ones; every other slot must stay put once jobs exist
_PER_CALL_SLOTS = ("T", "TOPK", "X", "XSTRIDE", "IDS", "W", "OUT", "OSTRIDE", "N0", "N1", "N2", "NACT")


class HostStaging:
    """Host buffers for up to `max_tokens` tokens, shared by the layers of one model: the inputs of a
    launch of T tokens packed in one region, hidden [T, H] f32 then ids [T, k] i64 then weights
    [T, k] f32 (so one copy brings them over), and out [M, H] f32; as numpy arrays and tensors (one
    memory). On a GPU the same packed region exists in device memory (`device_inputs`): a MoE block
    that fills it in place (router kernel included) hands the CPU its inputs in one copy.

    Page-locked with cudaHostRegister on first CUDA use (so a CPU-only model never touches CUDA),
    rather than taken from torch's pinned allocator: the buffers never move or get recycled, and
    torch records no allocator events on copies from them (nothing to upset a graph capture)."""

    def __init__(self, *, max_tokens: int, hidden: int, top_k: int, handover: str | None = None):
        from cpu_experts.pool import aligned_zeros

        self.handover = handover_mode(handover)  # "auto" until the first launch decides
        self.chosen = self.handover  # what was asked for ("auto": the fallback needs no warning)
        self.mailbox: Mailbox | None = None
        self.mailbox_device = 0  # the mailbox's device address once registered (memops on a GPU)

        self.max_tokens, self.hidden_size, self.top_k = max_tokens, hidden, top_k
        M, H = max_tokens, hidden
        self.arrays = [aligned_zeros(self.input_bytes(M), np.uint8, align=4096),
                       aligned_zeros(M * H, np.float32, align=4096).reshape(M, H)]
        self.packed_in, self.out = (torch.from_numpy(a) for a in self.arrays)
        self._device_in: dict[torch.device, torch.Tensor] = {}
        self.registered = False

    def input_bytes(self, T: int) -> int:
        return T * (4 * self.hidden_size + 12 * self.top_k)

    def inputs(self, packed: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [T, H] f32, ids [T, k] i64, weights [T, k] f32): views of a packed uint8 region."""
        H, k = self.hidden_size, self.top_k
        a, b = 4 * T * H, 4 * T * H + 8 * T * k  # offsets stay 8-byte aligned: H is even
        return (packed[:a].view(torch.float32).view(T, H), packed[a:b].view(torch.int64).view(T, k),
                packed[b:self.input_bytes(T)].view(torch.float32).view(T, k))

    def device_inputs(self, device: torch.device, T: int):
        """inputs() of the device's packed region, allocated at the first call (None inside a CUDA graph
        capture that comes before any: the caller then fills its own tensors)."""
        packed = self._device_in.get(device)
        if packed is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            packed = self._device_in[device] = torch.empty(self.input_bytes(self.max_tokens), dtype=torch.uint8,
                                                           device=device)
        return self.inputs(packed, T)

    def device_region(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The packed device region whose first input_bytes(T) bytes these are, if they are device_inputs'
        views for their token count (one copy then moves them), else None."""
        packed = self._device_in.get(hidden.device)
        if packed is None:
            return None
        views = self.inputs(packed, hidden.shape[0])
        ours = all(t.data_ptr() == v.data_ptr() and t.shape == v.shape for t, v in zip((hidden, ids, weights), views))
        return packed[:self.input_bytes(hidden.shape[0])] if ours else None

    def pin(self) -> None:
        if not self.registered:
            cudart = torch.cuda.cudart()
            for a in self.arrays:  # flags 1 = cudaHostRegisterPortable: page-locked for every context
                torch.cuda.check_error(cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 1))
            self.registered = True

    def mailbox_for(self, device: torch.device, busy_cpus=()) -> Mailbox | None:
        """The mailbox when the memops hand-over carries launches on `device`, else None. On a GPU
        first checks that the driver can (else says so once and keeps host functions); registers
        the mailbox mapped; starts the dispatcher, pinned to the cores `busy_cpus` (the workers')
        leave free, if any."""
        from cpu_experts.numa import spare_cpus

        cuda = device.type == "cuda"
        if self.handover == "auto":  # decided at the first launch: memops where it measured faster
            self.handover = "memops" if cuda and spare_cpus(busy_cpus) else "hostfunc"
        if self.handover != "memops":
            return None
        if cuda and not self.mailbox_device:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # the probe syncs
                raise RuntimeError("the memops hand-over: the first launch on a GPU came inside a CUDA graph "
                                   "capture; run the step once without capture first")
            why = cuda_host.memops_unsupported(device)
            if why:
                if self.chosen != "auto":  # asked for by name: say why it is not used
                    print(f"hmoe: warning: HMOE_HANDOVER=memops: stream memory operations unavailable ({why}); "
                          f"using host functions", file=sys.stderr)
                self.handover = "hostfunc"
                return None
        if self.mailbox is None:
            self.mailbox = Mailbox.from_env()
        if cuda and not self.mailbox_device:
            with torch.cuda.device(device):  # the device pointer is the one this device's context maps
                self.mailbox_device = cuda_host.register_mapped(self.mailbox.address, self.mailbox.slots.nbytes)
        if not self.mailbox.running:
            self.mailbox.start(spare_cpus(busy_cpus))
        return self.mailbox

    def __del__(self):
        if self.mailbox is not None:
            self.mailbox.close()
            if self.mailbox_device:
                try:
                    cuda_host.unregister(self.mailbox.address)
                except Exception:  # interpreter shutdown, as below
                    pass
        if self.registered:
            self.registered = False
            try:
                cudart = torch.cuda.cudart()
                for a in self.arrays:
                    cudart.cudaHostUnregister(a.ctypes.data)
            except Exception:  # interpreter shutdown: CUDA may already be gone, and the process with it
                pass


class _Stream:
    """CUDA inputs: everything enqueued on the current stream."""

    def __init__(self, device: torch.device, staging: HostStaging):
        staging.pin()
        self.device, self.stream = device, torch.cuda.current_stream(device)
        self.capturing = torch.cuda.is_current_stream_capturing()

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.to(dst.dtype), non_blocking=True)  # converted on the GPU, then one async copy

    def call(self, fn: int, job: np.ndarray) -> None:
        launch_host_func(self.stream, fn, job.ctypes.data)

    def ring(self, staging: HostStaging, bell: int) -> None:
        # DONE = 0 first, on the stream: a replay's constants then never meet the last layer's DONE
        stream_write = cuda_host.stream_write32
        stream_write(self.stream, staging.mailbox_device + 8 * DONE, 0)
        stream_write(self.stream, staging.mailbox_device + 8 * BELL, bell)

    def await_done(self, staging: HostStaging) -> None:
        cuda_host.stream_wait32(self.stream, staging.mailbox_device + 8 * DONE, 1)

    def copy_out(self, src: torch.Tensor) -> torch.Tensor:
        return src.to(self.device, non_blocking=True)


class _Host:
    """CPU inputs: the calling thread does in order what the stream would."""

    device, capturing = torch.device("cpu"), False

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def call(self, fn: int, job: np.ndarray) -> None:
        from cpu_experts.pool import NATIVE_FN

        NATIVE_FN(fn)(job.ctypes.data)

    def ring(self, staging: HostStaging, bell: int) -> None:
        slots = staging.mailbox.slots
        slots[DONE] = 0
        slots[BELL] = bell  # x86 keeps stores in order: the dispatcher sees DONE = 0 first

    def await_done(self, staging: HostStaging) -> None:
        mailbox, polls = staging.mailbox, 0
        while mailbox.slots[DONE] != 1:
            if not mailbox.running and mailbox.slots[DONE] != 1:
                raise RuntimeError("hand-over dispatcher stopped while a job was waiting for it")
            polls += 1
            time.sleep(0 if polls < 1000 else 1e-4)

    def copy_out(self, src: torch.Tensor) -> torch.Tensor:
        return src.clone()  # the buffer is the next layer's


class HybridExperts(nn.Module):
    """forward(hidden[T, H], topk_ids[T, k], topk_weights[T, k]) -> [T, H], or start(...) then finish()."""

    moves_its_own_data = True  # takes GPU or CPU tensors and returns on their device (no assembly hooks)
    takes_fp32 = True  # the CPU kernels read fp32 hidden states: given fp32, no conversion of its own

    def __init__(self, engine, staging: HostStaging):
        super().__init__()
        if engine.H != staging.hidden_size:
            raise ValueError(f"engine hidden size {engine.H} != staging hidden size {staging.hidden_size}")
        self.engine, self.staging = engine, staging
        self._jobs: dict[int, np.ndarray] = {}  # token count -> this layer's job over the staging buffers
        self._fns = (0, 0)  # native submit, wait
        self._pending = None

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.start(hidden, topk_ids, topk_weights)
        return self.finish()

    def start(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        assert self._pending is None, "start() twice without finish()"
        lane = _Stream(hidden.device, self.staging) if hidden.device.type == "cuda" else _Host()
        T, M = hidden.shape[0], self.staging.max_tokens
        done = None
        if T > M:  # a long prompt: all chunks but the last run to completion here
            done = torch.empty(T, self.engine.H, dtype=torch.float32, device=hidden.device)
            last = (T - 1) // M * M
            for s in range(0, last, M):
                done[s:s + M] = self._collect(lane, self._launch(lane, hidden[s:s + M], topk_ids[s:s + M],
                                                                 topk_weights[s:s + M]))
            hidden, topk_ids, topk_weights = hidden[last:], topk_ids[last:], topk_weights[last:]
        self._pending = (lane, self._launch(lane, hidden, topk_ids, topk_weights), done, hidden.dtype)

    def finish(self) -> torch.Tensor:
        assert self._pending is not None, "finish() without start()"
        lane, launched, done, dtype = self._pending
        self._pending = None
        out = self._collect(lane, launched)
        if done is not None:
            done[-out.shape[0]:] = out
            out = done
        return out.to(dtype)

    def inputs(self, hidden: torch.Tensor):
        """Device buffers (hidden f32, ids, weights) for a launch of hidden's tokens, for the caller to
        fill (MoE: the hidden state converted, the router's choice written in place); one copy then
        brings all three to the host. None where that does not apply (CPU inputs, long prompts)."""
        if not hidden.is_cuda or hidden.shape[0] > self.staging.max_tokens:
            return None
        return self.staging.device_inputs(hidden.device, hidden.shape[0])

    def _launch(self, lane, hidden, topk_ids, topk_weights):
        T = hidden.shape[0]
        job = self._job(T, lane)
        staging = self.staging
        region = staging.device_region(hidden, topk_ids, topk_weights) if hidden.is_cuda else None
        if region is not None:
            lane.copy_in(staging.packed_in[:region.numel()], region)
        else:
            for dst, src in zip(staging.inputs(staging.packed_in, T), (hidden, topk_ids, topk_weights)):
                lane.copy_in(dst, src.detach())
        # memops for decode-sized launches only: each (layer, T) keeps a mailbox row for good, and
        # prompts (any T, one launch per layer) gain nothing from a faster hand-over
        pool = self.engine.pool
        mailbox = self.staging.mailbox_for(lane.device, pool.cpus or ()) if T <= MEMOPS_MAX_TOKENS else None
        if mailbox is None:
            lane.call(self._fns[0], job)
        else:  # the dispatcher runs submit and wait; the bell is static per job (graph-safe). Pinned to
            # a core of its own it spin-waits (no futex wake-up per layer), else it sleeps as a host function
            wait = pool.wait_job_spin_address if mailbox.cpus else self._fns[1]
            lane.ring(self.staging, mailbox.bell_for(job, self._fns[0], wait))
        return T, job, mailbox is not None

    def _collect(self, lane, launched) -> torch.Tensor:
        T, job, rung = launched
        if rung:
            lane.await_done(self.staging)
        else:
            lane.call(self._fns[1], job)
        return lane.copy_out(self.staging.out[:T])

    def _job(self, T: int, lane) -> np.ndarray:
        """This layer's job for T tokens: a copy of the engine's job after bind(), so each token count
        keeps its own static job and no launch rewrites a job that a queued host function reads."""
        job = self._jobs.get(T)
        if job is not None:
            return job
        if lane.capturing:
            raise RuntimeError(f"HybridExperts: {T} tokens never ran before this CUDA graph capture; run the step "
                               f"once without capture first (its job must exist before capture)")
        if not self._jobs:  # scratch for the largest launch first: later binds never move it
            self._bind(self.staging.max_tokens)
        return self._bind(T)

    def _bind(self, T: int) -> np.ndarray:
        from cpu_experts.codegen.fields import J, JOB_FIELDS
        from cpu_experts.pool import aligned_zeros

        staging = self.staging
        h, ids, w = (t.numpy() for t in staging.inputs(staging.packed_in, T))
        submit, wait, address = self.engine.bind(h, ids, w, staging.arrays[1][:T])
        job = aligned_zeros(len(JOB_FIELDS), np.int64)
        job[:] = np.ctypeslib.as_array((ctypes.c_int64 * len(JOB_FIELDS)).from_address(address))
        fixed = np.ones(len(JOB_FIELDS), bool)
        fixed[[J[n] for n in _PER_CALL_SLOTS if n in J]] = False
        first = next(iter(self._jobs.values()), job)
        if not np.array_equal(first[fixed], job[fixed]):
            raise RuntimeError("the CPU experts' scratch memory moved under HybridExperts (the engine ran a batch "
                               "larger than the staging buffers outside it); queued or captured launches would "
                               "read freed memory")
        self._jobs[T] = job
        self._fns = (submit, wait)
        return job


def handover_used(model: nn.Module) -> str | None:
    """How decode launches of `model`'s GPU-driven CPU experts were handed over ("memops" with the
    dispatcher's CPUs, "hostfunc"), or None when none ran (no such experts, or only prompts)."""
    for module in model.modules():
        if isinstance(module, HybridExperts):
            staging = module.staging
            if staging.handover == "auto":
                return None
            if staging.mailbox is not None and staging.handover == "memops":
                return f"memops (dispatcher on CPUs {','.join(map(str, staging.mailbox.cpus)) or 'any'})"
            return staging.handover
    return None


def attach(model: nn.Module, *, max_tokens: int = 512, fmt: str = "bf16", threads: int | None = None,
           numa: str = "interleave", handover: str | None = None) -> int:
    """Make every MoE layer's routed experts HybridExperts, all sharing one HostStaging; returns the
    number of layers. Experts already on cpu_experts (anything with `.engine`) keep their engine;
    torch reference experts are quantized to `fmt`. handover: HMOE_HANDOVER's values (None: read it)."""
    from cpu_experts.experts import CPUExperts
    from runtime.moe import MoE, TorchExperts

    cfg = model.cfg
    staging = HostStaging(max_tokens=max_tokens, hidden=cfg.hidden_size, top_k=cfg.num_experts_per_tok,
                          handover=handover)
    count = 0
    for layer in model.model.layers:
        if not isinstance(layer.mlp, MoE):
            continue
        experts = layer.mlp.experts
        engine = getattr(experts, "engine", None)
        if engine is None:
            if not isinstance(experts, TorchExperts):
                raise TypeError(f"layer {layer.layer}: cannot take the routed experts of a {type(experts).__name__}")
            with torch.no_grad():
                engine = CPUExperts.from_tensors(*(p.detach().float().cpu() for p in
                                                   (experts.gate_proj, experts.up_proj, experts.down_proj)),
                                                 fmt=fmt, threads=threads, numa=numa)
        layer.mlp.experts = HybridExperts(engine, staging)
        count += 1
    return count
