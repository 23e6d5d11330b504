"""The paged MLA latent cache: per layer and token, c_kv (kv_lora_rank) ‖ k_pe (qk_rope_head_dim).

Storage per layer is a pool of pages `data[layer]: [num_pages, page_size, latent_dim]`; each
sequence owns a list of pages (`page_table[seq]`) and a length (`seq_lens[seq]`). Only the latent
is stored, never the decompressed K/V (576 values per token per layer for DeepSeek instead of
128·(192+128)). Pages are shared by all layers: page p of a sequence holds the same positions in
every layer, so allocation happens once per step, not once per layer.

fp8 (e4m3) storage keeps one fp32 scale per token and 128-value group of the latent (c_kv in four
groups, k_pe in its own), so k_pe's small values do not share a scale with c_kv's.

Two ways to fill it:
- `LatentCache.for_batch`: the model's cache; sequence b owns pages [b·n, (b+1)·n) in order, so
  the cached prefix of every sequence is also a plain strided view (`prefix`), no gather.
- the constructor + `set_lengths`: pages come from a free list as sequences grow (a server's
  cache); sequences interleave and `prefix` gathers through the page table.
"""

from __future__ import annotations

import math

import torch

from runtime.errors import HmoeError

FP8_GROUP = 128  # latent values per fp8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_PAGE_SIZE = 64
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


class CacheFullError(HmoeError):
    pass


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in CACHE_DTYPES.values():
            raise HmoeError(f"latent cache dtype {dtype} is not one of {', '.join(CACHE_DTYPES)}")
        return dtype
    if dtype not in CACHE_DTYPES:
        raise HmoeError(f"unknown latent cache dtype '{dtype}'; choose one of {', '.join(CACHE_DTYPES)}")
    return CACHE_DTYPES[dtype]


def bytes_per_token(latent_dim: int, dtype: str | torch.dtype) -> int:
    """Bytes one token occupies in one layer: the latent, plus fp32 scales for fp8."""
    dt = storage_dtype(dtype)
    if dt == torch.float8_e4m3fn:
        return latent_dim + 4 * math.ceil(latent_dim / FP8_GROUP)
    return latent_dim * dt.itemsize


