"""The paged latent cache and the plain-torch MLA over it, against gpu_attention.mla_torch (CPU, CI)."""

import math

import pytest
import torch

from gpu_attention import paged_torch
from gpu_attention.attention import backend_for, choose_form, mla_attention
from gpu_attention.latent_cache import (FP8_GROUP, CacheFullError, LatentCache, bytes_per_token, cache_bytes,
                                        dequantize_fp8, quantize_fp8)
from gpu_attention.mla_torch import absorb_weights, mla_absorbed, mla_decompressed

from .conftest import rel_err

R, ROPE, H, NOPE, VD = 32, 16, 4, 16, 24
SCALE = 0.3


def fragmented_cache(lens, *, page_size=16, dtype=torch.float32, layers=2, seed=0):
    """Sequences grown in turns, so their pages interleave; returns the cache and each sequence's
    latent [len, D] as written into layer 1."""
    cache = LatentCache(num_layers=layers, latent_dim=R + ROPE, num_pages=64, max_seqs=len(lens),
                        max_pages_per_seq=16, page_size=page_size, dtype=dtype, compute_dtype=torch.float32)
    for grow in (0.25, 0.5, 1.0):
        cache.set_lengths([math.ceil(n * grow) for n in lens])
    gen = torch.Generator().manual_seed(seed)
    latents = [torch.randn(n, R + ROPE, generator=gen) for n in lens]
    for s, x in enumerate(latents):
        cache.store(1, s, 0, x)
    return cache, latents


def queries(B, T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    kv_b = torch.randn(H * (NOPE + VD), R, generator=gen) * R**-0.5
    return torch.randn(B, T, H, NOPE, generator=gen), torch.randn(B, T, H, ROPE, generator=gen), kv_b


def reference(form, q_nope, q_pe, latents, kv_b):
    """mla_torch per sequence on its own contiguous latent."""
    fn = mla_absorbed if form == "absorbed" else mla_decompressed
    return torch.cat([fn(q_nope[b:b + 1], q_pe[b:b + 1], x[None], kv_b, kv_lora_rank=R, v_head_dim=VD, scale=SCALE)
                      for b, x in enumerate(latents)])


def test_fragmented_pages_interleave_and_read_back():
    cache, latents = fragmented_cache([37, 100, 5])
    assert cache.pages[0] != list(range(cache.pages[0][0], cache.pages[0][0] + len(cache.pages[0])))
    assert [len(p) for p in cache.pages] == [3, 7, 1]
    for s, x in enumerate(latents):
        assert torch.equal(cache.read(1, s + 1, 0, len(x))[s], x)
    assert torch.equal(cache.read(1, 2, 30, 90)[1], latents[1][30:90])


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
@pytest.mark.parametrize("num_new", [1, 5])
def test_ragged_fragmented_batch_matches_reference(form, num_new):
    lens = [37, 100, 5]  # none a multiple of the page size
    cache, latents = fragmented_cache(lens)
    q_nope, q_pe, kv_b = queries(len(lens), num_new)
    out = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form=form)
    assert rel_err(out, reference(form, q_nope, q_pe, latents, kv_b)) <= 1e-5


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_chunked_equals_unchunked(form):
    cache, latents = fragmented_cache([150, 83])
    q_nope, q_pe, kv_b = queries(2, 7)
    whole = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form=form, budget=1 << 30)
    pieces = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form=form, budget=1)
    assert paged_torch.chunk_keys(cache, 1, 1) == cache.page_size  # one page per chunk: 10 chunks
    assert rel_err(pieces, whole) <= 1e-6
    assert rel_err(whole, reference(form, q_nope, q_pe, latents, kv_b)) <= 1e-5


def test_chunk_size_respects_the_budget():
    cache = LatentCache.for_batch(num_layers=1, latent_dim=R + ROPE, batch=1, max_len=4096, page_size=64)
    assert paged_torch.chunk_keys(cache, 1000, 1 << 20) == 1024  # 1048 keys fit; whole pages
    assert paged_torch.chunk_keys(cache, 1000, 10) == 64  # never less than a page


def test_absorbed_lse_is_the_log_partition():
    cache, latents = fragmented_cache([40])
    q_nope, q_pe, kv_b = queries(1, 1)
    w_uk, _ = absorb_weights(kv_b, num_heads=H, qk_nope_head_dim=NOPE, v_head_dim=VD)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    _, lse = paged_torch.absorbed(q_latent, q_pe, cache, 1, scale=SCALE, budget=1, return_lse=True)
    x = latents[0]
    scores = (torch.einsum("hr,sr->hs", q_latent[0, 0], x[:, :R]) + torch.einsum("hr,sr->hs", q_pe[0, 0], x[:, R:]))
    assert torch.allclose(lse[0, :, 0], torch.logsumexp(scores * SCALE, -1), atol=1e-5)


def test_for_batch_prefix_is_a_view_and_prepare_truncates():
    cache = LatentCache.for_batch(num_layers=2, latent_dim=R + ROPE, batch=2, max_len=100, page_size=16,
                                  dtype=torch.float32)
    a = torch.randn(2, 30, R + ROPE)
    cache.prepare(0, 30, 2)
    cache.write(0, 0, a)
    assert cache.prefix(0, 2).data_ptr() == cache.data.data_ptr() and torch.equal(cache.prefix(0, 2), a)
    b = torch.randn(2, 4, R + ROPE)
    cache.prepare(20, 4, 2)  # a chat turn that diverges at position 20
    cache.write(0, 20, b)
    assert cache.lens[:2] == [24, 24] and cache.seq_lens.tolist() == [24, 24]
    assert torch.equal(cache.prefix(0, 2), torch.cat([a[:, :20], b], 1))


