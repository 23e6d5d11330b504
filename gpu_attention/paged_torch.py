"""Both MLA forms over the paged cache in plain torch: the CPU path and the parity reference of
the Triton kernels.

The KV axis is walked in chunks whose score buffer stays under a byte budget (ik_llama.cpp's
`-amb`); each chunk yields an unnormalised partial output with its running max and sum, and
chunks are merged by log-sum-exp, the same split-KV math the GPU kernels use. With one chunk
this is exactly gpu_attention.mla_torch.

Shapes: q_latent [B, T, H, R], q_nope [B, T, H, nope], q_pe [B, T, H, rope]; the T new tokens of
sequence b sit at positions len_b-T .. len_b-1 (ragged lengths allowed). Outputs [B, T, H, R|v].
"""

from __future__ import annotations

import torch

from .latent_cache import LatentCache

DEFAULT_BUDGET = 256 << 20  # bytes of score (and decompressed K/V) buffers per chunk


def chunk_keys(cache: LatentCache, per_key_bytes: int, budget: int) -> int:
    """Keys per chunk: a multiple of the page size, at least one page, buffers <= budget."""
    page = cache.page_size
    return max(page, budget // max(per_key_bytes, 1) // page * page)


class _Softmax:
    """Running (max, sum, unnormalised output) of an online softmax, merged chunk by chunk."""

    def __init__(self):
        self.m = self.l = self.o = None

    def add(self, scores: torch.Tensor, values, mask: torch.Tensor) -> None:
        """scores [B, H, T, C] fp32 (already scaled), mask [B, T, C] True where visible;
        values(probs [B, H, T, C] fp32) -> unnormalised output [B, T, H, X]."""
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        m_c = scores.amax(-1)  # [B, H, T]; -inf where nothing is visible
        m_new = m_c if self.m is None else torch.maximum(self.m, m_c)
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = torch.exp(scores - m_safe[..., None])
        o_c = values(p).float()
        l_c = p.sum(-1)
        if self.m is None:
            self.l, self.o = l_c, o_c
        else:
            alpha = torch.exp(self.m - m_safe)  # rescale what was accumulated so far
            self.l = self.l * alpha + l_c
            self.o = self.o * alpha.permute(0, 2, 1)[..., None] + o_c
        self.m = m_new

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output [B, T, H, X] in dtype, lse [B, H, T] natural log; -inf for rows that saw nothing)."""
        l = self.l.permute(0, 2, 1)[..., None]
        out = torch.where(l > 0, self.o / l.clamp_min(1e-30), 0.0)
        return out.to(dtype), self.m + torch.log(self.l)


def _visible(cache: LatentCache, batch: int, num_new: int, begin: int, end: int, device) -> torch.Tensor:
    """[B, T, C] bool: query t of sequence b (position len_b-T+t) may see key position begin+c."""
    lens = torch.tensor(cache.lens[:batch], device=device)
    q_pos = lens[:, None] - num_new + torch.arange(num_new, device=device)  # [B, T]
    keys = torch.arange(begin, end, device=device)
    return keys[None, None, :] <= q_pos[..., None]


def _key_chunks(cache: LatentCache, layer: int, batch: int, step: int, rank: int):
    """(begin, end, c_kv [B, C, rank], k_pe [B, C, rope]) for each chunk of `step` cached positions."""
    S = max(cache.lens[:batch])
    for begin in range(0, S, step):
        end = min(begin + step, S)
        latent = cache.read(layer, batch, begin, end)
        yield begin, end, latent[..., :rank], latent[..., rank:]


def absorbed(q_latent, q_pe, cache: LatentCache, layer: int, *, scale: float, budget: int = DEFAULT_BUDGET,
             return_lse: bool = False):
    """Absorbed form: keys [c_kv ‖ k_pe], values c_kv -> out_latent [B, T, H, R]."""
    B, T, H, R = q_latent.shape
    acc = _Softmax()
    step = chunk_keys(cache, B * H * T * 8, budget)  # fp32 scores + probabilities
    qf, qpf = q_latent.float(), q_pe.float()
    for begin, end, c_kv, k_pe in _key_chunks(cache, layer, B, step, R):
        scores = torch.einsum("bthr,bsr->bhts", qf, c_kv.float())
        scores += torch.einsum("bthr,bsr->bhts", qpf, k_pe.float())
        acc.add(scores * scale, lambda p: torch.einsum("bhts,bsr->bthr", p.to(c_kv.dtype), c_kv),
                _visible(cache, B, T, begin, end, q_latent.device))
    out, lse = acc.result(q_latent.dtype)
    return (out, lse) if return_lse else out


def decompressed(q_nope, q_pe, cache: LatentCache, layer: int, kv_b_weight, *, v_head_dim: int, scale: float,
                 budget: int = DEFAULT_BUDGET, return_lse: bool = False):
    """Decompressed form: K/V of each chunk rebuilt through kv_b_proj -> out [B, T, H, v]."""
    B, T, H, nope = q_nope.shape
    R = kv_b_weight.shape[1]
    acc = _Softmax()
    step = chunk_keys(cache, B * H * (T * 8 + (nope + v_head_dim) * kv_b_weight.element_size()), budget)
    qf, qpf = q_nope.float(), q_pe.float()
    for begin, end, c_kv, k_pe in _key_chunks(cache, layer, B, step, R):
        kv = (c_kv.to(kv_b_weight.dtype) @ kv_b_weight.T).view(B, end - begin, H, nope + v_head_dim)
        k_nope, v = kv.split([nope, v_head_dim], dim=-1)
        scores = torch.einsum("bthd,bshd->bhts", qf, k_nope.float())
        scores += torch.einsum("bthr,bsr->bhts", qpf, k_pe.float())
        acc.add(scores * scale, lambda p: torch.einsum("bhts,bshv->bthv", p.to(v.dtype), v),
                _visible(cache, B, T, begin, end, q_nope.device))
    out, lse = acc.result(q_nope.dtype)
    return (out, lse) if return_lse else out
