"""fp8 weights (DeepSeek-V3's e4m3 + 128x128 block scales) in the torch-module ops: FP8Linear against
the dequantized fp32 linear, checkpoints loaded as stored or quantized at load, plan bytes equal to
allocated bytes, assembly refusing fp8 where it has no linears; on a GPU the Triton kernels."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from placement.assemble import AssemblyError, allocated_bytes
from placement.inventory import detect, hypothetical
from placement.plan import build_plan
from placement.schema import parse_rules
from runtime.config import load_config
from runtime.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from runtime.fp8_linear import FP8Linear
from runtime.loader import load_model
from runtime.make_model import write_model
from tests.conftest import prompt, rel_err

MACHINE = hypothetical([], 8)
IDS = torch.tensor([[0, 17, 230, 5, 99, 4, 512, 8]])
FP8_RULES = ("name: fp8\nrules:\n"
             "  - {match: 'model\\.layers\\.\\d+\\.(self_attn|mlp|mlp\\.shared_experts)', device: DEV, quant: fp8}\n"
             "  - {match: '.*', device: DEV, dtype: fp32}\n")
FP8_UNITS = ("self_attn", "mlp", "shared_experts")


def fp8_linear(out_features, in_features, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, s = quantize_fp8_blocks(torch.randn(out_features, in_features, generator=gen) * in_features**-0.5)
    layer = FP8Linear(in_features, out_features)
    layer.weight.copy_(q)
    layer.weight_scale_inv.copy_(s)
    return layer, dequantize_fp8_blocks(q, s)


@pytest.mark.parametrize("shape", [(576, 300), (130, 256), (40, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_forward_is_the_dequantized_fp32_linear(shape, dtype):
    layer, w = fp8_linear(*shape)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, shape[0])
    assert torch.equal(y, F.linear(x.float(), w).to(dtype))


def load_fp8(path, device="cpu"):
    rules = parse_rules(FP8_RULES.replace("DEV", device), "fp8.yaml", MACHINE if device == "cpu" else detect())
    plan = build_plan(rules, load_config(path), ctx=64)
    return load_model(path, plan=plan), plan


def logits(model, ids=IDS):
    return model(ids.to(model.lm_head.weight.device), cache=model.new_cache(batch=1, max_len=ids.shape[1])).cpu()


@pytest.fixture(scope="module")
def tiny_v3_fp8(tmp_path_factory):
    """make_model's fp8 checkpoint: e4m3 projections with weight_scale_inv, as DeepSeek ships V3."""
    return write_model(tmp_path_factory.mktemp("tiny_v3_fp8"), "tiny-v3", dtype="fp8", seed=0, progress=False)


