"""The orchestrator: prefill threshold arithmetic, HybridExperts' CPU stand-in and, on a GPU, the hybrid
model (experts on the CPU through cudaLaunchHostFunc) against the all-GPU torch model."""

import random

import pytest
import torch

from orchestrator.hybrid import HybridExperts, attach
from orchestrator.threshold import CpuCurve, layer_stream_bytes, prefill_threshold, stream_seconds
from runtime.loader import load_model
from runtime.moe import MoE

# One DeepSeek-V3 layer of q4_k experts on the CPU (ms at 1..2048 tokens, the README's table) and
# the anchors' PCIe Gen5 pinned bandwidth.
V3_Q4K = CpuCurve(((1, 0.00283), (8, 0.0160), (64, 0.074), (512, 0.217), (2048, 0.664)))
V3_Q4K_BYTES = layer_stream_bytes("q4_k", num_experts=256, hidden=7168, inter=2048)
PCIE = 55.5


def test_layer_bytes_are_the_compact_format():
    assert V3_Q4K_BYTES == 256 * 3 * 7168 * 2048 * 144 // 256  # q4_k: 144 bytes per 256 weights
    assert layer_stream_bytes("bf16", num_experts=4, hidden=64, inter=32) == 4 * 3 * 64 * 32 * 2


def test_cpu_curve_interpolates_holds_below_and_scales_above():
    c = CpuCurve(((8, 0.01), (64, 0.05)))
    assert c.seconds(1) == c.seconds(8) == 0.01
    assert c.seconds(36) == pytest.approx(0.03)
    assert c.seconds(128) == pytest.approx(0.10)  # compute-bound: proportional to tokens


def test_threshold_from_measured_numbers():
    # copy of one layer: 6.34 GB / 55.5 GB/s = 114.3 ms; the CPU reaches that between 64 (74 ms) and
    # 512 tokens (217 ms): 64 + (114.3 - 74) / (143 / 448) = 190.2 -> 191
    t = prefill_threshold(V3_Q4K, layer_bytes=V3_Q4K_BYTES, pcie_gbs=PCIE)
    assert t == 191
    copy = stream_seconds(t, layer_bytes=V3_Q4K_BYTES, pcie_gbs=PCIE)
    assert V3_Q4K.seconds(190) < copy <= V3_Q4K.seconds(191)
    # twice the bandwidth halves the copy: now below the 64-token point
    assert prefill_threshold(V3_Q4K, layer_bytes=V3_Q4K_BYTES, pcie_gbs=2 * PCIE) < 64


def test_threshold_edges():
    assert prefill_threshold(V3_Q4K, layer_bytes=1e3, pcie_gbs=PCIE) == 1  # free copy: always stream
    # beyond the last point the CPU grows in proportion: 0.664 s * T / 2048 >= 11.43 s from T = 35244
    assert prefill_threshold(V3_Q4K, layer_bytes=100 * V3_Q4K_BYTES, pcie_gbs=PCIE) == 35244
    # a GPU slower per token than the CPU's large-batch rate never pays back the copy
    assert prefill_threshold(V3_Q4K, layer_bytes=V3_Q4K_BYTES, pcie_gbs=PCIE, gpu_ms_per_token=1.0) is None
    # without prefetch the copy and the GPU work add up: a later threshold
    overlapped = prefill_threshold(V3_Q4K, layer_bytes=V3_Q4K_BYTES, pcie_gbs=PCIE, gpu_ms_per_token=0.2)
    serial = prefill_threshold(V3_Q4K, layer_bytes=V3_Q4K_BYTES, pcie_gbs=PCIE, gpu_ms_per_token=0.2, overlap=False)
    assert overlapped == 191 and serial > overlapped


def test_threshold_is_the_first_token_count_where_streaming_wins():
    rng = random.Random(3)
    for _ in range(40):
        pts, t, s = [], 0, 0.0
        for _ in range(rng.randint(1, 4)):
            t, s = t + rng.randint(1, 200), s + rng.uniform(0.001, 0.05)
            pts.append((t, s))
        curve = CpuCurve(tuple(pts))
        cost = dict(layer_bytes=rng.uniform(1e8, 3e9), pcie_gbs=50.0, gpu_ms_per_token=rng.choice([0.0, 0.02, 0.3]),
                    overlap=rng.random() < 0.5)
        got = prefill_threshold(curve, **cost)
        brute = next((T for T in range(1, 3000) if curve.seconds(T) >= stream_seconds(T, **cost)), None)
        assert got == brute or (brute is None and (got is None or got >= 3000)), (pts, cost, got, brute)


def test_bad_measurements_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        CpuCurve(((64, 0.1), (8, 0.01)))
    with pytest.raises(ValueError, match="positive"):
        CpuCurve(((8, 0.0),))
    with pytest.raises(ValueError, match="pcie_gbs > 0"):
        prefill_threshold(V3_Q4K, layer_bytes=1e9, pcie_gbs=0)


# ---------------------------------------------------------------- HybridExperts, CPU stand-in

def _round_experts_to_bf16(model):
    """Routed-expert weights exactly representable in bf16: the bf16 CPU kernels then hold the very
    weights the torch reference multiplies with."""
    with torch.no_grad():
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                for p in layer.mlp.experts.parameters():
                    p.copy_(p.bfloat16().float())
    return model


