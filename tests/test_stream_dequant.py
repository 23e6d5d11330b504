"""GPU dequantize of the repacked expert layout (orchestrator/gpu_dequant.py) against
cpu_experts.formats.dequantize of the same GGUF blocks; the same torch code runs on the GPU."""

import numpy as np
import pytest
import torch

from cpu_experts.formats import dequantize, quantize
from cpu_experts.layout import geometry, repack
from orchestrator.gpu_dequant import dequantize_packed

# q6_k and q4_k's f16 form store d*sc (and -dmin*m) as f16, relative error <= 2^-11 per scale; q4_k's
# super-block form keeps GGUF's factors, exact like the rest
TOL = {"bf16": 0.0, "q8_0": 0.0, "q4_0": 0.0, "q4_k": 0.0, "q4_k-f16": 2e-3, "q6_k": 2e-3}
FORMS = list(TOL)


def _geometry(form, vector_bytes, vnni):
    """'q4_k-f16' = q4_k with its factors as f16 per 32 weights (the layout before session 9)."""
    fmt = form.split("-")[0]
    return fmt, geometry(fmt, vector_bytes, vnni, superblock=not form.endswith("-f16"))


def _packed(fmt, geo, w):
    """Experts [E, n, k] fp32 -> GGUF blocks, and the stacked repacked streams as torch uint8 [E, bytes]."""
    E, n, k = w.shape
    blocks = quantize(w, fmt)
    parts = [repack(blocks[e], fmt, n, k, geo) for e in range(E)]
    stack = {name: torch.from_numpy(np.stack([p[name].view(np.uint8) for p in parts])) for name in parts[0]}
    return blocks, stack


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vector_bytes,vnni", [(64, False), (64, True), (32, False)])
def test_dequantize_packed_matches_the_format(form, vector_bytes, vnni):
    rng = np.random.default_rng(0)
    E, n, k = 3, 32, 512
    w = rng.standard_normal((E, n, k)).astype(np.float32)
    fmt, geo = _geometry(form, vector_bytes, vnni)
    blocks, packed = _packed(fmt, geo, w)
    want = torch.from_numpy(dequantize(blocks, fmt))
    got = dequantize_packed(packed["payload"], packed.get("scale"), packed.get("bias"), geo=geo, n=n, k=k,
                            dtype=torch.float32)
    assert got.shape == (E, n, k)
    err = (got - want).abs().max().item()
    assert err <= TOL[form] * want.abs().max().item(), (form, err)
    if TOL[form] == 0.0:
        assert torch.equal(got, want)


def test_bf16_output_is_the_rounded_fp32_result():
    geo = geometry("q4_0", 64, True)
    w = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)
    blocks, packed = _packed("q4_0", geo, w)
    got = dequantize_packed(packed["payload"], packed["scale"], None, geo=geo, n=16, k=64)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(dequantize(blocks, "q4_0")).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
def test_dequantize_packed_on_the_gpu_equals_the_cpu(form):
    fmt, geo = _geometry(form, 64, True)
    w = np.random.default_rng(2).standard_normal((2, 32, 256)).astype(np.float32)
    _, packed = _packed(fmt, geo, w)
    args = dict(geo=geo, n=32, k=256, dtype=torch.float32)
    cpu = dequantize_packed(packed["payload"], packed.get("scale"), packed.get("bias"), **args)
    gpu = dequantize_packed(*(packed.get(p).cuda() if p in packed else None for p in ("payload", "scale", "bias")),
                            **args)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", [f for f in FORMS if f != "bf16"])
@pytest.mark.parametrize("vnni", [False, True])
def test_triton_kernel_equals_the_torch_ops(form, vnni):
    pytest.importorskip("triton")
    from orchestrator import triton_dequant

    fmt, geo = _geometry(form, 64, vnni)
    w = np.random.default_rng(3).standard_normal((3, 48, 512)).astype(np.float32)
    _, packed = _packed(fmt, geo, w)
    parts = [packed.get(p).cuda()[1:] if p in packed else None for p in ("payload", "scale", "bias")]  # a chunk
    for dtype in (torch.float32, torch.bfloat16):
        want = dequantize_packed(*parts, geo=geo, n=48, k=512, dtype=dtype)
        got = triton_dequant.dequantize_packed(*parts, geo=geo, n=48, k=512, dtype=dtype)
        assert got.dtype == dtype and got.shape == (2, 48, 512)
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)
