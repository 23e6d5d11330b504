"""A plan applied to a real (tiny) checkpoint: it covers every tensor, allocates exactly the bytes it
planned, and the CPU reference rules give the plain model's tokens."""

import pytest
import torch

from placement.assemble import AssemblyError, allocated_bytes, materialize
from placement.defaults import open_rules
from placement.inventory import hypothetical
from placement.plan import build_plan
from runtime.checkpoint import Checkpoint
from runtime.config import load_config
from runtime.loader import checkpoint_names, load_model
from runtime.model import DeepseekForCausalLM

MACHINE = hypothetical([], 8)


def load_with_plan(model_dir, plan) -> DeepseekForCausalLM:
    """What the loader does with a plan: meta build, materialize, fill tensor by tensor."""
    cfg = plan.cfg
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    materialize(model, plan)
    ckpt = Checkpoint(model_dir, cfg.fp8_block_size)
    with torch.no_grad():
        for name, dest in checkpoint_names(model):
            dest.copy_(ckpt.read(name, tuple(dest.shape), dtype=dest.dtype))
    return model.eval()


def greedy(model, ids, n):
    cache = model.new_cache(batch=1, max_len=len(ids) + n)
    logits = model(torch.tensor([ids]), cache=cache, start_pos=0, last_only=True)[0, -1]
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache, start_pos=pos, last_only=True)[0, -1]
    return out, logits


def test_cpu_reference_rules_give_the_plain_models_tokens(tiny_v3):
    cfg = load_config(tiny_v3)
    plan = build_plan(open_rules("cpu-reference", MACHINE), cfg, ctx=64)
    placed = load_with_plan(tiny_v3, plan)
    assert allocated_bytes(placed) == {"cpu": plan.total_weight_bytes}
    plain = load_model(tiny_v3, progress=False)
    prompt = [0, 17, 230, 5, 99, 4, 512, 8]
    tokens, logits = greedy(placed, prompt, 12)
    want_tokens, want_logits = greedy(plain, prompt, 12)
    assert tokens == want_tokens
    assert torch.equal(logits, want_logits)


def test_mixed_dtypes_allocate_what_the_plan_says(tiny_v3):
    from placement.schema import parse_rules

    rules = parse_rules("name: mixed\nrules:\n  - {match: '.*mlp\\.experts', dtype: bf16}\n"
                        "  - {match: '.*self_attn', dtype: fp16}\n", "m.yaml", MACHINE)
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    model = load_with_plan(tiny_v3, plan)
    assert allocated_bytes(model) == {"cpu": plan.total_weight_bytes}
    assert model.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_ops_not_in_the_runtime_are_refused_by_name(tiny_v3):
    cfg = load_config(tiny_v3)
    plan = build_plan(open_rules("cpu-only", MACHINE), cfg, ctx=64)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    with pytest.raises(AssemblyError, match=r"cpu-only.yaml: rule 1 \(line 7\) places model.layers.1.mlp.experts "
                                             r"with op 'jit' on cpu in q8_0, which the runtime cannot assemble yet"):
        materialize(model, plan)
