"""MLA over the paged latent cache: the one call the model makes.

Picks the form per call (absorbed for decode and short prefills, decompressed from
DECOMPRESS_MIN_TOKENS new tokens) and the backend (Triton kernels for CUDA tensors when Triton
is installed, the plain-torch path otherwise; HMOE_ATTENTION=torch forces the latter). Triton is
imported only when a CUDA tensor arrives, so the CPU-only install never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from . import paged_torch
from .latent_cache import LatentCache
from .mla_torch import absorb_weights

# From this many new tokens on, the decompressed form is faster. In multiply-adds the two forms
# break even at ≈170 new tokens whatever the cached length (both sides grow with it); measured
# (`hmoe bench-attn --crossover 8192`, benchmarks/results/2026-11-21-*-attn-*.json):
# - triton, H100, 8K cached: 128 new tokens at 16 heads, 48 at 128 heads (the absorbed kernel
#   reaches ~165 TFLOP/s against the decompressed one's ~380, which moves the 128-head point down);
# - torch, the 2-core CI box, bf16, 16 heads, 4K cached: 512 (384-512, noisy).
DECOMPRESS_MIN_TOKENS = {"triton": {16: 128, 128: 48}, "torch": {16: 512}}


def choose_form(num_new: int, backend: str, num_heads: int) -> str:
    measured = DECOMPRESS_MIN_TOKENS[backend]
    nearest = min(measured, key=lambda h: abs(math.log(h / num_heads)))  # closest measured head count
    return "decompressed" if num_new >= measured[nearest] else "absorbed"


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device) -> str:
    if device.type == "cuda" and _have_triton() and os.environ.get("HMOE_ATTENTION", "") != "torch":
        return "triton"
    return "torch"


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, layer: int,
                  kv_b_weight: torch.Tensor, *, v_head_dim: int, scale: float, form: str = "auto",
                  backend: str | None = None, budget: int = paged_torch.DEFAULT_BUDGET) -> torch.Tensor:
    """q_nope [B, T, H, nope], q_pe [B, T, H, rope] of the last T positions of cache sequences
    0..B-1 (already written) -> out [B, T, H, v]. kv_b_weight [H*(nope+v), R]."""
    B, T, H, nope = q_nope.shape
    backend = backend or backend_for(q_nope.device)
    if form == "auto":
        form = choose_form(T, backend, H)
    if form == "absorbed":
        w_uk, w_uv = absorb_weights(kv_b_weight, num_heads=H, qk_nope_head_dim=nope, v_head_dim=v_head_dim)
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # one KV head of width R + rope
        if backend == "triton":
            from .triton_decode import absorbed_decode
            out_latent = absorbed_decode(q_latent, q_pe, cache, layer, scale=scale)
        else:
            out_latent = paged_torch.absorbed(q_latent, q_pe, cache, layer, scale=scale, budget=budget)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
    if form != "decompressed":
        raise ValueError(f"attention form must be auto, absorbed or decompressed, got {form!r}")
    if backend == "triton":
        return _decompressed_triton(q_nope, q_pe, cache, layer, kv_b_weight, v_head_dim=v_head_dim, scale=scale,
                                    budget=budget)
    return paged_torch.decompressed(q_nope, q_pe, cache, layer, kv_b_weight, v_head_dim=v_head_dim, scale=scale,
                                    budget=budget)


def _decompressed_triton(q_nope, q_pe, cache: LatentCache, layer: int, kv_b_weight, *, v_head_dim: int,
                         scale: float, budget: int) -> torch.Tensor:
    """Flash attention over K/V decompressed chunk by chunk; the chunk buffers stay under budget
    (the scores never leave the kernel), each chunk merged into the output by log-sum-exp."""
    from .triton_prefill import prefill_chunk
    B, T, H, nope = q_nope.shape
    R = kv_b_weight.shape[1]
    total = max(cache.lens[:B])
    step = paged_torch.chunk_keys(cache, B * (H * (nope + v_head_dim) + cache.latent_dim) * q_nope.element_size(),
                                  budget)
    out = lse = None
    if total > step:  # several chunks: merge in fp32
        out = torch.empty(B, T, H, v_head_dim, dtype=torch.float32, device=q_nope.device)
    for begin in range(0, total, step):
        end = min(begin + step, total)
        latent = cache.read(layer, B, begin, end)
        kv = (latent[..., :R].to(kv_b_weight.dtype) @ kv_b_weight.T).view(B, end - begin, H, nope + v_head_dim)
        k_nope, v = kv.split([nope, v_head_dim], dim=-1)
        out, lse = prefill_chunk(q_nope, q_pe, k_nope, v, latent[..., R:].to(q_pe.dtype), cache.seq_lens,
                                 kv_begin=begin, scale=scale, out=out, lse=lse, accumulate=begin > 0)
    return out.to(q_nope.dtype)