def cache_bytes(*, num_layers: int, latent_dim: int, ctx: int, batch: int = 1, dtype: str | torch.dtype = "bf16",
                page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Exact device bytes of `LatentCache.for_batch` for `batch` sequences of up to `ctx` tokens
    (whole pages), without the page table (4 bytes per page and sequence)."""
    pages = batch * math.ceil(ctx / page_size)
    return num_layers * pages * page_size * bytes_per_token(latent_dim, dtype)


def quantize_fp8(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [..., D] -> (e4m3 [..., D], fp32 scales [..., ceil(D/128)]) with per-group amax scaling."""
    D = latent.shape[-1]
    G = math.ceil(D / FP8_GROUP)
    x = torch.nn.functional.pad(latent.float(), (0, G * FP8_GROUP - D)).unflatten(-1, (G, FP8_GROUP))
    scales = (x.abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (x / scales[..., None]).to(torch.float8_e4m3fn).flatten(-2)[..., :D]
    return q, scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    D = q.shape[-1]
    G = scales.shape[-1]
    x = torch.nn.functional.pad(q.float(), (0, G * FP8_GROUP - D)).unflatten(-1, (G, FP8_GROUP))
    return (x * scales[..., None]).flatten(-2)[..., :D].to(dtype)


class LatentCache:
    def __init__(self, *, num_layers: int, latent_dim: int, num_pages: int, max_seqs: int, max_pages_per_seq: int,
                 page_size: int = DEFAULT_PAGE_SIZE, dtype: str | torch.dtype = torch.bfloat16,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        self.num_layers, self.latent_dim, self.page_size = num_layers, latent_dim, page_size
        self.dtype = storage_dtype(dtype)
        self.fp8 = self.dtype == torch.float8_e4m3fn
        # what readers get back: the model's dtype for fp8 storage, else the storage dtype
        self.compute_dtype = compute_dtype or (torch.bfloat16 if self.fp8 else self.dtype)
        self.data = torch.zeros(num_layers, num_pages, page_size, latent_dim, dtype=self.dtype, device=device)
        self.scales = (torch.ones(num_layers, num_pages, page_size, math.ceil(latent_dim / FP8_GROUP),
                                  dtype=torch.float32, device=device) if self.fp8 else None)
        self.page_table = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        # host mirrors: allocation and launch decisions never wait on the device
        self.lens = [0] * max_seqs
        self.pages: list[list[int]] = [[] for _ in range(max_seqs)]
        self.pinned = False  # for_batch: every sequence owns its pages for good
        self.contiguous = False  # for_batch: sequence b's pages are one run, b-major
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out pages in ascending order
        self._slots: torch.Tensor | None = None  # [B, T] flat slot of each new token, set by prepare
        # kernels size their launch (the Triton decode's KV splits) for this many positions instead of
        # the current length while set: a captured CUDA graph must not depend on it (runtime.graph)
        self.launch_len: int | None = None

    @classmethod
    def for_batch(cls, *, num_layers: int, latent_dim: int, batch: int, max_len: int,
                  page_size: int = DEFAULT_PAGE_SIZE, dtype: str | torch.dtype = torch.bfloat16,
                  compute_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> LatentCache:
        n = math.ceil(max_len / page_size)
        cache = cls(num_layers=num_layers, latent_dim=latent_dim, num_pages=batch * n, max_seqs=batch,
                    max_pages_per_seq=n, page_size=page_size, dtype=dtype, compute_dtype=compute_dtype, device=device)
        cache.pages = [list(range(b * n, (b + 1) * n)) for b in range(batch)]
        cache._free = []
        cache.page_table.copy_(torch.arange(batch * n, dtype=torch.int32).view(batch, n))
        cache.pinned = cache.contiguous = True
        return cache

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scales.nbytes if self.fp8 else 0)

    # --- allocation (host) ---

    def set_lengths(self, lengths: list[int]) -> None:
        """Sequences 0..len(lengths)-1 now hold lengths[s] tokens: pages are allocated or freed to
        match (contents of kept positions are unchanged)."""
        need = [math.ceil(n / self.page_size) for n in lengths]
        for s, n in enumerate(lengths):
            if n > self.max_len:
                raise CacheFullError(f"sequence {s} needs {n} positions; the latent cache holds {self.max_len} "
                                     f"per sequence")
        changed = False
        if not self.pinned:  # check first, so that a refusal changes nothing
            grow = sum(max(0, k - len(self.pages[s])) for s, k in enumerate(need))
            shrink = sum(max(0, len(self.pages[s]) - k) for s, k in enumerate(need))
            if grow > len(self._free) + shrink:
                raise CacheFullError(f"the latent cache is out of pages: lengths {lengths} need {grow} more pages of "
                                     f"{self.page_size} tokens and {len(self._free) + shrink} are free")
            for s, k in enumerate(need):
                while len(self.pages[s]) > k:
                    self._free.append(self.pages[s].pop())
                    changed = True
            for s, k in enumerate(need):
                while len(self.pages[s]) < k:
                    self.pages[s].append(self._free.pop())
                    changed = True
        self.lens[:len(lengths)] = lengths
        if changed:
            table = [p + [0] * (self.page_table.shape[1] - len(p)) for p in self.pages]
            self.page_table.copy_(torch.tensor(table, dtype=torch.int32))
        self.seq_lens[:len(lengths)].copy_(torch.tensor(lengths, dtype=torch.int32))

    def prepare(self, start: int, num_new: int, batch: int) -> None:
        """Before a model step: sequences 0..batch-1 will hold positions 0..start+num_new-1 (a start
        below the current length drops the rest, as when a chat turn diverges from the cached ids)."""
        self.set_lengths([start + num_new] * batch)
        pos = torch.arange(start, start + num_new, device=self.page_table.device)
        pages = self.page_table[:batch, pos // self.page_size].long()  # [B, T]
        self._slots = pages * self.page_size + pos % self.page_size

    def prepare_at(self, position: torch.Tensor, num_new: int, batch: int) -> None:
        """prepare() with the step's start in a device tensor `position` [1] (int64): lengths and
        slots computed on the device, nothing read back or copied from the host, so the step can be
        captured in a CUDA graph. The host mirrors are the caller's (note_lengths); pages must exist
        already (for_batch caches own theirs for good)."""
        assert self.pinned, "prepare_at needs a for_batch cache (its pages never change)"
        pos = position + torch.arange(num_new, device=position.device)
        self.seq_lens[:batch].copy_((pos[-1:] + 1).to(torch.int32).expand(batch))
        pages = self.page_table[:batch, pos // self.page_size].long()
        self._slots = pages * self.page_size + pos % self.page_size

    def note_lengths(self, lengths: list[int]) -> None:
        """Host mirrors only, for a step whose device side prepare_at does (or a graph replays)."""
        if max(lengths) > self.max_len:
            raise CacheFullError(f"a sequence needs {max(lengths)} positions; the latent cache holds {self.max_len} "
                                 f"per sequence")
        self.lens[:len(lengths)] = lengths

    # --- writes and reads ---

    def write(self, layer: int, start: int | torch.Tensor, latent: torch.Tensor) -> None:
        """Store latent [B, T, D] of the step `prepare(start, T, B)` announced."""
        B, T, _ = latent.shape
        assert self._slots is not None and self._slots.shape == (B, T), "call prepare(start, T, B) before write"
        assert not isinstance(start, int) or self.lens[0] == start + T, \
            f"prepare announced length {self.lens[0]}, write ends at {start + T}"
        self._store(layer, self._slots.reshape(-1), latent.reshape(B * T, -1))

    def write_target(self, layer: int, start: int | torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where write(layer, start, latent [B, T, D]) would store: (the layer's rows [slots, D], the flat
        slot of each new token [B * T]), for a kernel that computes and stores the latent at once; None
        for an fp8 cache (its scales are written beside it)."""
        assert self._slots is not None and self._slots.shape == (B, T), "call prepare(start, T, B) before write"
        assert not isinstance(start, int) or self.lens[0] == start + T, \
            f"prepare announced length {self.lens[0]}, write ends at {start + T}"
        return None if self.fp8 else (self.data[layer].view(-1, self.latent_dim), self._slots.reshape(-1))

    def store(self, layer: int, seq: int, start: int, latent: torch.Tensor) -> None:
        """Store latent [T, D] of one sequence at positions start.. (within its length)."""
        T = latent.shape[0]
        assert start + T <= self.lens[seq], f"positions up to {start + T} but sequence {seq} has {self.lens[seq]}"
        pos = torch.arange(start, start + T, device=self.page_table.device)
        slots = self.page_table[seq, pos // self.page_size].long() * self.page_size + pos % self.page_size
        self._store(layer, slots, latent)

    def _store(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        flat = self.data[layer].view(-1, self.latent_dim)
        if self.fp8:
            q, scales = quantize_fp8(latent)
            flat[slots] = q
            self.scales[layer].view(-1, self.scales.shape[-1])[slots] = scales
        else:
            flat[slots] = latent.to(self.dtype)

    def read(self, layer: int, batch: int, begin: int, end: int) -> torch.Tensor:
        """Positions begin..end-1 of sequences 0..batch-1 -> [B, end-begin, D] in compute_dtype.
        A view for for_batch caches in a 16/32-bit dtype; otherwise gathered through the page table."""
        page = self.page_size
        if self.contiguous and not self.fp8:
            n = self.page_table.shape[1]
            return self.data[layer, :batch * n].view(batch, n * page, -1)[:, begin:end]
        p0, p1 = begin // page, math.ceil(end / page)
        ids = self.page_table[:batch, p0:p1].long()  # [B, pages]
        lo, hi = begin - p0 * page, end - p0 * page
        x = self.data[layer][ids].flatten(1, 2)[:, lo:hi]
        if self.fp8:
            return dequantize_fp8(x, self.scales[layer][ids].flatten(1, 2)[:, lo:hi], self.compute_dtype)
        return x

    def prefix(self, layer: int, batch: int) -> torch.Tensor:
        """The whole cached prefix [B, S, D] of sequences of equal length S (the model's case)."""
        S = self.lens[0]
        assert all(n == S for n in self.lens[:batch]), "prefix() needs sequences of equal length"
        return self.read(layer, batch, 0, S)
