"""The torch quantizers give formats.quantize's bytes, on CPU torch and (gpu) on CUDA; from_tensors
packs the same bytes whichever quantizer ran."""
import numpy as np
import pytest
import torch

from cpu_experts import formats
from cpu_experts.experts import CPUExperts
from cpu_experts.formats_torch import quant_device, quantize_torch

# numpy warns on the overflowing rows of hard_weights (the point of them)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FORMATS = ["bf16", "q8_0", "q4_0", "q4_k", "q6_k"]


def hard_weights(seed=0, rows=40, cols=512):
    """Normal weights at several scales, and the rows that break naive ports."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * rng.choice([1e-3, 0.02, 1.0, 1e3], (rows, 1))
    x[1] = 0.0                              # all-zero blocks
    x[2] = 0.75                             # constant blocks
    x[3, 5] = 4e4                           # one huge outlier
    x[4] = 1e-20 * np.sign(x[4])            # tiny values, mixed signs
    x[5] = -0.0                             # negative zeros
    x[6, ::3], x[6, 1::3] = -0.0, 0.0       # signed zeros among values
    x[7], x[8] = np.abs(x[7]), -np.abs(x[8])  # one sign only
    x[9] = np.round(x[9] * 4) / 4           # many ties: rounding half to even matters
    x[10, 7], x[10, -7] = 1e30, -1e30     # quotients past int32: numpy's cast makes INT32_MIN
    x[11, 3], x[11, 4] = 3e38, -3e38        # the range overflows to inf
    x[12] *= 1e-38                          # subnormal scales
    x[13] = 1e-45                           # the smallest subnormal
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_match_numpy_on_cpu(fmt, seed):
    x = hard_weights(seed)
    want = formats.quantize(x, fmt)
    got = quantize_torch(torch.from_numpy(x), fmt)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q4_0", "q8_0"])
@pytest.mark.parametrize("blocks", [1, 7])
def test_chunks_that_cut_the_matrix_unevenly(fmt, blocks):
    # 40 rows x 2 blocks = 80 blocks in chunks of 7 blocks (the last holds 3), or one block per chunk:
    # each hard row then meets the search alone (no neighbour decides which code path runs)
    x = hard_weights(2)
    if formats.get_format(fmt).block_elems == 32:
        x = x[:, :256]
    got = quantize_torch(torch.from_numpy(x), fmt, chunk_weights=blocks * formats.get_format(fmt).block_elems)
    np.testing.assert_array_equal(got.numpy(), formats.quantize(x, fmt))


def test_bf16_input_and_leading_dims():
    x = torch.from_numpy(hard_weights(3, 24, 256)).to(torch.bfloat16).reshape(2, 3, 4, 256)
    got = quantize_torch(x, "q4_k")
    assert got.shape == (2, 3, 4, 144)
    np.testing.assert_array_equal(got.numpy(), formats.quantize(x.float().numpy(), "q4_k"))


def test_bad_shape_and_format_errors():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        quantize_torch(torch.zeros(2, 32), "q4_k")
    with pytest.raises(ValueError, match="unknown weight format 'q5_x'"):
        quantize_torch(torch.zeros(2, 32), "q5_x")


def test_quant_device_from_environment(monkeypatch):
    monkeypatch.setenv("HMOE_QUANT_DEVICE", "numpy")
    assert quant_device("q4_k") == "numpy"
    monkeypatch.setenv("HMOE_QUANT_DEVICE", "cpu")
    assert quant_device("q8_0") == "cpu"
    monkeypatch.setenv("HMOE_QUANT_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"HMOE_QUANT_DEVICE='gpu': expected auto, numpy, cpu, cuda or cuda:N"):
        quant_device("q4_k")
    monkeypatch.delenv("HMOE_QUANT_DEVICE")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert quant_device("q4_k") == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_asked_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setenv("HMOE_QUANT_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        quant_device("q4_k")


def _packed(ex):
    out = []
    for mat in (ex.gate, ex.up, ex.down):
        out.append(mat.payload.array(np.uint8, 0, ex.E * mat.pay_e).copy())
        out.append(mat.scale.array(np.uint8, 0, ex.E * mat.sc_e).copy())
        if mat.has_bias:
            out.append(mat.bias.array(np.uint8, 0, ex.E * mat.sc_e).copy())
    return out


@pytest.mark.parametrize("fmt,down_fmt", [("q4_k", "q6_k"), ("q6_k", "q4_0"), ("q8_0", None)])
def test_from_tensors_same_bytes_and_outputs_whichever_quantizer(monkeypatch, fmt, down_fmt):
    rng = np.random.default_rng(4)
    E, H, I = 4, 256, 256
    gate, up, down = (torch.from_numpy((rng.standard_normal(s) * 0.05).astype(np.float32))
                      for s in ((E, I, H), (E, I, H), (E, H, I)))
    hidden = rng.standard_normal((5, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:2] for _ in range(5)])
    wts = rng.uniform(0.1, 1, (5, 2)).astype(np.float32)
    runs = {}
    for where in ("numpy", "cpu"):
        monkeypatch.setenv("HMOE_QUANT_DEVICE", where)
        ex = CPUExperts.from_tensors(gate, up, down, fmt=fmt, down_fmt=down_fmt, threads=1, numa="none")
        runs[where] = _packed(ex), ex.forward(hidden, ids, wts).copy()
        ex.close()
    for a, b in zip(runs["numpy"][0], runs["cpu"][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs["numpy"][1], runs["cpu"][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_match_numpy_on_cuda(fmt):
    for seed in (0, 1, 2):
        x = hard_weights(seed, rows=96)
        want = formats.quantize(x, fmt)
        got = quantize_torch(torch.from_numpy(x), fmt, device="cuda", chunk_weights=13 * 256)
        assert got.device.type == "cpu"
        np.testing.assert_array_equal(got.numpy(), want)
    big = np.random.default_rng(5).standard_normal((64, 1408 * 16)).astype(np.float32)  # a few chunks of 1 M
    want = formats.quantize(big, fmt)
    np.testing.assert_array_equal(quantize_torch(torch.from_numpy(big), fmt, device="cuda",
                                                 chunk_weights=1 << 18).numpy(), want)