def _greedy(model, prompt, n):
    device = model.lm_head.weight.device
    cache = model.new_cache(batch=1, max_len=len(prompt) + n)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    first_logits, out = logits[0, -1].float().cpu(), []
    for i in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]], device=device), cache=cache, start_pos=len(prompt) + i,
                       last_only=True)
    return out, first_logits


PROMPT = [0] + [int(t) for t in torch.randint(2, 1000, (39,), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def models(tiny_v3):
    reference = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    hybrid = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    assert attach(hybrid, fmt="bf16", threads=2) == 2
    return reference, hybrid


class _Serial(torch.nn.Module):
    """The same engine behind the plain interface only: the MoE block calls it, then the shared experts."""

    def __init__(self, hybrid):
        super().__init__()
        self.inner = hybrid

    def forward(self, hidden, ids, weights):
        return self.inner(hidden, ids, weights)


def test_hybrid_cpu_stand_in_gives_the_reference_tokens(models):
    reference, hybrid = models
    assert all(isinstance(layer.mlp.experts, HybridExperts) for layer in hybrid.model.layers[1:])
    want, want_logits = _greedy(reference, PROMPT, 16)
    got, got_logits = _greedy(hybrid, PROMPT, 16)
    assert got == want
    assert float((got_logits - want_logits).norm() / want_logits.norm()) < 1e-5


def test_started_path_equals_the_plain_path_exactly(models):
    _, hybrid = models
    ids = torch.tensor([PROMPT])
    started = hybrid(ids, cache=hybrid.new_cache(batch=1, max_len=40))
    moes = [layer.mlp for layer in hybrid.model.layers if isinstance(layer.mlp, MoE)]
    try:
        for moe in moes:
            moe.experts = _Serial(moe.experts)
        plain = hybrid(ids, cache=hybrid.new_cache(batch=1, max_len=40))
    finally:
        for moe in moes:
            moe.experts = moe.experts.inner
    assert torch.equal(started, plain)


def test_moe_block_runs_shared_experts_between_start_and_finish(models):
    _, hybrid = models
    moe = hybrid.model.layers[1].mlp
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def start(self, *a):
            calls.append("start")
            self.inner.start(*a)

        def finish(self):
            calls.append("finish")
            return self.inner.finish()

    experts = moe.experts
    moe.experts = Recorder(experts)
    handle = moe.shared_experts.register_forward_hook(lambda *a: calls.append("shared"))
    try:
        moe(torch.randn(1, 3, hybrid.cfg.hidden_size))
    finally:
        moe.experts = experts
        handle.remove()
    assert calls == ["start", "shared", "finish"]


def test_long_batches_run_in_chunks(tiny_v3, models):
    reference, _ = models
    chunked = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    attach(chunked, fmt="bf16", threads=2, max_tokens=16)  # the 40-token prompt: 16 + 16 + 8
    want, want_logits = _greedy(reference, PROMPT, 8)
    got, got_logits = _greedy(chunked, PROMPT, 8)
    assert got == want
    assert float((got_logits - want_logits).norm() / want_logits.norm()) < 1e-5


def test_attach_keeps_an_existing_engine(models):
    _, hybrid = models
    engines = [layer.mlp.experts.engine for layer in hybrid.model.layers[1:]]
    assert attach(hybrid) == 2
    assert [layer.mlp.experts.engine for layer in hybrid.model.layers[1:]] == engines


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hybrid_tokens_identical_to_the_all_gpu_torch_run(models):
    reference, hybrid = (m.to("cuda") for m in models)
    staging = hybrid.model.layers[1].mlp.experts.staging  # shared by all layers
    max_tokens = staging.max_tokens
    try:
        want, want_logits = _greedy(reference, PROMPT, 24)
        got, got_logits = _greedy(hybrid, PROMPT, 24)
        assert got == want
        assert float((got_logits - want_logits).norm() / want_logits.norm()) < 1e-5
        # a prompt longer than the pinned buffers runs in chunks (16 + 16 + 8 tokens here)
        staging.max_tokens = 16  # the buffers stay larger: this only narrows their use
        chunked, chunked_logits = _greedy(hybrid, PROMPT, 8)
        assert chunked == want[:8]
        assert float((chunked_logits - want_logits).norm() / want_logits.norm()) < 1e-5
    finally:
        staging.max_tokens = max_tokens
        for m in models:
            m.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_block_graph_replay_equals_the_eager_run(models):
    _, hybrid = models
    moe = hybrid.model.layers[1].mlp.to("cuda")
    try:
        gen = torch.Generator(device="cuda").manual_seed(1)
        static_x = torch.randn(1, 1, hybrid.cfg.hidden_size, device="cuda", generator=gen)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: binds the 1-token job before capture
            for _ in range(2):
                moe(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe(static_x)
        for _ in range(3):
            x = torch.randn(1, 1, hybrid.cfg.hidden_size, device="cuda", generator=gen)
            static_x.copy_(x)
            graph.replay()
            eager = moe(x)
            torch.testing.assert_close(static_out, eager, rtol=1e-6, atol=1e-7)
    finally:
        moe.to("cpu")
