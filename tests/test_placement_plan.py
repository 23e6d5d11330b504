"""Matching (order, full match, layer ranges, defaults), bytes per format, cache bytes, model-level errors."""

import math
import textwrap

import pytest
import torch

from placement.formats import FORMATS, jit_bytes_per_weight
from placement.inventory import hypothetical
from placement.modules import model_units
from placement.plan import build_plan
from placement.schema import parse_rules
from placement.yaml_lines import RulesError
from runtime.config import config_from_dict
from runtime.make_model import preset_config
from runtime.model import DeepseekForCausalLM

GPU = hypothetical([24], 64)
TINY = config_from_dict(preset_config("tiny-v3"))  # 3 layers (layer 0 dense), 16 experts, hidden 64, moe 32
TINY_FP32 = config_from_dict({**preset_config("tiny-v3"), "torch_dtype": "float32"})
V2_LITE = config_from_dict(preset_config("v2-lite"))


def plan(text, cfg=TINY, ctx=256, inventory=GPU, numa_nodes=1):
    rules = parse_rules(textwrap.dedent(text).lstrip("\n"), "r.yaml", inventory)
    return build_plan(rules, cfg, ctx=ctx, numa_nodes=numa_nodes)


def placed(p):
    return {x.name: x for x in p.placements}


def test_units_cover_the_checkpoint_names():
    names = [u.name for u in model_units(TINY)]
    assert names[:7] == ["model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp",
                         "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                         "model.layers.1.self_attn", "model.layers.1.mlp.gate"]
    assert {"model.layers.2.mlp.experts", "model.layers.2.mlp.shared_experts", "model.norm", "lm_head"} <= set(names)
    kinds = {u.name: u.kind for u in model_units(TINY)}
    assert kinds["model.layers.0.mlp"] == "mlp" and kinds["model.layers.1.mlp.shared_experts"] == "shared_experts"
    with torch.device("meta"):
        model = DeepseekForCausalLM(TINY)
    every = sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))
    assert sum(math.prod(t.shape) for u in model_units(TINY) for t in u.tensors) == every


def test_first_match_wins_and_match_is_full():
    p = placed(plan(r"""
        name: t
        rules:
          - match: 'model\.layers\.1\.mlp\.experts'
            device: cuda:0
          - match: 'model\.layers\.\d+\.mlp\.experts'
            op: jit
            quant: q8_0
          - match: 'model\.layers\.\d+\.mlp'       # full match: the dense MLP only, not mlp.gate
            device: cuda:0
    """))
    assert p["model.layers.1.mlp.experts"].device == "cuda:0" and p["model.layers.1.mlp.experts"].rule.index == 1
    assert p["model.layers.2.mlp.experts"].op == "jit" and p["model.layers.2.mlp.experts"].rule.index == 2
    assert p["model.layers.0.mlp"].device == "cuda:0"
    assert p["model.layers.1.mlp.gate"].rule is None and p["model.layers.1.mlp.gate"].device == "cpu"


def test_layer_ranges_and_defaults():
    p = placed(plan("""
        name: t
        defaults: {device: cuda:0, dtype: bf16}
        rules:
          - {layers: 1-2, device: cpu}
    """))
    assert p["model.layers.0.self_attn"].device == "cuda:0" and p["model.layers.0.self_attn"].rule is None
    assert p["model.layers.1.self_attn"].device == "cpu" and p["model.layers.2.mlp.experts"].device == "cpu"
    assert p["model.embed_tokens"].device == "cuda:0"  # no layer: a `layers` rule never matches it
    assert p["model.layers.1.self_attn"].format == "bf16"  # the rule leaves dtype out: defaults fill it


def test_rules_that_place_nothing_are_warnings():
    p = plan(r"""
        name: t
        rules:
          - match: '.*mlp\.(shared_)?experts'
          - match: 'model\.layers\.\d+\.mlp\.shared_experts'
          - match: 'model\.layers\.\d+\.mlp\.expert'
          - match: 'model\.layers\.\d+\.self_attention'
          - {match: 'model\.layers\.\d+\.self_attn', layers: 2-9}
    """)
    assert p.warnings == (
        "r.yaml:4: rule 2 (match 'model\\.layers\\.\\d+\\.mlp\\.shared_experts') places nothing: every module it "
        "matches is placed by an earlier rule (first model.layers.1.mlp.shared_experts, by rule 1 (line 3))",
        "r.yaml:5: rule 3 (match 'model\\.layers\\.\\d+\\.mlp\\.expert') matches no module of this model; 'match' "
        "must match the whole name, and only matches the start of model.layers.1.mlp.experts",
        "r.yaml:6: rule 4 (match 'model\\.layers\\.\\d+\\.self_attention') matches no module of this model",
        "r.yaml:7: rule 5 (match 'model\\.layers\\.\\d+\\.self_attn', layers 2-9) names layers up to 9, but the "
        "model has layers 0-2",
    )


