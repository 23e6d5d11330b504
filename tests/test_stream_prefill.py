"""Streamed-expert prefill (orchestrator/streamed.py, schedule.py): the double-buffer schedule,
the GPU expert math run on the CPU stand-in against the formats' own dequantize and against the
CPU kernels, the per-call decision, and a whole model's prefill and decode."""

import numpy as np
import pytest
import torch

from cpu_experts.experts import CPUExperts
from cpu_experts.formats import dequantize, quantize
from orchestrator import streamed
from orchestrator.schedule import Compute, Copy, DoubleBuffer
from orchestrator.streamed import StreamedExperts, StreamedPrefill
from runtime.errors import HmoeError

from .conftest import rel_err

# ---------------------------------------------------------------- schedule


def test_schedule_prefetches_the_next_layer_into_the_other_slot():
    s = DoubleBuffer(4)
    steps = [s.step(j) for j in range(4)]
    assert steps == [[Copy(0, 0), Copy(1, 1), Compute(0, 0)],
                     [Copy(2, 0), Compute(1, 1)],       # layer 2 reuses slot 0 once layer 0 released it
                     [Copy(3, 1), Compute(2, 0)],
                     [Compute(3, 1)]]
    # a second prompt starts over: slot 0 holds layer 2 now, slot 1 layer 3
    assert s.step(0) == [Copy(0, 0), Copy(1, 1), Compute(0, 0)]


def test_schedule_keeps_two_layers_resident():
    s = DoubleBuffer(2)
    assert s.step(0) + s.step(1) == [Copy(0, 0), Copy(1, 1), Compute(0, 0), Compute(1, 1)]
    assert s.step(0) + s.step(1) == [Compute(0, 0), Compute(1, 1)]  # nothing to copy again
    s.forget()
    assert s.step(1) == [Copy(1, 1), Compute(1, 1)]


def test_schedule_never_copies_into_the_slot_being_computed():
    s = DoubleBuffer(7)
    for j in range(7):
        actions = s.step(j)
        computing = actions[-1].slot
        assert all(a.slot != computing for a in actions[:-1] if isinstance(a, Copy) and a.layer != j)
    with pytest.raises(ValueError, match="at least one layer"):
        DoubleBuffer(0)


# ---------------------------------------------------------------- layer math on the CPU stand-in

E, H, I, K, T = 6, 256, 256, 2, 24


def _layer(fmt, seed=0):
    rng = np.random.default_rng(seed)
    w = [rng.standard_normal(s).astype(np.float32) * s[-1] ** -0.5 for s in ((E, I, H), (E, I, H), (E, H, I))]
    engine = CPUExperts.from_tensors(*w, fmt=fmt, threads=2)
    weights = [torch.from_numpy(dequantize(quantize(m, fmt), fmt)).double() for m in w]  # what the blocks hold
    return engine, weights


def _routing(seed=1, tokens=T):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return hidden, ids, torch.rand(tokens, K, generator=g)


def _reference(weights, hidden, ids, w):
    gate, up, down = weights
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e, x = int(ids[t, j]), hidden[t].double()
            out[t] += w[t, j].double() * (down[e] @ (torch.nn.functional.silu(gate[e] @ x) * (up[e] @ x)))
    return out


@pytest.mark.parametrize("fmt,tol", [("bf16", 1e-6), ("q8_0", 1e-6), ("q4_0", 1e-6), ("q4_k", 2e-3), ("q6_k", 2e-3)])
def test_streamed_layer_equals_the_blocks_math(fmt, tol):
    engine, weights = _layer(fmt)
    hidden, ids, w = _routing()
    prefill = StreamedPrefill([engine], "cpu")
    got = prefill.run(0, hidden, ids, w)
    assert got.shape == hidden.shape and got.dtype == hidden.dtype
    assert rel_err(got, _reference(weights, hidden, ids, w)) < tol
    # the CPU kernels (int8 activations for block formats) agree within their own error
    assert rel_err(got, engine.forward(hidden, ids, w)) < (1e-5 if fmt == "bf16" else 2e-2)
    engine.close()


def test_streamed_layers_use_their_own_weights_and_chunks(monkeypatch):
    monkeypatch.setattr(streamed, "CHUNK_BYTES", 3 * H * I * 2 * 4)  # 4 experts per dequantize chunk
    (e0, w0), (e1, w1), (e2, w2) = (_layer("q8_0", seed=s) for s in (0, 1, 2))
    prefill = StreamedPrefill([e0, e1, e2], "cpu")
    hidden, ids, w = _routing()
    for j, weights in ((0, w0), (1, w1), (2, w2), (0, w0)):
        assert rel_err(prefill.run(j, hidden, ids, w), _reference(weights, hidden, ids, w)) < 1e-6


