"""DSA building blocks against brute-force references: indexer scores and top-k, sparse MLA in both
forms, dense == sparse while the context fits top-k, the FP8 indexer-key cache."""

import pytest
import torch

from gpu_attention.dsa_torch import (indexer_scores, indexer_topk, mla_masked_decompressed, mla_sparse,
                                     mla_sparse_absorbed, sparse_mask)
from gpu_attention.mla_torch import mla_absorbed, mla_decompressed

from .conftest import rel_err

B, H, NOPE, ROPE, V, R = 2, 4, 16, 8, 16, 32
HI, DI = 4, 16


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mla_inputs(T, S, seed=0):
    return (rand(B, T, H, NOPE, seed=seed), rand(B, T, H, ROPE, seed=seed + 1), rand(B, S, R + ROPE, seed=seed + 2),
            rand(H * (NOPE + V), R, seed=seed + 3) * R**-0.5)


ARGS = dict(kv_lora_rank=R, v_head_dim=V, scale=0.2)


def test_indexer_scores_match_a_loop():
    T, S = 3, 7
    q, w, k = rand(B, T, HI, DI, seed=0), rand(B, T, HI, seed=1), rand(B, S, DI, seed=2)
    got = indexer_scores(q, w, k, scale=0.25, first_pos=S - T)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                if s > S - T + t:
                    assert got[b, t, s] == float("-inf")
                else:
                    want = sum(w[b, t, h] * torch.relu(0.25 * q[b, t, h] @ k[b, s]) for h in range(HI))
                    assert abs(float(got[b, t, s] - want)) < 1e-5


def test_topk_in_query_blocks_equals_one_block():
    T, S = 9, 20
    q, w, k = rand(B, T, HI, DI, seed=3), rand(B, T, HI, seed=4), rand(B, S, DI, seed=5)
    whole = indexer_topk(q, w, k, topk=6, scale=0.25)
    blocked = indexer_topk(q, w, k, topk=6, scale=0.25, block_bytes=1)  # one query per block
    assert whole.shape == (B, T, 6) and torch.equal(whole, blocked)
    scores = indexer_scores(q, w, k, scale=0.25, first_pos=S - T)
    picked = scores.gather(-1, whole)
    assert (picked.min(-1).values[..., None] >= scores.masked_fill(sparse_mask(whole, S), float("-inf"))).all()


def test_sparse_mask_keeps_selected_visible_keys():
    idx = torch.tensor([[[0, 3, 4], [1, 2, 4]]])  # queries at positions 3 and 4 of S = 5; key 4 is query 0's future
    mask = sparse_mask(idx, 5)
    assert mask.tolist() == [[[True, False, False, True, False], [False, True, True, False, True]]]


@pytest.mark.parametrize("T", [1, 5])
def test_sparse_absorbed_equals_attention_over_the_selected_rows(T):
    S, K = 12, 4
    q_nope, q_pe, latent, w = mla_inputs(T, S)
    idx = torch.stack([torch.randperm(S, generator=torch.Generator().manual_seed(i))[:K] for i in range(B * T)])
    idx = idx.view(B, T, K)
    got = mla_sparse_absorbed(q_nope, q_pe, latent, w, idx, **ARGS)
    for b in range(B):
        for t in range(T):
            keep = sorted(i for i in idx[b, t].tolist() if i <= S - T + t)  # selected and not in the future
            rows = latent[b:b + 1, keep]
            want = mla_absorbed(q_nope[b:b + 1, t:t + 1], q_pe[b:b + 1, t:t + 1], rows, w, **ARGS)
            assert rel_err(got[b, t], want[0, 0]) < 1e-5


def test_both_sparse_forms_agree():
    T, S = 6, 16
    q_nope, q_pe, latent, w = mla_inputs(T, S, seed=10)
    idx = indexer_topk(rand(B, T, HI, DI, seed=11), rand(B, T, HI, seed=12), rand(B, S, DI, seed=13),
                       topk=5, scale=0.25)
    a = mla_sparse(q_nope, q_pe, latent, w, idx, form="absorbed", **ARGS)
    d = mla_sparse(q_nope, q_pe, latent, w, idx, form="decompressed", **ARGS)
    assert rel_err(a, d) < 1e-5
    assert rel_err(d, mla_decompressed(q_nope, q_pe, latent, w, **ARGS)) > 1e-2  # top-5 of 16 is not dense


@pytest.mark.parametrize("topk", [16, 64])
def test_dense_equals_sparse_when_context_fits_topk(topk):
    T, S = 6, 16
    q_nope, q_pe, latent, w = mla_inputs(T, S, seed=20)
    idx = indexer_topk(rand(B, T, HI, DI, seed=21), rand(B, T, HI, seed=22), rand(B, S, DI, seed=23), topk=topk,
                       scale=0.25)
    dense = mla_absorbed(q_nope, q_pe, latent, w, **ARGS)
    assert rel_err(mla_sparse_absorbed(q_nope, q_pe, latent, w, idx, **ARGS), dense) < 1e-5
    keep = sparse_mask(idx, S)
    assert rel_err(mla_masked_decompressed(q_nope, q_pe, latent, w, keep, **ARGS),
                   mla_decompressed(q_nope, q_pe, latent, w, **ARGS)) < 1e-5


