"""The router's fp32 weight is converted once and reused, never stale: results always equal plain fp32 math."""

import torch
import torch.nn.functional as F

from runtime.config import load_config
from runtime.moe import Router


def _greedy_reference(router: Router, x: torch.Tensor):
    scores = F.linear(x.float(), router.weight.float()).softmax(-1)
    weights, ids = scores.topk(router.top_k, dim=-1)
    return weights * router.scaling, ids


def test_bf16_router_reuses_its_fp32_weight_and_follows_changes(tiny_v3):
    cfg = load_config(tiny_v3)
    router = Router(cfg)
    router.method, router.scoring, router.norm_topk_prob = "greedy", "softmax", False  # the V2-Lite form
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    router.to(torch.bfloat16)
    x = torch.randn(5, cfg.hidden_size, generator=gen).bfloat16()

    for scaling in (1.0, 2.5):
        router.scaling = scaling
        w, ids = router(x)
        want_w, want_ids = _greedy_reference(router, x)
        assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
        torch.testing.assert_close(w.sort(-1).values, want_w.sort(-1).values)
    first = router.weight_f32()
    assert router.weight_f32() is first  # converted once

    with torch.no_grad():  # changed in place: the next call must see the new weight
        router.weight.mul_(-1)
    w, ids = router(x)
    want_w, want_ids = _greedy_reference(router, x)
    assert router.weight_f32() is not first
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, want_w.sort(-1).values)
