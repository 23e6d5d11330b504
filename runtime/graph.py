"""Decode steps captured in CUDA graphs and replayed: one graph per batch size and length bucket.

A decode step (one new token per sequence) launches a few hundred kernels, host functions and
copies per layer; replaying them from a graph costs one launch. What a graph bakes in must not
change between replays, so the step reads its position from a device tensor (the model's
`start_pos` as a tensor: LatentCache.prepare_at, RotaryTables.cos_sin_at) and the Triton decode
sizes its KV splits for a fixed length (`LatentCache.launch_len`), the step's length bucket: the
next power of two from MIN_BUCKET on, so a short context does not pay for splits sized for the
longest. HybridExperts' host functions are captured as host nodes.

Per (batch, bucket): the first step runs the very same graph-safe step eagerly (Triton compiles,
HybridExperts binds its job for that batch), the second captures and replays it, later ones
replay. Prefill and form choice stay eager. Where capture is impossible the steps run eagerly,
with one message saying why (`reason`).
"""

from __future__ import annotations

import sys

import torch

MIN_BUCKET = 1024  # positions; the Triton decode's split count is sized for the bucket


def why_not_capturable(model, cache) -> str | None:
    """None if decode steps of `model` over `cache` can be captured, else the reason (one line)."""
    from gpu_attention.attention import backend_for
    from gpu_attention.dsa import DSACache

    from .model import LayerCaches

    if isinstance(cache, LayerCaches):
        return "attention layers on several devices (one cache each): one graph would span devices"
    if isinstance(cache, DSACache):
        return "DeepSeek-V3.2 sparse attention (DSA) is not captured: its indexer decides on the host per step"
    device = cache.page_table.device
    if device.type != "cuda":
        return f"the attention runs on {device.type}, not on a GPU"
    if backend_for(device) != "triton":
        return "the torch attention path (no Triton, or HMOE_ATTENTION=torch) sizes its work on the host"
    if not cache.pinned:
        return "the latent cache allocates pages per step"
    return None


def bucket_for(length: int, max_len: int) -> int:
    """Smallest power of two >= length (at least MIN_BUCKET), at most the cache's max_len."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


class DecodeGraphs:
    """step(ids [B, 1] on the model's device, start) -> logits [B, 1, V] fp32, as model(ids, cache=cache,
    start_pos=start, last_only=True), from a replayed CUDA graph where possible."""

    def __init__(self, model, cache, *, enabled: bool = True, log=None):
        self.model, self.cache = model, cache
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.reason = "--no-graph" if not enabled else why_not_capturable(model, cache)
        if enabled and self.reason and torch.cuda.is_available():  # a CPU-only machine has nothing to explain
            self.log(f"CUDA graphs off, decoding eagerly: {self.reason}")
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (ids [B, 1], position [1])
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm: set[tuple[int, int]] = set()
        self._pool = None
        self._stream = None

    @property
    def active(self) -> bool:
        return self.reason is None

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        B = ids.shape[0]
        if not self.active or ids.shape[1] != 1:
            return self.model(ids, cache=self.cache, start_pos=start, last_only=True)
        self.cache.note_lengths([start + 1] * B)
        key = (B, bucket_for(start + 1, self.cache.max_len))
        static_ids, position = self._static_inputs(B, ids.device)
        static_ids.copy_(ids)
        position.fill_(start)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._warm:  # run it eagerly once: compiles kernels, binds jobs, sizes the pool
                self._warm.add(key)
                return self._static_forward(static_ids, position, key[1])
            try:
                graph = self._capture(static_ids, position, key[1])
            except Exception as e:  # noqa: BLE001 - any capture failure: fall back, once, loudly
                self.reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                self.log(f"CUDA graphs off, decoding eagerly: {self.reason}")
                torch.cuda.synchronize()
                return self.model(ids, cache=self.cache, start_pos=start, last_only=True)
            self._graphs[key] = graph
        graph[0].replay()
        return graph[1].clone()  # the static output is the next replay's

    def _static_inputs(self, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if B not in self._inputs:
            self._inputs[B] = (torch.zeros(B, 1, dtype=torch.long, device=device),
                               torch.zeros(1, dtype=torch.long, device=device))
        return self._inputs[B]

    def _static_forward(self, ids: torch.Tensor, position: torch.Tensor, bucket: int) -> torch.Tensor:
        """The graph-safe step, eagerly: what a capture records."""
        self.cache.launch_len = bucket
        try:
            return self.model(ids, cache=self.cache, start_pos=position, last_only=True)
        finally:
            self.cache.launch_len = None

    def _capture(self, ids: torch.Tensor, position: torch.Tensor, bucket: int):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
            self._stream = torch.cuda.Stream(ids.device)
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out = self._static_forward(ids, position, bucket)
        return graph, out
