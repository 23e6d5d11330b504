"""Streamed-expert prefill: long prompts run each MoE layer's routed experts on the GPU, with the
weights copied from RAM layer by layer while the previous layer computes.

    StreamedPrefill (one per model): the layers' host weights, two device slots of the largest
        layer's bytes, a copy stream and the double-buffer schedule (schedule.py)
    StreamedExperts (one per layer): the model's experts interface; at T >= min_tokens with the
        hidden states on a GPU it asks StreamedPrefill, otherwise its inner CPU path (HybridExperts)

The host copy is the one the CPU kernels already stream from: cpu_experts' repacked buffers,
page-locked in place with cudaHostRegister (no second copy of the experts in RAM), unpacked on the
GPU by gpu_dequant.py. Per layer on the GPU: tokens grouped by expert (one host sync for the
counts), per chunk of experts dequantize gate/up/down to the activations' dtype (bf16; triton_dequant.py, or
gpu_dequant.py's torch ops), then per expert
silu(x Wg^T) * (x Wu^T) Wd^T, and the routing-weighted sum back per token.

On CPU tensors the same code runs with plain copies and no streams (the CI stand-in).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

from runtime.errors import HmoeError

from .gpu_dequant import dequantize_packed
from .schedule import Compute, Copy, DoubleBuffer

ALIGN = 256  # byte alignment of each region inside a device slot
CHUNK_BYTES = 1 << 30  # bf16 bytes of dequantized experts held at once (gate + up + down)
ENV_MIN_TOKENS = "HMOE_STREAM_MIN_TOKENS"  # tests and benchmarks: force the threshold
ENV_DISABLE = "HMOE_NO_STREAM"  # "1": never stream (debugging; rules without `prefill` do the same)
ENV_DEQUANT = "HMOE_STREAM_DEQUANT"  # "torch": the torch-ops dequantize on the GPU too (comparison)
_PINNED: dict[int, int] = {}  # host address -> how many HostLayers registered it


class HostLayer:
    """One layer's repacked experts in RAM (an engine's buffers): regions and their slot offsets."""

    PARTS = ("payload", "scale", "bias")

    def __init__(self, engine):
        self.engine = engine
        self.regions = []  # (matrix, part, host uint8 tensor, slot offset)
        offset = 0
        for name in ("gate", "up", "down"):
            mat = getattr(engine, name)
            sizes = {"payload": mat.pay_e, "scale": mat.sc_e, "bias": mat.sc_e if mat.has_bias else 0}
            for part in self.PARTS:
                nbytes = engine.E * sizes[part]
                if not nbytes:
                    continue
                host = torch.from_numpy(getattr(mat, part).array(np.uint8, 0, nbytes))
                self.regions.append((name, part, host, offset))
                offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = sum(r[2].numel() for r in self.regions)
        self.slot_bytes = offset
        self._registered: list[int] = []

    def pin(self) -> None:
        """Page-lock the engine's buffers in place (flags 1: portable), so copies from them are async DMA.
        Counted per address: several StreamedPrefills (or layers) may share an engine."""
        if self._registered:
            return
        cudart = torch.cuda.cudart()
        buffers = {b.address: b for n in ("gate", "up", "down") for b in
                   (getattr(self.engine, n).payload, getattr(self.engine, n).scale, getattr(self.engine, n).bias)}
        for address, buf in buffers.items():
            if not _PINNED.get(address):
                torch.cuda.check_error(cudart.cudaHostRegister(address, buf.nbytes, 1))
            _PINNED[address] = _PINNED.get(address, 0) + 1
            self._registered.append(address)

    def unpin(self) -> None:
        cudart = torch.cuda.cudart()
        for address in self._registered:
            _PINNED[address] -= 1
            if not _PINNED[address]:
                del _PINNED[address]
                cudart.cudaHostUnregister(address)
        self._registered = []

    def views(self, slot: torch.Tensor) -> dict:
        """{matrix: {part: uint8 [E, bytes per expert]}} inside a device slot."""
        out: dict = {}
        for name, part, host, offset in self.regions:
            out.setdefault(name, {})[part] = slot[offset:offset + host.numel()].view(self.engine.E, -1)
        return out


class StreamedPrefill:
    """The streamed path of a model's MoE layers (in model order); `run(j, ...)` computes layer j."""

    def __init__(self, engines: list, device: torch.device | str, *, timing: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" names the current GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layers = [HostLayer(e) for e in engines]
        self.schedule = DoubleBuffer(len(self.layers))
        slot_bytes = max(layer.slot_bytes for layer in self.layers)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.cuda = self.device.type == "cuda"
        self.timing = timing
        self.copies: list[tuple] = []  # (layer, bytes, start event, end event) when timing
        if self.cuda:
            for layer in self.layers:
                layer.pin()
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in self.slots]
            self.released = [torch.cuda.Event() for _ in self.slots]

    @property
    def layer_bytes(self) -> int:
        """Bytes one (the largest) layer moves over PCIe."""
        return max(layer.nbytes for layer in self.layers)

    def run(self, j: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Layer j's routed experts for hidden [T, H], ids/weights [T, k] (on self.device) -> [T, H]."""
        try:
            out = None
            for action in self.schedule.step(j):
                if isinstance(action, Copy):
                    self._copy(action.layer, action.slot)
                else:
                    assert isinstance(action, Compute)
                    out = self._compute(action.layer, action.slot, hidden, topk_ids, topk_weights)
            return out
        except BaseException:  # slots' contents unknown; a later copy must wait for all work enqueued so far
            self.schedule.forget()
            if self.cuda:
                for event in self.released:
                    event.record(torch.cuda.current_stream(self.device))
            raise

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for layer in self.layers:
                layer.unpin()

    # ------------------------------------------------------------ copy stream
    def _copy(self, j: int, slot: int) -> None:
        layer, dst = self.layers[j], self.slots[slot]
        if not self.cuda:
            for _, _, host, offset in layer.regions:
                dst[offset:offset + host.numel()].copy_(host)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])  # the slot's previous layer is dequantized
            start = end = None
            if self.timing:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            for _, _, host, offset in layer.regions:
                dst[offset:offset + host.numel()].copy_(host, non_blocking=True)
            if self.timing:
                end.record(self.copy_stream)
                self.copies.append((j, layer.nbytes, start, end))
            self.copied[slot].record(self.copy_stream)

    # ------------------------------------------------------------ compute stream
    def _compute(self, j: int, slot: int, hidden, topk_ids, topk_weights) -> torch.Tensor:
        layer = self.layers[j]
        eng = layer.engine
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        dtype = hidden.dtype  # the model's activation dtype (bf16 in practice; fp32 models stay exact)
        x = hidden.index_select(0, token_of)  # [T*k, H], rows grouped by expert
        ys = torch.empty_like(x)
        counts = torch.bincount(flat, minlength=eng.E).tolist()  # the one host sync of the layer
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        views = layer.views(self.slots[slot])
        chunk = max(1, CHUNK_BYTES // (3 * eng.H * eng.I * 2))
        for e0 in range(0, eng.E, chunk):
            e1 = min(eng.E, e0 + chunk)
            if starts[e1] == starts[e0]:
                continue
            gate, up, down = (self._dequant(eng, views[name], e0, e1, n, kk, dtype) for name, n, kk in
                              (("gate", eng.I, eng.H), ("up", eng.I, eng.H), ("down", eng.H, eng.I)))
            for e in range(e0, e1):
                a, b = starts[e], starts[e + 1]
                if a == b:
                    continue
                xe = x[a:b]
                h = torch.nn.functional.silu(xe @ gate[e - e0].T) * (xe @ up[e - e0].T)
                ys[a:b] = h @ down[e - e0].T
        if self.cuda:  # the slot's bytes are read: the copy stream may overwrite it
            self.released[slot].record(torch.cuda.current_stream(self.device))
        w = topk_weights.reshape(-1).index_select(0, order).float()
        out = torch.zeros(T, eng.H, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, token_of, ys.float() * w[:, None])
        return out.to(dtype)

    def _dequant(self, eng, parts: dict, e0: int, e1: int, n: int, k: int, dtype) -> torch.Tensor:
        pick = lambda name: parts[name][e0:e1] if name in parts else None  # noqa: E731
        bias = pick("bias") if eng.geo.bias else None
        return dequantizer(self.device, eng.geo.fmt)(pick("payload"), pick("scale"), bias, geo=eng.geo, n=n, k=k,
                                                     dtype=dtype)


def dequantizer(device: torch.device, fmt: str):
    """The Triton kernel for block formats on CUDA (one pass), else the torch ops (the reference);
    $HMOE_STREAM_DEQUANT=torch picks the torch ops everywhere."""
    if device.type == "cuda" and fmt != "bf16" and os.environ.get(ENV_DEQUANT, "triton") == "triton":
        try:
            from . import triton_dequant
        except ImportError:  # no Triton: the torch ops run on the GPU too
            return dequantize_packed
        return triton_dequant.dequantize_packed
    return dequantize_packed


class StreamedExperts(nn.Module):
    """A layer's routed experts: streamed to the GPU for T >= min_tokens, else the inner CPU path."""

    moves_its_own_data = True

    def __init__(self, inner: nn.Module, prefill: StreamedPrefill, index: int, min_tokens: float):
        super().__init__()
        self.inner, self.prefill, self.index, self.min_tokens = inner, prefill, index, min_tokens
        self.engine = inner.engine
        self._out = None

    def streams(self, hidden: torch.Tensor) -> bool:
        return hidden.device == self.prefill.device and hidden.shape[0] >= self.min_tokens and \
            os.environ.get(ENV_DISABLE, "0") != "1"

    def forward(self, hidden, topk_ids, topk_weights):
        if self.streams(hidden):
            return self.prefill.run(self.index, hidden, topk_ids, topk_weights)
        return self.inner(hidden, topk_ids, topk_weights)

    def start(self, hidden, topk_ids, topk_weights) -> None:
        assert self._out is None, "start() twice without finish()"
        if self.streams(hidden):  # enqueued on the GPU stream; the shared experts follow it there
            self._out = self.prefill.run(self.index, hidden, topk_ids, topk_weights)
        elif hasattr(self.inner, "start"):
            self.inner.start(hidden, topk_ids, topk_weights)
            self._out = self.inner.finish
        else:
            self._out = self.inner(hidden, topk_ids, topk_weights)

    def finish(self) -> torch.Tensor:
        assert self._out is not None, "finish() without start()"
        out, self._out = self._out, None
        return out() if callable(out) else out

    def nbytes_by_device(self) -> dict[str, int]:
        from cpu_experts.packed_cache import nbytes

        return {"cpu": nbytes(self.engine)}


def attach(experts: list[tuple[nn.Module, nn.Module]], device, *, min_tokens: int | None | list[int | None],
           log=lambda text: print(f"hmoe: {text}", file=sys.stderr)) -> StreamedPrefill:
    """Give each (moe block, its CPU experts) pair in model order the streamed prefill path on
    `device`. min_tokens: one threshold for all, or one per pair (each rule's own); None: the
    threshold measured here (threshold.py); $HMOE_STREAM_MIN_TOKENS overrides every one."""
    prefill = StreamedPrefill([inner.engine for _, inner in experts], device)
    per_layer = list(min_tokens) if isinstance(min_tokens, (list, tuple)) else [min_tokens] * len(experts)
    env = os.environ.get(ENV_MIN_TOKENS)
    if env:
        if not env.isdigit() or int(env) < 1:
            raise HmoeError(f"${ENV_MIN_TOKENS} must be a positive integer, got {env!r}")
        per_layer = [int(env)] * len(experts)
    elif None in per_layer:
        found, facts = measured_threshold(prefill, top_k=experts[0][0].gate.top_k)
        log(f"streamed prefill from {found} tokens ({facts})" if found else
            f"streamed prefill never beats the CPU here ({facts})")
        per_layer = [found if n is None else n for n in per_layer]
    for j, ((moe, inner), n) in enumerate(zip(experts, per_layer)):
        moe.experts = StreamedExperts(inner, prefill, j, n if n is not None else float("inf"))
    return prefill


def measured_threshold(prefill: StreamedPrefill, *, top_k: int, tokens=(64, 256, 1024)) -> tuple[int | None, str]:
    """The prefill threshold from this machine: layer 0 copied into a slot (pinned H2D GB/s) and
    its CPU experts timed at a few token counts."""
    from .measure import cpu_curve
    from .threshold import prefill_threshold

    gbs = copy_gbs(prefill, 0, repeats=2)
    curve, _ = cpu_curve(prefill.layers[0].engine, list(tokens), top_k=top_k, repeats=1, log=lambda _: None)
    found = prefill_threshold(curve, layer_bytes=prefill.layer_bytes, pcie_gbs=gbs)
    cpu = ", ".join(f"{t}: {s * 1e3:.1f} ms" for t, s in curve.points)
    return found, f"{prefill.layer_bytes / 1e9:.2f} GB per layer at {gbs:.1f} GB/s; CPU layer {cpu}"


def copy_gbs(prefill: StreamedPrefill, j: int, *, repeats: int) -> float:
    """GB/s of copying streamed layer j into slot j % 2 (best of `repeats`); leaves the slot holding it."""
    if not prefill.cuda:
        return float("inf")
    timing, prefill.timing = prefill.timing, True
    prefill.schedule.forget()
    best = 0.0
    for _ in range(repeats):
        prefill.copies.clear()
        prefill._copy(j, j % 2)
        _, nbytes, start, end = prefill.copies[0]
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    prefill.copies.clear()
    prefill.timing = timing
    prefill.schedule.holds[j % 2] = j
    return best
