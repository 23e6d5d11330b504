"""The one-kernel RMSNorm (runtime.fused) against the torch form, on a GPU."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _torch_norm(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [100, 512, 1536, 2048, 7168])
def test_fused_rms_norm_matches_the_torch_form(dtype, dim):
    from runtime.fused import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(dim)
    x = torch.randn(3, 5, dim, device="cuda", generator=gen).to(dtype) * 3
    weight = (1 + 0.1 * torch.randn(dim, device="cuda", generator=gen)).to(dtype)
    got, want = rms_norm(x, weight, 1e-6), _torch_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    # the sum's order differs from torch's reduction: fp32 within rounding; bf16 within one bf16 step
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got, want, **tol)


def test_fused_rms_norm_reads_strided_rows():
    """c_kv is a split view of [c_kv | k_pe]: rows 576 apart, 512 wide."""
    from runtime.fused import rms_norm

    latent = torch.randn(2, 7, 576, device="cuda")
    c_kv = latent.split([512, 64], dim=-1)[0]
    weight = torch.rand(512, device="cuda") + 0.5
    torch.testing.assert_close(rms_norm(c_kv, weight, 1e-6), _torch_norm(c_kv, weight, 1e-6), rtol=1e-5, atol=1e-5)


def test_the_model_uses_it_on_a_gpu(tiny_v3):
    from runtime.loader import load_model
    from runtime.model import RMSNorm

    from torch.profiler import ProfilerActivity, profile

    model = load_model(tiny_v3, dtype="float32")
    x = torch.randn(2, 3, model.cfg.hidden_size)
    cpu = model.model.norm(x)
    model.to("cuda")
    x = x.cuda()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gpu = model.model.norm(x)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert isinstance(model.model.norm, RMSNorm) and kernels == ["_rms_norm_kernel"]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_the_torch_form(interleave, dtype, monkeypatch):
    """q_pe as the model has it: the rope part of a [B, T, H, nope + rope] view, positions 5-7."""
    from runtime import rope as rope_module
    from runtime.config import RopeConfig
    from runtime.fused import rope

    tables = rope_module.RotaryTables(RopeConfig(type="default", theta=10000.0), 64, interleave=interleave)
    cos, sin = tables.cos_sin(5, 3, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 3, 4, 192, device="cuda", generator=gen).to(dtype)
    q_pe = q.split([128, 64], dim=-1)[1]
    got = rope(q_pe, cos, sin, interleave)
    assert torch.equal(tables.apply(q_pe, cos, sin), got)  # the model's call takes the kernel on a GPU
    monkeypatch.setattr(rope_module, "_fused_on", lambda x: False)
    want = tables.apply(q_pe, cos, sin)  # the torch form, as on the CPU
    assert got.dtype == dtype and got.shape == q_pe.shape and got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [100, 2048, 7168])
def test_add_then_norm_in_one_kernel_matches_the_two_torch_ops(dtype, dim):
    from runtime.fused import add_rms_norm

    gen = torch.Generator(device="cuda").manual_seed(dim)
    h, delta = (torch.randn(2, 3, dim, device="cuda", generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(dim, device="cuda", generator=gen)).to(dtype)
    total, normed = add_rms_norm(h, (delta,), weight, 1e-6)
    assert torch.equal(total, h + delta)  # the residual stream rounds exactly as torch's add
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(normed, _torch_norm(h + delta, weight, 1e-6), **tol)
    routed = torch.randn(2, 3, dim, device="cuda", generator=gen)  # MoE.forward_parts' pair: fp32 + shared
    total, normed = add_rms_norm(h, (routed, delta), weight, 1e-6)
    want = h + delta.clone().add_(routed)
    assert torch.equal(total, want)
    torch.testing.assert_close(normed, _torch_norm(want, weight, 1e-6), **tol)


def _router(E, k, method, scoring, groups, topk_group, norm, scaling):
    from types import SimpleNamespace

    from runtime.moe import Router

    cfg = SimpleNamespace(num_experts_per_tok=k, n_group=groups, topk_group=topk_group, topk_method=method,
                          scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=scaling,
                          n_routed_experts=E, hidden_size=64)
    router = Router(cfg).cuda()
    gen = torch.Generator(device="cuda").manual_seed(E)
    router.weight.data = torch.randn(E, 64, device="cuda", generator=gen)
    if method == "noaux_tc":
        router.e_score_correction_bias = 0.1 * torch.randn(E, device="cuda", generator=gen)
    return router


ROUTERS = {  # V2-Lite, V2 (160 experts in 8 groups), V3, and a tiny V3
    "greedy": (64, 6, "greedy", "softmax", 1, 1, False, 1.0),
    "group_limited": (160, 6, "group_limited_greedy", "softmax", 8, 3, False, 16.0),
    "noaux_tc": (256, 8, "noaux_tc", "sigmoid", 8, 4, True, 2.5),
    "noaux_tc_tiny": (16, 4, "noaux_tc", "sigmoid", 4, 2, True, 1.0),
}


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("kind", list(ROUTERS))
def test_route_kernel_chooses_the_torch_routers_experts(kind, tokens):
    """The same experts with the same weights (the kernel gives them best first, torch in no set order)."""
    router = _router(*ROUTERS[kind])
    x = torch.randn(tokens, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(tokens))
    weights, ids = router(x)  # on a GPU: the kernel
    want_w, want_ids = router._choose(torch.nn.functional.linear(x, router.weight))
    got, want = ids.sort(dim=1), want_ids.sort(dim=1)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(got.values, want.values)
    torch.testing.assert_close(weights.gather(1, got.indices), want_w.gather(1, want.indices), rtol=1e-5, atol=1e-7)
    assert (weights[:, :-1] >= weights[:, 1:]).all() or ROUTERS[kind][6]  # best first (before renormalising)
    out = (torch.empty_like(weights), torch.empty_like(ids))
    assert router(x, out=out)[0] is out[0] and torch.equal(out[1], ids)  # written into given buffers


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_latent_store_in_one_kernel_writes_what_the_unfused_ops_write(interleave, dtype):
    """norm(c_kv) | rope(k_pe) into page slots that are not in order, a cache of 2 sequences x 3 new tokens."""
    from gpu_attention.latent_cache import LatentCache
    from runtime.config import RopeConfig
    from runtime.fused import rms_norm, rope, store_latent
    from runtime.rope import RotaryTables

    tables = RotaryTables(RopeConfig(type="default", theta=10000.0), 64, interleave=interleave)
    cos, sin = tables.cos_sin(17, 3, "cuda")
    cache = LatentCache.for_batch(num_layers=2, latent_dim=576, batch=2, max_len=64, page_size=16, dtype=dtype,
                                  compute_dtype=dtype, device="cuda")
    cache.prepare(17, 3, 2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    kv = torch.randn(2, 3, 576, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(512, device="cuda", generator=gen)).to(dtype)
    dest, slots = cache.write_target(1, 17, 2, 3)
    store_latent(kv, weight, 1e-6, cos, sin, interleave, slots, dest)
    c_kv, k_pe = kv.split([512, 64], dim=-1)
    want = torch.cat([rms_norm(c_kv, weight, 1e-6), rope(k_pe[:, :, None], cos, sin, interleave)[:, :, 0]], dim=-1)
    torch.testing.assert_close(cache.read(1, 2, 17, 20), want, rtol=0, atol=0)
    assert cache.read(0, 2, 17, 20).abs().sum() == 0  # other layers untouched


def test_a_moe_layer_hands_its_inputs_to_the_cpu_in_one_copy(tiny_v3):
    """Router kernel and hidden state written into the packed device buffer: one device-to-host copy
    per MoE layer (three before), and the same output as the separate copies give."""
    from torch.profiler import ProfilerActivity, profile

    from orchestrator.hybrid import attach
    from runtime.loader import load_model

    model = load_model(tiny_v3, dtype="float32")
    model.to("cuda")
    attach(model, max_tokens=8, fmt="q8_0", threads=2, handover="hostfunc")
    moe = model.model.layers[1].mlp
    x = torch.randn(1, 3, model.cfg.hidden_size, device="cuda")
    moe(x)  # first call binds the jobs
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = moe(x)
        torch.cuda.synchronize()
    copies = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "DtoH" in e.name]
    assert len(copies) == 1
    weights, ids = moe.gate(x.view(3, -1))
    want = moe.experts.forward(x.view(3, -1).float(), ids, weights) + moe.shared_experts(x.view(3, -1))
    torch.testing.assert_close(got.view(3, -1), want, rtol=1e-5, atol=1e-5)
    routed, shared = moe.forward_parts(x)  # the decoder layer's call: the sum left to the next norm
    assert routed.dtype == torch.float32 and torch.equal(shared + routed, got)


@pytest.mark.parametrize("experts, hidden, dtype", [(64, 2048, torch.bfloat16), (256, 7168, torch.bfloat16),
                                                    (16, 100, torch.float32)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_router_logits_kernel_is_the_fp32_product_and_hands_on_the_fp32_hidden_state(experts, hidden, dtype, tokens):
    from runtime.fused import router_logits

    gen = torch.Generator(device="cuda").manual_seed(experts + tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(experts, hidden, device="cuda", generator=gen).to(dtype)
    x_out = torch.empty(tokens, hidden, device="cuda")
    logits = router_logits(x, weight, x_out)
    assert torch.equal(x_out, x.float())
    want = torch.nn.functional.linear(x.float(), weight.float())
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * hidden ** 0.5)
