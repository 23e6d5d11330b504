"""GGUF experts with a down format of their own (llama.cpp's Q4_K_M: Q4_K gate/up, Q6_K down in some
layers): the file's blocks reach the kernels byte-identical, the plan counts the right bytes, and
gate != up types are requantized with the one warning line."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from placement import preflight
from placement.explain import render
from placement.inventory import hypothetical
from placement.plan import build_plan
from runtime.config import load_config
from runtime.gguf_convert import gguf_to_hf
from runtime.gguf_weights import GGUFWeights, natural_formats
from runtime.jit_experts import JitExperts, PackedCache
from runtime.loader import load_model
from tests.test_gguf import Q, _spy_blocks, jit_plan, llama_cpp_gguf, logits, models  # noqa: F401 (fixture)


def mixed_plan(path, fmt):
    plan = jit_plan(path, fmt)
    return build_plan(plan.rules, plan.cfg, ctx=32, stored_experts=GGUFWeights(path).stored_formats())


def test_natural_formats_keep_a_down_format_of_their_own():
    assert natural_formats((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256) == ("q4_k", "q6_k")
    assert natural_formats((Q.Q4_0, Q.Q4_0, Q.Q8_0), 64, 32) == ("q4_0", "q8_0")
    assert natural_formats((Q.Q4_K, Q.Q4_K, Q.Q4_K), 256, 256) == ("q4_k", "q4_k")
    assert natural_formats((Q.Q4_K, Q.Q6_K, Q.Q6_K), 256, 256) == ("q6_k", "q6_k")  # gate != up: one format
    assert natural_formats((Q.Q4_K, Q.Q4_K, Q.Q5_K), 256, 256) == ("q6_k", "q6_k")  # down not a kernel format
    assert natural_formats((Q.Q4_K, Q.Q4_K, Q.Q6_K), 2048, 1408) == ("q8_0", "q8_0")  # 1408 % 256


def test_q4_k_m_experts_reach_the_kernels_byte_identical(models, tmp_path, monkeypatch, capsys):
    (path,) = llama_cpp_gguf(models["wide"], tmp_path / "m.gguf", experts=Q.Q4_K, projection_types={"down": Q.Q6_K})
    weights = GGUFWeights(path)
    assert weights.expert_format() == "q4_k"
    moe_layers = [i for i in range(weights.cfg.num_hidden_layers) if weights.cfg.is_moe_layer(i)]
    assert weights.stored_formats() == {i: ("q4_k", "q6_k") for i in moe_layers}
    plan = mixed_plan(path, "q4_k")
    experts = [p for p in plan.placements if p.unit.kind == "experts"]
    assert all((p.format, p.down_format, p.format_text) == ("q4_k", "q6_k", "q4_k/q6_k") for p in experts)
    # bytes: 2 of 3 matrices at q4_k's repacked 148/256 bytes/weight (GGUF's 144 + f16 factors), down at
    # q6_k's 1.125
    cfg = weights.cfg
    per_matrix = cfg.n_routed_experts * cfg.hidden_size * cfg.moe_intermediate_size
    assert experts[0].bytes == round(2 * per_matrix * 148 / 256) + round(per_matrix * 1.125)
    inventory = hypothetical([], 8)
    assert "q4_k/q6_k" in render(plan, preflight.fits(plan, inventory), "m")

    seen = _spy_blocks(monkeypatch, down_format=True)
    cache = PackedCache(tmp_path / "packed")
    jit = load_model(path, plan=plan, packed_cache=cache)
    assert "warning" not in capsys.readouterr().err  # nothing was requantized
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    moe = [i for i, layer in enumerate(jit.model.layers) if isinstance(getattr(layer.mlp, "experts", None), JitExperts)]
    assert moe == moe_layers and len(seen) == len(moe)
    for layer, (fmts, *blocks) in zip(moe, seen):
        assert fmts == ("q4_k", "q6_k")
        for proj, got in zip(("gate", "up", "down"), blocks):
            assert np.array_equal(np.asarray(got), stored[f"blk.{layer}.ffn_{proj}_exps.weight"])
    engine = jit.model.layers[moe[0]].mlp.experts.engine
    assert (engine.fmt, engine.down_fmt) == ("q4_k", "q6_k")
    assert sum(p.bytes for p in experts) == sum(jit.model.layers[i].mlp.experts.nbytes_by_device()["cpu"] for i in moe)

    # the same model as safetensors (the GGUF's dequantized weights, torch experts) gives the same logits
    ref = load_model(gguf_to_hf(path, tmp_path / "hf", dtype="f32"), dtype="float32")
    a, b = logits(ref), logits(jit)
    assert float((b - a).norm() / a.norm()) < 2e-2
    # a second load reads the packed layers back (the cache key covers both formats) and agrees exactly
    seen.clear()
    again = load_model(path, plan=plan, packed_cache=cache)
    assert not seen and torch.equal(logits(again), b)
    assert all("-q4_k-q6_k-" in f.name for f in (tmp_path / "packed").iterdir())


def test_gate_and_up_of_different_types_are_requantized_with_one_warning(models, tmp_path, monkeypatch, capsys):
    (path,) = llama_cpp_gguf(models["wide"], tmp_path / "m.gguf", experts=Q.Q4_K,
                             projection_types={"up": Q.Q6_K, "down": Q.Q6_K})
    weights = GGUFWeights(path)
    assert weights.stored_formats() == {} and weights.expert_format() == "q6_k"
    seen = _spy_blocks(monkeypatch, down_format=True)
    load_model(path, plan=mixed_plan(path, "q6_k"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q4_K" in err[0] and "requantized to q6_k" in err[0] and "Q6_K" not in err[0], err
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    layer = load_config(path).first_k_dense_replace
    fmts, gate, up, down = seen[0]
    assert fmts == ("q6_k", "q6_k") and np.array_equal(np.asarray(up), stored[f"blk.{layer}.ffn_up_exps.weight"])
    assert np.asarray(gate).shape == np.asarray(up).shape != stored[f"blk.{layer}.ffn_gate_exps.weight"].shape