def test_dynamic_pages_are_freed_and_reused():
    cache = LatentCache(num_layers=1, latent_dim=8, num_pages=4, max_seqs=2, max_pages_per_seq=4, page_size=4)
    cache.set_lengths([16, 0])
    with pytest.raises(CacheFullError, match=r"out of pages: lengths \[16, 3\] need 1 more pages of 4 tokens and 0 are"):
        cache.set_lengths([16, 3])
    assert cache.lens[:2] == [16, 0]  # a refusal changes nothing
    cache.set_lengths([4, 9])  # seq 0 gives back three pages, seq 1 takes them
    assert cache.pages == [[0], [1, 2, 3]] and cache.page_table[1, :3].tolist() == [1, 2, 3]
    with pytest.raises(CacheFullError, match="sequence 0 needs 17 positions; the latent cache holds 16"):
        cache.set_lengths([17])


def test_exact_bytes():
    for dtype, per_token in (("bf16", 576 * 2), ("fp8", 576 + 4 * 5), ("fp32", 576 * 4)):
        assert bytes_per_token(576, dtype) == per_token
        got = cache_bytes(num_layers=3, latent_dim=576, ctx=100, batch=2, dtype=dtype, page_size=64)
        assert got == 3 * 2 * 128 * per_token  # 100 tokens take two pages of 64
        cache = LatentCache.for_batch(num_layers=3, latent_dim=576, batch=2, max_len=100, page_size=64, dtype=dtype,
                                      device="meta")
        assert cache.nbytes == got
    # V3: 61 layers, 128K tokens, bf16 = 70 KB per token
    assert cache_bytes(num_layers=61, latent_dim=576, ctx=131072) == 61 * 131072 * 1152


def test_fp8_round_trip_error_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 576, generator=gen) * torch.logspace(-3, 1, 50)[:, None]
    x[:, 512:] *= 0.01  # k_pe has its own group and scale
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (50, 5)
    back = dequantize_fp8(q, scales, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus the subnormal step 2^-9·scale
    group_scale = scales.repeat_interleave(FP8_GROUP, dim=-1)[:, :576]
    assert ((back - x).abs() <= x.abs() * 2**-4 + group_scale * 2**-9).all()


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_fp8_cache_attention_error_bound(form):
    lens = [90, 41]
    exact, latents = fragmented_cache(lens)
    fp8, _ = fragmented_cache(lens, dtype="fp8")
    q_nope, q_pe, kv_b = queries(2, 3)
    ref = mla_attention(q_nope, q_pe, exact, 1, kv_b, v_head_dim=VD, scale=SCALE, form=form)
    out = mla_attention(q_nope, q_pe, fp8, 1, kv_b, v_head_dim=VD, scale=SCALE, form=form)
    assert 1e-3 < rel_err(out, ref) < 0.05  # fp8 really was used, and stays close
    deq = [fp8.read(1, 2, 0, n)[b] for b, n in enumerate(lens)]
    assert rel_err(out, reference(form, q_nope, q_pe, deq, kv_b)) <= 1e-5  # same math on the dequantized latent


def test_form_and_backend_choice_on_cpu():
    assert backend_for(torch.device("cpu")) == "torch"
    assert choose_form(1, "torch", 16) == "absorbed"
    assert choose_form(4096, "torch", 128) == "decompressed"
    # the measured Triton crossovers: 128 new tokens at 16 heads, 48 at 128 heads
    assert [choose_form(t, "triton", 16) for t in (127, 128)] == ["absorbed", "decompressed"]
    assert [choose_form(t, "triton", 128) for t in (47, 48)] == ["absorbed", "decompressed"]


def test_bench_attn_cpu_crossover(capsys):
    import json

    from runtime.cli import main
    assert main(["bench-attn", "--device", "cpu", "--heads", "16", "--crossover", "64", "--crossover-tokens", "8,16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (cross,) = result["crossover"]
    assert cross["backend"] == "torch" and [r["new_tokens"] for r in cross["rows"]] == [8, 16]
    assert all(r["absorbed_us"] > 0 and r["decompressed_us"] > 0 for r in cross["rows"])
    assert result["command"].startswith("hmoe bench-attn --heads 16")
    assert main(["bench-attn", "--device", "cpu"]) == 2
    assert "bench-attn --device cpu only measures the crossover" in capsys.readouterr().err


def test_model_runs_on_an_fp8_paged_cache(hf_v3):
    from runtime.loader import load_model
    _, path = hf_v3
    model = load_model(path, dtype="float32")
    ids = torch.randint(2, 256, (1, 70), generator=torch.Generator().manual_seed(4))
    exact = model(ids, cache=model.new_cache(batch=1, max_len=80))
    whole = model(ids, cache=model.new_cache(batch=1, max_len=80, dtype="fp8"))
    cache = model.new_cache(batch=1, max_len=80, dtype="fp8", page_size=16)
    steps = [model(ids[:, :50], cache=cache), model(ids[:, 50:], cache=cache, start_pos=50)]
    assert cache.data.dtype == torch.float8_e4m3fn and cache.lens[0] == 70
    # each token's latent is quantized alone, so a prefill in pieces sees the same cache
    assert rel_err(torch.cat(steps, 1), whole) <= 1e-5
    # 3 mantissa bits through 3 layers of a random tiny model (one scale for its 24-value latent)
    assert 1e-3 < rel_err(whole, exact) < 0.3
