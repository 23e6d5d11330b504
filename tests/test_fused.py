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