def test_fp8_checkpoint_goes_in_as_stored_with_the_planned_bytes(tiny_v3_fp8):
    model, plan = load_fp8(tiny_v3_fp8)
    assert allocated_bytes(model) == {"cpu": plan.total_weight_bytes}
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.kv_a_proj_with_mqa, FP8Linear) and isinstance(model.model.layers[1].mlp.shared_experts.down_proj, FP8Linear)
    assert attn.q_a_layernorm.weight.dtype == torch.bfloat16  # norms in the compute dtype (bf16 for fp8 checkpoints)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # routers are not fp8
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    file = next(tiny_v3_fp8.glob("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        stored, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    assert torch.equal(attn.kv_a_proj_with_mqa.weight.view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(attn.kv_a_proj_with_mqa.weight_scale_inv, scale)


def test_fp8_checkpoint_logits_match_the_dequantized_reference(tiny_v3_fp8):
    model, _ = load_fp8(tiny_v3_fp8)
    reference = load_model(tiny_v3_fp8, dtype="float32")
    reference.cache_options = model.cache_options  # the plan's bf16 latent cache
    assert rel_err(logits(model), logits(reference)) < 1e-5


def test_fp32_checkpoint_is_quantized_at_load(tiny_v3):
    model, plan = load_fp8(tiny_v3)
    assert allocated_bytes(model) == {"cpu": plan.total_weight_bytes}
    reference = load_model(tiny_v3, dtype="float32")
    reference.cache_options = model.cache_options  # the plan's bf16 latent cache
    got, exact = logits(model), logits(reference)
    # the reference with every fp8 weight rounded the same way gives the same logits ...
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.dim() == 2 and any(f".{unit}." in name for unit in FP8_UNITS) and not any(
                    other in name for other in ("mlp.gate.", "mlp.experts.")):
                p.copy_(dequantize_fp8_blocks(*quantize_fp8_blocks(p)))
    assert rel_err(got, logits(reference)) < 1e-5
    # ... and the unrounded one differs by fp8's error (3 mantissa bits through 3 random layers)
    assert 0.01 < rel_err(got, exact) < 0.25


def test_fp8_on_a_module_without_linears_is_refused_before_loading(tiny_v3):
    rules = parse_rules("name: x\nrules:\n  - {match: 'model\\.layers\\.\\d+\\.mlp\\.gate', quant: fp8}\n"
                        "  - {match: '.*', dtype: fp32}\n", "x.yaml", MACHINE)
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    with pytest.raises(AssemblyError, match=r"x.yaml: rule 1 \(line 3\) places model.layers.1.mlp.gate with fp8 for a "
                                            r"gate module \(fp8 runs the linears of attention, mlp, shared_experts\)"):
        load_model(tiny_v3, plan=plan)


def test_mismatched_scale_shape_is_one_clear_error(tmp_path, tiny_v3_fp8):
    import shutil

    from safetensors.torch import load_file, save_file

    from runtime.errors import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_v3_fp8, bad)
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    file = next(f for f in bad.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(file)
    tensors[name] = torch.ones(2, 2)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_a_proj.weight_scale_inv' has shape "
                                              r"\[2, 2\], its weight \[48, 64\] in 128x128 blocks needs \[1, 1\]"):
        load_fp8(bad)


# ---- GPU: the Triton kernels and the model on cuda --------------------------------------------------

def emulated_act_quant(x):
    """act_quant's math in torch: per 128 values of a row, scale = amax / 448, x / scale rounded to e4m3."""
    M, K = x.shape
    pad = torch.zeros(M, -(-K // 128) * 128, device=x.device)
    pad[:, :K] = x.float()
    groups = pad.view(M, -1, 128)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / 448.0
    q = (groups / scale[..., None]).to(torch.float8_e4m3fn)
    return (q.float() * scale[..., None]).view(M, -1)[:, :K]


# V3's kv_a_proj (576 rows), ragged shapes (rows and K not multiples of 128 or 16), and one wide enough
# (133 column tiles) that few rows take the GEMM on an H100
GEMM_SHAPES = [(576, 7168), (130, 200), (40, 64), (17000, 256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 3, 16, 77, 300])
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_triton_fp8_linear_matches_torch(shape, M):
    from runtime import fp8_kernels

    layer, w = fp8_linear(*shape)
    layer, w = layer.cuda(), w.cuda()
    x = torch.randn(M, shape[1], generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (M, shape[0])
    exact = x.float() @ w.T
    gemm = fp8_kernels.fp8_gemm(x, layer.weight, layer.weight_scale_inv, out_dtype=torch.float32)
    assert rel_err(gemm, emulated_act_quant(x) @ w.T) < 1e-3  # a rare e4m3 rounding tie may differ
    assert rel_err(gemm, exact) < 0.08  # what e4m3 activations cost
    if M <= fp8_kernels.DECODE_MAX_ROWS:  # bf16 activations times the widened fp8 tile: exact products
        decode = fp8_kernels.fp8_decode(x, layer.weight, layer.weight_scale_inv, out_dtype=torch.float32)
        assert rel_err(decode, exact) < 1e-5
    if fp8_kernels.takes_decode_kernel(M, shape[0], x.device):
        assert rel_err(y, exact) < 0.01  # the bf16 output's rounding
    else:
        assert rel_err(y, emulated_act_quant(x) @ w.T) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_weight_dequant_is_exact():
    from runtime.fp8_kernels import weight_dequant

    layer, w = fp8_linear(32768, 512)
    got = weight_dequant(layer.weight.cuda(), layer.weight_scale_inv.cuda(), dtype=torch.float32)
    assert torch.equal(got.cpu(), w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_model_on_cuda_matches_the_cuda_bf16_reference(tiny_v3_fp8):
    rules = parse_rules(FP8_RULES.replace("DEV", "cuda:0").replace("fp32", "bf16"), "fp8.yaml", detect())
    plan = build_plan(rules, load_config(tiny_v3_fp8), ctx=64)
    model = load_model(tiny_v3_fp8, plan=plan)
    assert allocated_bytes(model) == {"cuda:0": plan.total_weight_bytes}
    assert isinstance(model.model.layers[1].self_attn.q_b_proj, FP8Linear) and model.lm_head.weight.is_cuda
    reference = load_model(tiny_v3_fp8, dtype="bfloat16", device="cuda:0")  # the fp8 weights dequantized to bf16
    for n in (1, 8, 40):  # up to 16 rows: the decode kernel (bf16 activations); 40: the fp8 GEMM
        ids = prompt(n, seed=n, vocab=1024)
        err = rel_err(logits(model, ids), logits(reference, ids))
        print(f"fp8 model on cuda vs the bf16 reference, {n} tokens: rel err {err:.4f}")
        # e4m3 activations cost ~0.11 in this tiny random model (measured on the CPU, act_quant emulated)
        assert err < (0.05 if n <= 16 else 0.25)


@pytest.mark.parametrize("name", ["deepseek-v3-1gpu", "deepseek-v3-gpu-experts"])
def test_shipped_v3_rules_run_attention_and_mlps_in_fp8(name):
    from placement.assemble import check_runnable
    from placement.defaults import open_rules
    from runtime.config import config_from_dict
    from runtime.make_model import preset_config

    plan = build_plan(open_rules(name, hypothetical([80], 512)), config_from_dict(preset_config("v3")), ctx=4096)
    assert {p.format for p in plan.placements if p.unit.kind in ("attention", "mlp", "shared_experts")} == {"fp8"}
    check_runnable(plan)


def test_explain_names_the_cpu_fp8_fallback_as_slow(tiny_v3):
    from placement.explain import render
    from placement.preflight import fits

    plan = build_plan(parse_rules(FP8_RULES.replace("DEV", "cpu"), "fp8.yaml", MACHINE), load_config(tiny_v3), ctx=64)
    text = render(plan, fits(plan, MACHINE), "tiny")
    assert "slow fallback: torch on cpu (fp8): fp8 weights dequantized to fp32 on every call" in text
    assert "not in the runtime yet" not in text


def test_v32_fp8_checkpoint_with_its_indexer_in_fp8(tmp_path):
    """V3.2: the indexer's linears become FP8Linear too (weights_proj is read through dense_weight);
    past index_topk (sparse attention decides) the fp8 model is as close to fp32 as the bf16 one."""
    path = write_model(tmp_path, "tiny-v32", dtype="fp8", seed=0, progress=False)
    rules = parse_rules(FP8_RULES.replace("DEV", "cpu").replace("fp32", "bf16"), "fp8.yaml", MACHINE)
    plan = build_plan(rules, load_config(path), ctx=128)
    model = load_model(path, plan=plan)
    assert allocated_bytes(model) == {"cpu": plan.total_weight_bytes}
    assert isinstance(model.model.layers[0].self_attn.indexer.weights_proj, FP8Linear)
    ids = prompt(80, seed=3, vocab=1024)  # index_topk is 64
    exact = logits(load_model(path, dtype="float32"), ids)
    assert rel_err(logits(model, ids), exact) < 1.5 * rel_err(logits(load_model(path, dtype="bfloat16"), ids), exact)