# ---------------------------------------------------------------- the per-call decision


class _Inner(torch.nn.Module):
    def __init__(self, engine):
        super().__init__()
        self.engine, self.calls = engine, 0

    def forward(self, hidden, ids, w):
        self.calls += 1
        return self.engine.forward(hidden, ids, w)


def test_threshold_decides_per_call(monkeypatch):
    engine, weights = _layer("q8_0")
    inner = _Inner(engine)
    experts = StreamedExperts(inner, StreamedPrefill([engine], "cpu"), 0, min_tokens=16)
    short, long = _routing(tokens=15), _routing(tokens=16)
    experts(*short)
    assert inner.calls == 1  # below the threshold: the CPU kernels
    got = experts(*long)
    assert inner.calls == 1 and rel_err(got, _reference(weights, *long)) < 1e-6  # streamed
    experts.start(*long)
    assert inner.calls == 1 and rel_err(experts.finish(), _reference(weights, *long)) < 1e-6
    monkeypatch.setenv(streamed.ENV_DISABLE, "1")
    experts(*long)
    assert inner.calls == 2


class _Moe(torch.nn.Module):
    """What attach reads of a MoE block: its router's top-k and its CPU experts."""

    def __init__(self, engine):
        super().__init__()
        self.gate = type("G", (), {"top_k": K})()
        self.experts = _Inner(engine)


def test_min_tokens_override_from_the_environment(monkeypatch):
    moe = _Moe(_layer("q8_0")[0])
    monkeypatch.setenv(streamed.ENV_MIN_TOKENS, "7")
    streamed.attach([(moe, moe.experts)], "cpu", min_tokens=100)
    assert isinstance(moe.experts, StreamedExperts) and moe.experts.min_tokens == 7
    monkeypatch.setenv(streamed.ENV_MIN_TOKENS, "seven")
    with pytest.raises(HmoeError, match="HMOE_STREAM_MIN_TOKENS must be a positive integer, got 'seven'"):
        streamed.attach([(moe, moe.experts.inner)], "cpu", min_tokens=None)


def test_each_layer_streams_from_its_own_rules_threshold(monkeypatch):
    monkeypatch.delenv(streamed.ENV_MIN_TOKENS, raising=False)
    moes = [_Moe(_layer("q8_0")[0]) for _ in range(2)]
    streamed.attach([(moe, moe.experts) for moe in moes], "cpu", min_tokens=[4096, 512])
    assert [moe.experts.min_tokens for moe in moes] == [4096, 512]


def test_cpu_threshold_is_measured_when_auto():
    engine, _ = _layer("q8_0")
    prefill = StreamedPrefill([engine], "cpu")
    found, facts = streamed.measured_threshold(prefill, top_k=K, tokens=(8, 32))
    assert found == 1 and "GB per layer at inf GB/s" in facts  # no PCIe on the stand-in: streaming is free


# ---------------------------------------------------------------- a whole model

PROMPT = [0] + [int(t) for t in torch.randint(2, 1000, (39,), generator=torch.Generator().manual_seed(0))]


def _greedy(model, n):
    device = model.lm_head.weight.device
    cache = model.new_cache(batch=1, max_len=len(PROMPT) + n)
    logits = model(torch.tensor([PROMPT], device=device), cache=cache, last_only=True)
    first, out = logits[0, -1].float().cpu(), []
    for i in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]], device=device), cache=cache, start_pos=len(PROMPT) + i,
                       last_only=True)
    return out, first


def _streamed_pair(model, monkeypatch, n=12):
    """(tokens, prompt logits) with the CPU experts, then with streamed prefill, on one model."""
    monkeypatch.setenv(streamed.ENV_DISABLE, "1")
    want = _greedy(model, n)
    monkeypatch.delenv(streamed.ENV_DISABLE)
    return want, _greedy(model, n)


@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
def test_model_prefill_streams_and_decode_stays_on_the_cpu(tiny_v3, monkeypatch, fmt):
    """The CPU stand-in: HybridExperts on CPU tensors, streamed prefill on 'cpu'."""
    from orchestrator.hybrid import attach
    from runtime.loader import load_model
    from runtime.moe import MoE

    model = load_model(tiny_v3, dtype="float32")
    attach(model, fmt=fmt, threads=2)
    moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    prefill = streamed.attach([(moe, moe.experts) for moe in moes], "cpu", min_tokens=16)
    (want, want_logits), (got, got_logits) = _streamed_pair(model, monkeypatch)
    assert prefill.schedule.holds == [0, 1]  # both layers streamed (and stay resident)
    if fmt == "bf16":  # the same bf16 weights, fp32 activations on both sides
        assert rel_err(got_logits, want_logits) < 1e-5
        assert got == want
    else:  # int8 activations on the CPU side only: close logits (random tiny models have near-ties later)
        assert rel_err(got_logits, want_logits) < 2e-2


