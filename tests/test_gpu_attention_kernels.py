"""Triton MLA kernels against the plain-torch paged path and mla_torch (GPU machine).

Skipped without CUDA. With Triton installed and TRITON_INTERPRET=1 the same tests run on CPU
tensors through Triton's interpreter (slow; the 128K and model cases need a real GPU).
"""

import math
import os

import pytest
import torch

from gpu_attention import paged_torch
from gpu_attention.attention import mla_attention
from gpu_attention.latent_cache import LatentCache
from gpu_attention.mla_torch import absorb_weights, mla_absorbed

from .conftest import rel_err

pytestmark = pytest.mark.gpu

RANK, ROPE, NOPE, VD = 512, 64, 128, 128
SCALE = (NOPE + ROPE) ** -0.5


def _device():
    if torch.cuda.is_available():
        return "cuda"
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


DEVICE = _device()
if DEVICE is None:
    pytest.skip("needs CUDA (or Triton with TRITON_INTERPRET=1)", allow_module_level=True)
real_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the Triton interpreter")
# Triton 3.9's interpreter multiplies bf16 tiles as raw bits; it checks the kernels' logic in fp32
BF16 = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def make_cache(lens, *, heads, page_size, layout, dtype=BF16, seed=0):
    """A filled cache of len(lens) sequences: 'batch' = for_batch's in-order pages, 'fragmented' =
    pages interleaved between sequences by growing them in turns."""
    D = RANK + ROPE
    compute = torch.float32 if dtype == torch.float32 else BF16
    if layout == "batch":
        cache = LatentCache.for_batch(num_layers=2, latent_dim=D, batch=len(lens), max_len=max(lens),
                                      page_size=page_size, dtype=dtype, compute_dtype=compute, device=DEVICE)
    else:
        pages = sum(math.ceil(n / page_size) for n in lens)
        cache = LatentCache(num_layers=2, latent_dim=D, num_pages=pages, max_seqs=len(lens),
                            max_pages_per_seq=math.ceil(max(lens) / page_size), page_size=page_size, dtype=dtype,
                            compute_dtype=compute, device=DEVICE)
        for grow in (0.3, 0.6):
            cache.set_lengths([math.ceil(n * grow) for n in lens])
    cache.set_lengths(lens)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for s, n in enumerate(lens):
        x = torch.randn(n, D, generator=gen, device=DEVICE)
        x[:, RANK:] *= 0.5
        cache.store(1, s, 0, x.to(compute))
    kv_b = (torch.randn(heads * (NOPE + VD), RANK, generator=gen, device=DEVICE) * RANK**-0.5).to(compute)
    return cache, kv_b


def make_queries(B, T, heads, dtype, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, T, heads, NOPE + ROPE, generator=gen, device=DEVICE).to(dtype)
    return q[..., :NOPE], q[..., NOPE:]  # strided views, as the model passes them


CASES = [  # heads, lengths (ragged, not page multiples), new tokens, page size, layout, splits
    (16, [1000], 1, 64, "batch", None),
    (16, [37, 300, 129], 1, 16, "fragmented", None),
    (16, [517, 64], 4, 64, "fragmented", 3),
    (128, [700], 1, 64, "batch", None),
    (128, [91, 260], 2, 32, "fragmented", 1),
    (128, [2000, 1], 1, 64, "fragmented", 7),
]


@pytest.mark.parametrize("kernel", [None, "generic"])  # None: the default (a TMA kernel on Hopper, bf16, 64-key pages)
@pytest.mark.parametrize("heads,lens,num_new,page_size,layout,splits", CASES)
def test_absorbed_kernel_matches_torch_path(heads, lens, num_new, page_size, layout, splits, kernel):
    from gpu_attention.triton_decode import absorbed_decode
    cache, kv_b = make_cache(lens, heads=heads, page_size=page_size, layout=layout)
    q_nope, q_pe = make_queries(len(lens), num_new, heads, BF16)
    w_uk, _ = absorb_weights(kv_b, num_heads=heads, qk_nope_head_dim=NOPE, v_head_dim=VD)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, num_splits=splits, kernel=kernel)
    ref = paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)
    assert rel_err(out, ref) <= 1e-2
    if len(set(lens)) == 1:  # and the foundation's reference on the contiguous latent
        ref0 = mla_absorbed(q_nope, q_pe, cache.prefix(1, len(lens)), kv_b, kv_lora_rank=RANK, v_head_dim=VD,
                            scale=SCALE)
        got = torch.einsum("bthr,hvr->bthv", out, absorb_weights(kv_b, num_heads=heads, qk_nope_head_dim=NOPE,
                                                                 v_head_dim=VD)[1])
        assert rel_err(got, ref0) <= 2e-2


@pytest.mark.parametrize("page_size,block_n,splits,v_split", [
    (64, 16, 40, 1),  # tiles inside pages (one page id per tile); 40 splits: the combine's chunk loop with a tail
    (16, 32, None, 1),  # pages smaller than a tile: page id per key; the split count from the SM count
    (48, 32, 3, 2),  # pages not a multiple of the tile: per-key ids, tiles crossing pages; value halves
    (64, 16, 1, 2),  # value halves written directly (one split)
])
def test_absorbed_kernel_page_addressing_and_splits(page_size, block_n, splits, v_split):
    from gpu_attention.triton_decode import absorbed_decode
    lens = [700, 45]  # the short sequence leaves most splits empty
    cache, kv_b = make_cache(lens, heads=16, page_size=page_size, layout="fragmented", dtype=torch.float32)
    q_nope, q_pe = make_queries(2, 1, 16, torch.float32)
    w_uk, _ = absorb_weights(kv_b, num_heads=16, qk_nope_head_dim=NOPE, v_head_dim=VD)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, num_splits=splits, block_n=block_n, v_split=v_split,
                          kernel="generic")
    assert rel_err(out, paged_torch.absorbed(q_latent, q_pe, cache, 1, scale=SCALE)) <= 1e-5


