"""The model's routed experts on cpu_experts' JIT kernels give the reference's results."""

import pytest
import torch

from runtime.errors import HmoeError
from runtime.jit_experts import JitExperts, jit_experts_factory
from runtime.loader import load_model


@pytest.mark.parametrize("fmt, tolerance", [("bf16", 1e-2), ("q8_0", 3e-2)])
def test_jit_experts_match_the_torch_reference(tiny_v3, fmt, tolerance):
    ref = load_model(tiny_v3, dtype="float32")
    jit = load_model(tiny_v3, dtype="float32", experts_factory=jit_experts_factory(fmt, threads=2))
    assert all(isinstance(layer.mlp.experts, JitExperts) for layer in jit.model.layers[1:])
    ids = torch.randint(2, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    a = ref(ids, cache=ref.new_cache(batch=1, max_len=48))
    b = jit(ids, cache=jit.new_cache(batch=1, max_len=48))
    assert float((b - a).norm() / a.norm()) < tolerance
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9


def test_format_the_shape_cannot_hold_is_one_clear_error(tiny_v3):
    with pytest.raises(HmoeError, match="routed experts of layer 1 cannot run as q4_k"):
        load_model(tiny_v3, dtype="float32", experts_factory=jit_experts_factory("q4_k", threads=1))
