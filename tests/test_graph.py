"""Decode steps from CUDA graphs (runtime.graph): the graph-safe step equals the plain one, the
runner falls back eagerly where it cannot capture, --no-graph is parsed; on a GPU, replay equals
the no-graph path over decode steps that cross a page boundary (all-GPU and CPU experts)."""

import pytest
import torch

from runtime.cli import build_parser
from runtime.graph import MIN_BUCKET, DecodeGraphs, bucket_for
from runtime.loader import load_model
from tests.conftest import rel_err

PROMPT = [0] + [int(t) for t in torch.randint(2, 1000, (21,), generator=torch.Generator().manual_seed(3))]
PAGE = 16  # 22 prompt tokens + 20 steps cross the pages at 32


def _decode(model, steps: int, graph: bool, page_size: int = PAGE, max_len: int | None = None):
    """Greedy: the prompt eagerly, then `steps` decode steps through DecodeGraphs -> (tokens, logits per step, runner)."""
    device = model.lm_head.weight.device
    cache = model.new_cache(batch=1, max_len=max_len or len(PROMPT) + steps + 1, page_size=page_size)
    runner = DecodeGraphs(model, cache, enabled=graph, log=lambda text: None)
    logits = model(torch.tensor([PROMPT], device=device), cache=cache, last_only=True)[:, -1]
    tokens, all_logits = [], []
    for i in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        logits = runner.step(token, len(PROMPT) + i)[:, -1]
        all_logits.append(logits.float().cpu())
    return tokens, torch.stack(all_logits), runner


@pytest.fixture(scope="module")
def model(tiny_v3):
    return load_model(tiny_v3, dtype="float32")


def test_graph_safe_step_equals_the_plain_step(model):
    """The device-position step (what a graph captures) gives exactly the plain step's logits and cache."""
    caches = [model.new_cache(batch=2, max_len=48, page_size=8) for _ in range(2)]
    prompt = torch.tensor([PROMPT[:13], PROMPT[5:18]])
    for cache in caches:
        model(prompt, cache=cache)
    for pos in range(13, 20):  # crosses the page boundary at 16
        ids = torch.tensor([[pos], [pos + 7]])
        plain = model(ids, cache=caches[0], start_pos=pos, last_only=True)
        caches[1].note_lengths([pos + 1] * 2)
        static = model(ids, cache=caches[1], start_pos=torch.tensor([pos]), last_only=True)
        assert torch.equal(plain, static)
        assert torch.equal(caches[0].seq_lens, caches[1].seq_lens)
    assert torch.equal(caches[0].data, caches[1].data)


def test_runner_on_the_cpu_decodes_eagerly_with_the_same_tokens(model):
    want, want_logits, plain = _decode(model, 12, graph=False)
    got, got_logits, runner = _decode(model, 12, graph=True)
    assert not runner.active and "cpu" in runner.reason and plain.reason == "--no-graph"
    assert got == want and torch.equal(got_logits, want_logits)


def test_buckets_grow_by_powers_of_two_up_to_the_cache():
    assert bucket_for(1, 1 << 20) == MIN_BUCKET == bucket_for(MIN_BUCKET, 1 << 20)
    assert bucket_for(MIN_BUCKET + 1, 1 << 20) == 2 * MIN_BUCKET
    assert bucket_for(5000, 6000) == 6000 and bucket_for(10, 100) == 100


@pytest.mark.parametrize("command", ["bench", "generate", "chat"])
def test_no_graph_flag(command):
    extra = ["-p", "hi"] if command == "generate" else []
    parse = lambda *a: build_parser().parse_args([command, "--model", "m", *extra, *a])  # noqa: E731
    assert parse().no_graph is False
    assert parse("--no-graph").no_graph is True


# ---------------------------------------------------------------- on a GPU

def _gpu_parity(model, steps=20):
    want, want_logits, plain = _decode(model, steps, graph=False)
    for max_len in (None, 4 * MIN_BUCKET):  # the cache just fits (one KV split), and a long one (empty splits)
        got, got_logits, runner = _decode(model, steps, graph=True, max_len=max_len)
        assert runner.active and plain.reason == "--no-graph"
        assert len(runner._graphs) == 1  # captured once, replayed for the other steps
        assert got == want
        assert rel_err(got_logits, want_logits) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_no_graph_all_gpu(model):
    model.to("cuda")
    try:
        _gpu_parity(model)
    finally:
        model.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_no_graph_cpu_experts(tiny_v3):
    from orchestrator.hybrid import attach

    hybrid = load_model(tiny_v3, dtype="float32")
    assert attach(hybrid, fmt="bf16", threads=2) == 2
    _gpu_parity(hybrid.to("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_bf16_model_tokens(tiny_v3):
    """bf16 (the bench's dtype): the same greedy tokens; logits within bf16 rounding of the KV splits."""
    m = load_model(tiny_v3, dtype="bfloat16").to("cuda")
    want, want_logits, _ = _decode(m, 20, graph=False)
    got, got_logits, runner = _decode(m, 20, graph=True)
    assert runner.active and got == want and rel_err(got_logits, want_logits) < 2e-2
