"""A plan applied to a real (tiny) checkpoint: every tensor where the plan says, the bytes it planned,
and the tokens of the plain model."""

import pytest
import torch

from placement.assemble import AssemblyError, allocated_bytes
from placement.defaults import open_rules
from placement.inventory import hypothetical
from placement.plan import build_plan
from placement.schema import parse_rules
from runtime.config import load_config
from runtime.jit_experts import JitExperts
from runtime.loader import load_model

MACHINE = hypothetical([], 8)
PROMPT = [0, 17, 230, 5, 99, 4, 512, 8]


def greedy(model, ids, n):
    cache = model.new_cache(batch=1, max_len=len(ids) + n)
    logits = model(torch.tensor([ids]), cache=cache, start_pos=0, last_only=True)[0, -1]
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache, start_pos=pos, last_only=True)[0, -1]
    return out, logits


def test_cpu_reference_rules_give_the_plain_models_tokens(tiny_v3):
    plan = build_plan(open_rules("cpu-reference", MACHINE), load_config(tiny_v3), ctx=64)
    placed = load_model(tiny_v3, plan=plan)
    assert allocated_bytes(placed) == {"cpu": plan.total_weight_bytes}
    tokens, logits = greedy(placed, PROMPT, 12)
    want_tokens, want_logits = greedy(load_model(tiny_v3), PROMPT, 12)
    assert tokens == want_tokens
    assert torch.equal(logits, want_logits)


def test_cpu_only_rules_run_the_jit_experts_with_the_references_tokens(tiny_v3):
    plan = build_plan(open_rules("cpu-only", MACHINE), load_config(tiny_v3), ctx=64)
    placed = load_model(tiny_v3, plan=plan)
    assert isinstance(placed.model.layers[1].mlp.experts, JitExperts)
    allocated = allocated_bytes(placed)["cpu"]
    assert abs(allocated - plan.total_weight_bytes) <= 1024, (allocated, plan.total_weight_bytes)
    assert placed.new_cache(batch=1, max_len=plan.ctx).nbytes == plan.usage()["cpu"].cache
    assert greedy(placed, PROMPT, 12)[0] == greedy(load_model(tiny_v3), PROMPT, 12)[0]


def test_mixed_dtypes_allocate_what_the_plan_says(tiny_v3):
    rules = parse_rules("name: mixed\nrules:\n  - {match: '.*mlp\\.experts', dtype: bf16}\n"
                        "  - {match: '.*self_attn', dtype: fp16}\n", "m.yaml", MACHINE)
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    model = load_model(tiny_v3, plan=plan)
    assert allocated_bytes(model) == {"cpu": plan.total_weight_bytes}
    assert model.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    assert model.model.layers[1].self_attn.q_a_proj.weight.dtype == torch.float16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_cache_options_come_from_the_attention_rule(tiny_v3):
    rules = parse_rules("name: fp8 cache\nrules:\n  - match: 'model\\.layers\\.\\d+\\.self_attn'\n"
                        "    cache: {dtype: fp8, page_size: 16}\n  - {match: '.*', dtype: fp32}\n", "c.yaml", MACHINE)
    plan = build_plan(rules, load_config(tiny_v3), ctx=50)
    cache = load_model(tiny_v3, plan=plan).new_cache(batch=1, max_len=50)
    assert cache.dtype == torch.float8_e4m3fn and cache.page_size == 16
    assert cache.nbytes == plan.usage()["cpu"].cache


def test_attention_layers_with_their_own_cache_options_get_their_own_caches(tiny_v3):
    rules = parse_rules("name: two caches\nrules:\n  - match: 'model\\.layers\\.\\d+\\.self_attn'\n    layers: 0-0\n"
                        "    cache: {dtype: fp32, page_size: 16}\n  - match: 'model\\.layers\\.\\d+\\.self_attn'\n"
                        "    cache: {dtype: fp32, page_size: 8}\n  - {match: '.*', dtype: fp32}\n", "c.yaml", MACHINE)
    plan = build_plan(rules, load_config(tiny_v3), ctx=50)
    placed = load_model(tiny_v3, plan=plan)
    cache = placed.new_cache(batch=1, max_len=50)
    layers = len(placed.model.layers)
    assert [(c.page_size, ids) for c, ids in cache.parts] == [(16, [0]), (8, list(range(1, layers)))]
    assert cache.nbytes == plan.usage()["cpu"].cache
    tokens, logits = greedy(placed, PROMPT, 12)  # 20 positions: crosses page boundaries of both caches
    want_tokens, want_logits = greedy(load_model(tiny_v3), PROMPT, 12)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_ops_not_in_the_runtime_are_refused_by_name_before_loading(tiny_v3):
    rules = parse_rules("name: future\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cuda:0\n"
                        "    op: stream\n    quant: q8_0\n  - {match: '.*', device: cpu}\n", "future.yaml",
                        hypothetical([24], 8))
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    with pytest.raises(AssemblyError, match=r"future.yaml: rule 1 \(line 3\) places model.layers.1.mlp.experts with op "
                                            r"'stream' on cuda:0 in q8_0 \(today: not at all\), which the runtime "
                                            r"cannot run yet"):
        load_model(tiny_v3, plan=plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_modules_on_the_gpu_and_the_cpu_give_the_references_tokens(tiny_v3):
    """Attention and dense parts on cuda:0, embedding on the CPU, routed experts in the JIT kernels."""
    from placement.inventory import detect

    rules = parse_rules("name: hybrid\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n"
                        "    op: jit\n    quant: bf16\n  - {match: 'model\\.embed_tokens', device: cpu, dtype: fp32}\n"
                        "  - {match: '.*', device: 'cuda:0', dtype: fp32}\n", "hybrid.yaml", detect())
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    placed = load_model(tiny_v3, plan=plan)
    assert placed.model.layers[0].self_attn.q_a_proj.weight.is_cuda
    assert greedy(placed, PROMPT, 12)[0] == greedy(load_model(tiny_v3), PROMPT, 12)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_on_the_gpu_and_the_cpu_gives_the_references_tokens(tiny_v3):
    """Layer 0 entirely on the CPU, the other layers on cuda:0 (two attention devices, two caches, the
    GPU's through its Triton kernels): the same greedy tokens as the reference."""
    from placement.inventory import detect

    rules = parse_rules("name: split\nrules:\n  - {layers: 0-0, device: cpu, dtype: fp32}\n"
                        "  - {match: '.*', device: 'cuda:0', dtype: fp32}\n", "split.yaml", detect())
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    placed = load_model(tiny_v3, plan=plan)
    cache = placed.new_cache(batch=1, max_len=64)
    assert [c.page_table.device.type for c, _ in cache.parts] == ["cpu", "cuda"]
    assert greedy(placed, PROMPT, 12)[0] == greedy(load_model(tiny_v3), PROMPT, 12)[0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_shipped_two_gpu_rules_run_a_tiny_model(tiny_v3):
    from placement.inventory import detect

    rules = parse_rules(open("rules/two-gpus.yaml").read().replace("0-13", "0-0").replace("14-26", "1-99"),
                        "two-gpus.yaml", detect())
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    placed = load_model(tiny_v3, plan=plan)
    assert [str(c.page_table.device) for c, _ in placed.new_cache(batch=1, max_len=64).parts] == ["cuda:0", "cuda:1"]
    assert greedy(placed, PROMPT, 12)[0] == greedy(load_model(tiny_v3), PROMPT, 12)[0]