def test_prefill_streaming_is_refused_when_attention_is_not_on_that_gpu(tiny_v3):
    from placement.assemble import AssemblyError
    from placement.inventory import hypothetical
    from placement.plan import build_plan
    from placement.schema import parse_rules
    from runtime.config import load_config
    from runtime.loader import load_model

    rules = parse_rules("name: p\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n"
                        "    op: jit\n    quant: q8_0\n    prefill: {device: cuda:0, op: stream}\n"
                        "  - {match: '.*', device: cpu}\n", "p.yaml", hypothetical([24], 8))
    plan = build_plan(rules, load_config(tiny_v3), ctx=64)
    with pytest.raises(AssemblyError, match=r"p.yaml: rule 1 \(line 3\) places model.layers.1.mlp.experts with "
                                            r"prefill streaming to cuda:0 while the layer's attention runs on cpu"):
        load_model(tiny_v3, plan=plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,tol", [("bf16", 1e-5), ("q8_0", 2e-2)])
def test_streamed_prefill_on_the_gpu_equals_cpu_expert_prefill(tiny_v3, monkeypatch, fmt, tol):
    """Loaded from rules: attention on cuda:0, experts in the CPU kernels, `prefill: {op: stream}`."""
    from placement.inventory import detect
    from placement.plan import build_plan
    from placement.schema import parse_rules
    from runtime.config import load_config
    from runtime.loader import load_model

    rules = parse_rules("name: s\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n"
                        f"    op: jit\n    quant: {fmt}\n    prefill: {{device: cuda:0, op: stream, min_tokens: 16}}\n"
                        "  - {match: '.*', device: 'cuda:0', dtype: fp32}\n", "s.yaml", detect())
    model = load_model(tiny_v3, plan=build_plan(rules, load_config(tiny_v3), ctx=64))
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, StreamedExperts) and experts.min_tokens == 16
    (want, want_logits), (got, got_logits) = _streamed_pair(model, monkeypatch)
    assert experts.prefill.schedule.holds == [0, 1]
    assert rel_err(got_logits, want_logits) < tol
    if fmt == "bf16":  # fp32 model: fp32 on the GPU too, so the same tokens follow
        assert got == want
    experts.prefill.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "q4_k", "q6_k"])
def test_streamed_layer_on_the_gpu_equals_the_cpu_stand_in(fmt):
    engine, weights = _layer(fmt)
    hidden, ids, w = _routing(tokens=64)
    want = _reference(weights, hidden, ids, w)
    gpu = StreamedPrefill([engine, engine, engine], "cuda", timing=True)
    for j in (0, 1, 2, 0):  # three layers (the same weights) through both slots
        got = gpu.run(j, hidden.cuda().bfloat16(), ids.cuda(), w.cuda()).cpu()
        assert got.dtype == torch.bfloat16 and rel_err(got, want) < 1e-2  # bf16 activations and weights
    # 0 and 1 up front, 2 prefetched into slot 0 while 1 computes; 0 again over 2 (slot 1 still holds 1)
    assert [c[0] for c in gpu.copies] == [0, 1, 2, 0]
    gpu.close()


@pytest.mark.parametrize("attention,says", [("cuda:0", None), ("cpu", "not in the runtime yet: prefill streaming to "
                                                                   "cuda:0 while the layer's attention runs on cpu")])
def test_explain_lists_prefill_streaming_the_runtime_cannot_run(tmp_path, capsys, attention, says):
    from runtime.cli import main

    rules = tmp_path / "r.yaml"
    rules.write_text("name: r\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n    op: jit\n"
                     "    quant: q4_k\n    prefill: {device: cuda:0, op: stream}\n"
                     f"  - {{match: '.*', device: '{attention}', dtype: bf16}}\n")
    assert main(["rules", "explain", "--preset", "v3", "--rules", str(rules), "--vram", "80", "--ram", "1024"]) == 0
    out = capsys.readouterr().out
    assert "prefill >= auto tokens: stream on cuda:0" in out
    assert (says in out) if says else ("not in the runtime yet" not in out)
