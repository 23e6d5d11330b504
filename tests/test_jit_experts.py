"""The model's routed experts on cpu_experts' JIT kernels, placed by rules: results close to the
torch reference, and packed layers cached on disk and read back."""

import pytest
import torch

from placement.inventory import hypothetical
from placement.plan import build_plan
from placement.schema import parse_rules
from placement.yaml_lines import RulesError
from runtime.config import load_config
from runtime.jit_experts import JitExperts, PackedCache
from runtime.loader import load_model

MACHINE = hypothetical([], 8)


def jit_plan(model_dir, fmt, threads=2):
    rules = parse_rules(f"name: jit\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    op: jit\n"
                        f"    quant: {fmt}\n    threads: {threads}\n  - match: '.*'\n    dtype: fp32\n",
                        "jit.yaml", MACHINE)
    return build_plan(rules, load_config(model_dir), ctx=64)


def logits(model, ids):
    return model(ids, cache=model.new_cache(batch=1, max_len=48))


IDS = torch.randint(2, 1000, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt, tolerance", [("bf16", 1e-2), ("q8_0", 3e-2)])
def test_jit_experts_match_the_torch_reference(tiny_v3, fmt, tolerance):
    ref = load_model(tiny_v3, dtype="float32")
    jit = load_model(tiny_v3, plan=jit_plan(tiny_v3, fmt))
    assert all(isinstance(layer.mlp.experts, JitExperts) for layer in jit.model.layers[1:])
    a, b = logits(ref, IDS), logits(jit, IDS)
    assert float((b - a).norm() / a.norm()) < tolerance
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9


def test_format_the_rows_cannot_hold_is_refused_at_the_rule(tiny_v3):
    with pytest.raises(RulesError, match=r"jit.yaml:5: q4_k packs rows in blocks of 256 values"):
        jit_plan(tiny_v3, "q4_k")


def test_packed_layers_are_cached_and_read_back(tiny_v3, tmp_path):
    cache = PackedCache(tmp_path)
    plan = jit_plan(tiny_v3, "q8_0")
    first = logits(load_model(tiny_v3, plan=plan, packed_cache=cache), IDS)
    files = sorted(tmp_path.glob("*.bin"))
    moe_layers = sum(isinstance(getattr(layer.mlp, "experts", None), JitExperts)
                     for layer in load_model(tiny_v3, plan=plan).model.layers)
    assert len(files) == moe_layers
    assert torch.equal(logits(load_model(tiny_v3, plan=plan, packed_cache=cache), IDS), first)

    # the second start really reads the files: zeroed payloads change the result ...
    header = {f: f.read_bytes().split(b"\n", 1) for f in files}
    for f, (head, body) in header.items():
        f.write_bytes(head + b"\n" + bytes(len(body)))
    zeroed = logits(load_model(tiny_v3, plan=plan, packed_cache=cache), IDS)
    assert not torch.allclose(zeroed, first)
    # ... a truncated file is rebuilt from the checkpoint, and a file for another format is not used
    for f in files:
        f.write_bytes(f.read_bytes()[:100])
    assert torch.equal(logits(load_model(tiny_v3, plan=plan, packed_cache=cache), IDS), first)
    load_model(tiny_v3, plan=jit_plan(tiny_v3, "bf16"), packed_cache=cache)
    assert len(list(tmp_path.glob("*.bin"))) == 2 * moe_layers
