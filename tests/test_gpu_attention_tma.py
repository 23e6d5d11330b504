"""The TMA decode kernel (triton_decode_tma) against the plain-torch paged path (GPU machine).

Skipped without CUDA; with Triton and TRITON_INTERPRET=1 the kernel runs on CPU tensors in fp32
(the interpreter emulates the descriptor loads), except the 128K case. On a GPU below compute
capability 9 the kernel refuses; the tests that need it are skipped there.
"""

import pytest
import torch

from gpu_attention import paged_torch
from gpu_attention.mla_torch import absorb_weights

from .test_gpu_attention_kernels import BF16, DEVICE, NOPE, RANK, ROPE, SCALE, VD, make_cache, make_queries, real_gpu
from .conftest import rel_err

pytestmark = pytest.mark.gpu

HOPPER = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
needs_tma = pytest.mark.skipif(not HOPPER, reason="TMA needs compute capability 9+")


def latent_queries(cache, kv_b, B, T, heads, dtype=BF16):
    q_nope, q_pe = make_queries(B, T, heads, dtype)
    w_uk, _ = absorb_weights(kv_b, num_heads=heads, qk_nope_head_dim=NOPE, v_head_dim=VD)
    return torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_pe


@needs_tma
@pytest.mark.parametrize("kernel,heads,lens,num_new,page_size,layout,block,splits", [
    ("tma", 128, [1000], 1, 64, "batch", (64, 8, 64, 2), None),  # 64-row blocks, split by SM count
    ("tma", 128, [91, 260], 2, 64, "fragmented", (64, 8, 64, 2), 1),  # direct output, causal rows of two tokens
    ("tma", 128, [700, 45], 1, 128, "fragmented", (64, 8, 32, 3), 5),  # four tiles per page; empty splits
    ("tma", 16, [517, 64], 1, 64, "fragmented", (16, 4, 32, 4), 3),  # 16 heads, mma.sync tiles
    ("tma", 16, [37, 300, 129], 4, 32, "fragmented", (32, 4, 32, 2), None),  # 4 tokens x 16 heads, 2 blocks
    ("tma_keys", 128, [1000], 1, 64, "batch", (32, 4, 64, 2), None),  # keys-major, 4 head blocks
    ("tma_keys", 128, [91, 260], 2, 128, "fragmented", (64, 8, 128, 1), 1),  # 128-key tiles, direct output
    ("tma_keys", 128, [700, 45], 1, 128, "fragmented", (32, 8, 128, 1), 5),  # one tile per page; empty splits
    ("tma_keys", 16, [517, 64], 1, 64, "fragmented", (16, 4, 64, 3), 3),  # 16 heads: wgmma with N = 16
    ("tma_keys", 16, [37, 300, 129], 4, 32, "fragmented", (32, 4, 32, 2), None),  # 4 tokens x 16 heads
])
def test_tma_kernel_matches_torch_path(kernel, heads, lens, num_new, page_size, layout, block, splits):
    from gpu_attention.triton_decode import absorbed_decode
    cache, kv_b = make_cache(lens, heads=heads, page_size=page_size, layout=layout)
    q_latent, q_pe = latent_queries(cache, kv_b, len(lens), num_new, heads)
    bh, w, bn, st = block
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, kernel=kernel, block_h=bh, num_warps=w, block_n=bn,
                          num_stages=st, num_splits=splits)
    ref = paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)
    assert rel_err(out, ref) <= (1e-2 if BF16 == torch.bfloat16 else 1e-5)


@needs_tma
@pytest.mark.parametrize("kernel", ["tma", "tma_keys"])
def test_tma_kernel_ignores_stale_rows_past_the_end(kernel):
    """TMA reads whole tiles: rows of the last page past a sequence's end (a previous sequence's
    latents, here huge) must get weight 0."""
    from gpu_attention.triton_decode import absorbed_decode
    lens = [100, 30]
    cache, kv_b = make_cache(lens, heads=128, page_size=64, layout="fragmented")
    cache.set_lengths([128, 64])
    for s, n in enumerate(lens):
        stale = torch.full((cache.lens[s] - n, RANK + ROPE), 300.0, device=DEVICE)
        cache.store(1, s, n, stale.to(BF16))
    cache.set_lengths(lens)
    q_latent, q_pe = latent_queries(cache, kv_b, 2, 1, 128)
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, kernel=kernel, num_splits=2)
    ref = paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= (1e-2 if BF16 == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("page_size,dtype,why", [
    (48, BF16, "pages of 48"),  # 48 % 64: tiles would cross pages
    (64, torch.float8_e4m3fn, "float8"),  # the kernel loads 16-bit tiles only
])
def test_tma_kernel_refuses_what_it_cannot_run_and_the_default_falls_back(page_size, dtype, why):
    from gpu_attention.triton_decode import absorbed_decode, plan
    cache, kv_b = make_cache([300, 77], heads=128, page_size=page_size, layout="fragmented", dtype=dtype)
    q_latent, q_pe = latent_queries(cache, kv_b, 2, 1, 128)
    for kernel in ("tma", "tma_keys"):
        with pytest.raises(ValueError, match="TMA kernel needs"):
            absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, kernel=kernel)
    assert plan(q_latent, q_pe, cache)["kernel"] == "generic"
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE)  # the generic kernel
    assert rel_err(out, paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)) <= 1e-2, why


def test_plan_rejects_bad_overrides():
    from gpu_attention.triton_decode import plan
    cache, kv_b = make_cache([100], heads=16, page_size=64, layout="batch")
    q_latent, q_pe = latent_queries(cache, kv_b, 1, 1, 16)
    with pytest.raises(ValueError, match="kernel must be"):
        plan(q_latent, q_pe, cache, kernel="wgmma")
    if HOPPER:
        with pytest.raises(ValueError, match="v_split must be"):
            plan(q_latent, q_pe, cache, kernel="tma", v_split=2)


@real_gpu
@needs_tma
def test_default_for_128_heads_is_a_tma_kernel_and_decodes_128k():
    from gpu_attention.triton_decode import absorbed_decode, plan
    n = 131072 + 77
    cache, kv_b = make_cache([n], heads=128, page_size=64, layout="batch")
    q_latent, q_pe = latent_queries(cache, kv_b, 1, 1, 128)
    # the last key aligned with head 5's query dominates its softmax: the last (partial) tile counts
    key = torch.zeros(RANK + ROPE, device=DEVICE)
    key[:RANK] = q_latent[0, 0, 5].float() / q_latent[0, 0, 5].float().norm() * 60
    cache.store(1, 0, n - 1, key[None].to(BF16))
    assert plan(q_latent, q_pe, cache)["kernel"] in ("tma", "tma_keys")
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE)
    ref = paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)
    assert rel_err(out, ref) <= 1e-2
    assert rel_err(out[0, 0, 5], key[:RANK]) <= 0.05
    generic = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, kernel="generic")
    assert rel_err(out, generic) <= 1e-2