# --- the paged caches: gathers through the page table, the indexer-key cache in fp8 ---

from gpu_attention.dsa import dsa_attention, gather_rows, select_topk  # noqa: E402
from gpu_attention.latent_cache import LatentCache  # noqa: E402


def interleaved_cache(latent, page_size=4, dtype=torch.float32):
    """A paged cache whose two sequences grew in turns, so their pages interleave in the pool."""
    Bn, S, D = latent.shape
    cache = LatentCache(num_layers=1, latent_dim=D, num_pages=Bn * (S // page_size + 1), max_seqs=Bn,
                        max_pages_per_seq=S // page_size + 1, page_size=page_size, dtype=dtype)
    for n in range(1, S + 1):
        cache.set_lengths([n] * Bn)
        for b in range(Bn):
            cache.store(0, b, n - 1, latent[b, n - 1:n])
    assert cache.page_table[0, 1] != cache.page_table[0, 0] + 1  # really interleaved
    return cache


def test_paged_gather_and_sparse_attention_match_the_contiguous_reference():
    T, S = 3, 13
    q_nope, q_pe, latent, w = mla_inputs(T, S, seed=30)
    cache = interleaved_cache(latent)
    idx = indexer_topk(rand(B, T, HI, DI, seed=31), rand(B, T, HI, seed=32), rand(B, S, DI, seed=33),
                       topk=5, scale=0.25)
    assert torch.equal(gather_rows(cache, 0, idx), latent[torch.arange(B)[:, None, None], idx])
    want = mla_sparse(q_nope, q_pe, latent, w, idx, form="absorbed", **ARGS)
    for form, budget in (("absorbed", 1 << 30), ("absorbed", 1), ("decompressed", 1 << 30)):  # budget 1: per query
        got = dsa_attention(q_nope, q_pe, cache, 0, w, idx, v_head_dim=V, scale=ARGS["scale"], form=form, budget=budget)
        assert rel_err(got, want) < 1e-5


def test_select_topk_reads_the_paged_index_keys():
    T, S = 2, 11
    keys = rand(B, S, DI, seed=40)
    q, wts = rand(B, T, HI, DI, seed=41), rand(B, T, HI, seed=42)
    got = select_topk(q, wts, interleaved_cache(keys), 0, topk=4, scale=0.25, backend="torch")
    assert torch.equal(got, indexer_topk(q, wts, keys, topk=4, scale=0.25))


def test_fp8_index_keys_error_bound_and_selection():
    S, D = 512, 128
    keys = rand(1, S, D, seed=50) * torch.linspace(0.01, 10, S)[None, :, None]  # magnitudes vary per token
    cache = LatentCache.for_batch(num_layers=1, latent_dim=D, batch=1, max_len=S, dtype="fp8",
                                  compute_dtype=torch.float32)
    cache.prepare(0, S, 1)
    cache.write(0, 0, keys)
    got = cache.prefix(0, 1)
    scale = keys.abs().amax(-1, keepdim=True) / 448  # one scale per token (one 128-value group)
    # e4m3: 3 mantissa bits (relative half-ulp 2**-4); below 2**-6 subnormal steps of 2**-9 (half 2**-10)
    bound = torch.maximum(keys.abs() * 2**-4, scale * 2**-10)
    assert ((got - keys).abs() <= bound * 1.0001).all()
    q, wts = rand(1, 4, HI, D, seed=51), rand(1, 4, HI, seed=52).abs()
    exact = indexer_topk(q, wts, keys, topk=64, scale=D**-0.5)
    quant = select_topk(q, wts, cache, 0, topk=64, scale=D**-0.5, backend="torch")
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact[0], quant[0])) / (4 * 64)
    assert overlap >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_triton_index_scores_match_torch(dtype):
    from gpu_attention.dsa_triton import index_scores

    T, S, Hi, D = 3, 300, 64, 128
    keys = rand(2, S, D, seed=60).cuda()
    cache = LatentCache.for_batch(num_layers=1, latent_dim=D, batch=2, max_len=S, page_size=64, dtype=dtype,
                                  compute_dtype=torch.bfloat16, device="cuda")
    cache.prepare(0, S, 2)
    cache.write(0, 0, keys.bfloat16())
    q, wts = rand(2, T, Hi, D, seed=61).cuda().bfloat16(), rand(2, T, Hi, seed=62).cuda()
    want = indexer_scores(q, wts, cache.prefix(0, 2), scale=D**-0.5, first_pos=S - T)
    got = index_scores(q, wts, cache, 0, scale=D**-0.5)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert rel_err(got[finite], want[finite]) < 1e-3


def test_v32_config_errors_name_the_key():
    from runtime.config import config_from_dict
    from runtime.errors import ConfigError
    from runtime.make_model import PRESETS

    with pytest.raises(ConfigError, match="key 'q_lora_rank' is null; the V3.2 indexer"):
        config_from_dict({**PRESETS["v32"], "q_lora_rank": None})
    with pytest.raises(ConfigError, match="key 'index_head_dim'=32 is smaller than 'qk_rope_head_dim'=64"):
        config_from_dict({**PRESETS["v32"], "index_head_dim": 32})