def test_split_count_fills_the_gpu():
    from gpu_attention.triton_decode import choose_splits
    # batch 1, 16 heads (one program per split): two waves on 132 SMs once the context allows it
    assert choose_splits(32768, 1, 132, block_n=64, waves=2, min_split=128) == 256  # 264 wanted; 128 keys at least
    assert choose_splits(8192, 1, 132, block_n=64, waves=2, min_split=128) == 64  # no split under 128 keys
    assert choose_splits(100, 1, 132, block_n=64, waves=2, min_split=128) == 1
    assert choose_splits(131072, 2 * 16, 132, block_n=64, waves=4, min_split=128) == 17  # 128 heads x batch 16


def test_absorbed_kernel_fp32_is_exact():
    cache, kv_b = make_cache([333, 70], heads=16, page_size=16, layout="fragmented", dtype=torch.float32)
    q_nope, q_pe = make_queries(2, 3, 16, torch.float32)
    for splits in (1, 5):
        out = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form="absorbed",
                            backend="triton")
        ref = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form="absorbed", backend="torch")
        assert rel_err(out, ref) <= 1e-5, splits


def test_absorbed_kernel_fp8_cache():
    from gpu_attention.triton_decode import absorbed_decode
    lens = [300, 77]
    cache, kv_b = make_cache(lens, heads=16, page_size=64, layout="fragmented", dtype=torch.float8_e4m3fn)
    exact, _ = make_cache(lens, heads=16, page_size=64, layout="fragmented")
    q_nope, q_pe = make_queries(2, 1, 16, BF16)
    w_uk, _ = absorb_weights(kv_b, num_heads=16, qk_nope_head_dim=NOPE, v_head_dim=VD)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    for v_split in (1, 2):
        out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE, num_splits=2, v_split=v_split)
        assert rel_err(out, paged_torch.absorbed(q_latent, q_pe, cache, 1, scale=SCALE)) <= 1e-2  # same fp8 data
        assert rel_err(out, paged_torch.absorbed(q_latent, q_pe, exact, 1, scale=SCALE)) <= 6e-2  # fp8 error bound


@pytest.mark.parametrize("heads,lens,num_new,budget", [
    (16, [300], 300, 1 << 30),  # a fresh prompt, one chunk
    (16, [1000, 700], 200, 1 << 20),  # a prefix in chunks of 64 keys... merged in the kernel
    (128, [513], 100, 1 << 30),
    (128, [600, 450], 37, 4 << 20),
])
def test_decompressed_kernel_matches_torch_path(heads, lens, num_new, budget):
    cache, kv_b = make_cache(lens, heads=heads, page_size=64, layout="fragmented")
    q_nope, q_pe = make_queries(len(lens), num_new, heads, BF16)
    out = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form="decompressed",
                        backend="triton", budget=budget)
    ref = mla_attention(q_nope.float(), q_pe.float(), cache, 1, kv_b.float(), v_head_dim=VD, scale=SCALE,
                        form="decompressed", backend="torch")
    assert rel_err(out, ref) <= 2e-2
    absorbed = mla_attention(q_nope, q_pe, cache, 1, kv_b, v_head_dim=VD, scale=SCALE, form="absorbed",
                             backend="triton")
    assert rel_err(absorbed, ref) <= 2e-2  # both forms, one computation


@real_gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_128k_context_decode(heads):
    from gpu_attention.triton_decode import absorbed_decode
    n = 131072 + 77
    cache, kv_b = make_cache([n], heads=heads, page_size=64, layout="batch")
    q_nope, q_pe = make_queries(1, 1, heads, BF16)
    w_uk, _ = absorb_weights(kv_b, num_heads=heads, qk_nope_head_dim=NOPE, v_head_dim=VD)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    # the last key aligned with head 0's query dominates its softmax: the last split must be read and merged
    key = torch.zeros(RANK + ROPE, device=DEVICE)
    key[:RANK] = q_latent[0, 0, 0].float() / q_latent[0, 0, 0].float().norm() * 60
    cache.store(1, 0, n - 1, key[None].to(BF16))
    out = absorbed_decode(q_latent, q_pe, cache, 1, scale=SCALE)
    ref = paged_torch.absorbed(q_latent.float(), q_pe.float(), cache, 1, scale=SCALE)
    assert rel_err(out, ref) <= 1e-2
    assert rel_err(out[0, 0, 0], key[:RANK]) <= 0.05


@real_gpu
@pytest.mark.parametrize("fixture", ["hf_v3", "hf_v2"])
def test_model_on_gpu_matches_cpu(fixture, request):
    from runtime.loader import load_model
    _, path = request.getfixturevalue(fixture)
    ids = torch.randint(2, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    cpu = load_model(path, dtype="float32")
    gpu = load_model(path, dtype="float32", device="cuda")
    for form in ("absorbed", "decompressed"):
        ref = cpu(ids, cache=cpu.new_cache(batch=1, max_len=64), form=form)
        cache = gpu.new_cache(batch=1, max_len=64)
        got = torch.cat([gpu(ids[:, :30].cuda(), cache=cache, form=form),
                         gpu(ids[:, 30:].cuda(), cache=cache, start_pos=30, form=form)], dim=1)
        assert rel_err(got.cpu(), ref) <= 1e-4, form