def test_bytes_per_format():
    e = "model.layers.1.mlp.experts"  # gate/up [16, 32, 64], down [16, 64, 32]: 98304 weights
    n = 3 * 16 * 32 * 64
    for fmt, per in [("bf16", 2), ("q8_0", 34 / 32), ("q4_0", 18 / 32)]:
        p = placed(plan(f"name: t\nrules:\n  - {{match: '.*mlp\\.experts', op: jit, quant: {fmt}}}\n"))
        assert p[e].bytes == n * per, fmt
    big = config_from_dict(preset_config("v3", layers=4))
    p = placed(plan("name: t\nrules:\n  - {match: '.*mlp\\.experts', op: jit, quant: q4_k}\n"
                    "  - {match: '.*', device: cuda, quant: fp8}\n", cfg=big))
    # the jit op stores its repacked layout: q4_k keeps GGUF's factors, sc and m as a byte each (148 bytes
    # per 256 weights where GGUF's block has 144); streamed experts keep GGUF's blocks
    assert p["model.layers.3.mlp.experts"].bytes == 256 * 3 * 7168 * 2048 * 148 // 256
    streamed = placed(plan("name: t\nrules:\n  - {match: '.*mlp\\.experts', device: cuda, op: stream, quant: q4_k}\n"
                           "  - {match: '.*', device: cuda, quant: fp8}\n", cfg=big))
    assert streamed["model.layers.3.mlp.experts"].bytes == 256 * 3 * 7168 * 2048 * 144 // 256
    # fp8: 1 byte per weight plus one fp32 scale per 128x128 block; the norms stay in bf16
    attn = p["model.layers.0.self_attn"]
    shapes = [(1536, 7168), (128 * 192, 1536), (576, 7168), (128 * 256, 512), (7168, 128 * 128)]
    expected = sum(n * k + math.ceil(n / 128) * math.ceil(k / 128) * 4 for n, k in shapes) + 2 * (1536 + 512)
    assert attn.bytes == expected and attn.format == "fp8"
    assert p["model.layers.3.mlp.gate"].bytes == 256 * 7168 + 2 * 56 * 4 + 4 * 256  # the correction bias stays fp32


def test_latent_cache_bytes():
    p = plan("name: t\nrules:\n  - {match: '.*self_attn', device: cuda, op: mla, dtype: bf16,"
             " cache: {dtype: fp8, page_size: 64}}\n", ctx=100)
    usage = p.usage()
    # num_layers * ctx (rounded up to pages) * (kv_lora_rank + qk_rope_head_dim) * dtype bytes,
    # plus fp8's one fp32 scale per 128 values of a token
    assert usage["cuda:0"].cache == 3 * 128 * ((32 + 8) * 1 + 4)
    p = plan("name: t\nrules:\n  - {match: '.*self_attn', device: cuda, op: mla, dtype: bf16}\n", ctx=100)
    assert p.usage()["cuda:0"].cache == 3 * 128 * 40 * 2  # pages of 64 tokens by default


def test_gpu_experts_split_the_bytes_and_numa_replicate_multiplies_ram():
    p = placed(plan("name: t\nrules:\n  - {match: '.*mlp\\.experts', op: jit, quant: q8_0, numa: replicate, "
                    "gpu_experts: {count: 4, quant: bf16}}\n", numa_nodes=2))
    e = p["model.layers.1.mlp.experts"]
    per_expert = 3 * 32 * 64
    assert e.gpu_bytes == 4 * per_expert * 2
    assert e.bytes == 2 * 12 * per_expert * 34 // 32 and e.replicas == 2


def test_streaming_buffers_hold_two_layers():
    p = plan("name: t\nrules:\n  - {match: '.*mlp\\.experts', op: jit, quant: q8_0, prefill: {device: cuda, op: stream}}\n")
    layer = 3 * 16 * 32 * 64 * 34 // 32
    assert dict(p.staging) == {"cuda:0": 2 * layer}
    assert p.usage()["cpu"].weights > 2 * layer and p.usage()["cuda:0"].staging == 2 * layer


@pytest.mark.parametrize("text, cfg, message", [
    ("name: t\nrules:\n  - match: '.*'\n    op: jit\n    quant: q8_0\n", TINY,
     "r.yaml:4: op 'jit' runs experts, but rule 1 (line 3) places model.embed_tokens (kind embed); narrow "
     "'match' or put a rule for it first"),
    ("name: t\nrules:\n  - match: '.*mlp\\.experts'\n    op: jit\n", TINY_FP32,
     "r.yaml:4: dtype auto is fp32 for this checkpoint and op 'jit' on cpu runs bf16, q8_0, q4_0, q4_k, q6_k, not "
     "fp32; set 'quant' or 'dtype'"),
    ("name: t\nrules:\n  - match: '.*mlp\\.experts'\n    op: jit\n    quant: q4_k\n", TINY,
     "r.yaml:5: q4_k packs rows in blocks of 256 values, but model.layers.1.mlp.experts.gate_proj has rows of "
     "64; choose a format whose block divides it (fp32, bf16, fp16, fp8, q8_0, q4_0)"),
    ("name: t\nrules:\n  - match: '.*norm'\n    cache: {dtype: bf16}\n", TINY,
     "r.yaml:4: 'cache' sets up the latent cache of attention modules, but rule 1 (line 3) places no self_attn module"),
    ("name: t\nrules:\n  - match: '.*mlp\\.experts'\n    op: jit\n    quant: q8_0\n    gpu_experts: 16\n", TINY,
     "r.yaml:6: gpu_experts 16 is every one of the layer's 16 experts; place the experts on cuda:0 with 'device' "
     "instead"),
    ("name: t\nrules:\n  - match: '.*self_attn'\n    prefill: {device: cuda, op: stream}\n", TINY,
     "r.yaml:4: prefill op 'stream' runs experts, but rule 1 (line 3) places model.layers.0.self_attn (kind "
     "attention)"),
])
def test_model_level_errors(text, cfg, message):
    with pytest.raises(RulesError) as e:
        plan(text, cfg=cfg)
    assert str(e.value) == message


@pytest.mark.parametrize("fmt, down", [("q4_k", "q4_0"), ("q6_k", "q8_0")])
def test_k_quant_down_rows_that_miss_the_blocks_fall_back_as_in_llama_cpp(fmt, down):
    """V2-Lite's routed down_proj has rows of 1408 (5.5 blocks of 256): that tensor takes the fallback
    format, gate/up keep the k-quant; bytes count each at its own rate; explain says so."""
    from placement.explain import render
    from placement.preflight import check

    p = plan(f"name: t\nrules:\n  - match: '.*mlp\\.experts'\n    op: jit\n    quant: {fmt}\n", cfg=V2_LITE)
    experts = [x for x in p.placements if x.unit.kind == "experts"]
    assert experts and all((x.format, x.down_format, x.format_text) == (fmt, down, f"{fmt}/{down}") for x in experts)
    H, I, E = V2_LITE.hidden_size, V2_LITE.moe_intermediate_size, V2_LITE.n_routed_experts
    rate = {name: jit_bytes_per_weight(name) for name in (fmt, down)}
    assert experts[0].bytes == round(2 * E * I * H * rate[fmt]) + round(E * H * I * rate[down])
    assert f"down_proj rows of 1408 do not fill {fmt} blocks: {down}" in render(p, check(p, GPU), "v2-lite")


def test_ctx_beyond_the_model_is_refused():
    from runtime.errors import HmoeError

    with pytest.raises(HmoeError, match="--ctx 4096 is outside the model's context of 1-2048 tokens"):
        plan("name: t\nrules: []\n", ctx=4096)


def test_block_formats_agree_with_cpu_experts():
    formats = pytest.importorskip("cpu_experts.formats")
    for name, f in formats.FORMATS.items():
        assert (FORMATS[name].block_elems, FORMATS[name].block_bytes) == (f.block_elems, f.block_bytes), name


def test_docs_name_every_op_format_and_key():
    from pathlib import Path

    from placement.ops import OPS
    from placement.schema import CACHE_KEYS, PREFILL_KEYS, RULE_KEYS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    for word in list(OPS) + list(FORMATS) + list(RULE_KEYS) + list(PREFILL_KEYS) + list(CACHE_KEYS):
        assert f"`{word}`" in doc or f" {word}," in doc or f" {word} " in doc, word
