"""Parity with Hugging Face transformers' DeepSeek V2/V3 on random tiny models (fp32)."""

import pytest
import torch

from runtime.generate import Generator
from runtime.loader import load_model
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

from .conftest import hf_logits, make_hf_model, prompt, rel_err


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
@pytest.mark.parametrize("fixture", ["hf_v3", "hf_v2"])
def test_full_sequence_logits_match_transformers(fixture, form, request):
    ref, path = request.getfixturevalue(fixture)
    model = load_model(path, dtype="float32")
    ids = prompt()
    ours = model(ids, cache=model.new_cache(batch=1, max_len=64), form=form)
    assert rel_err(ours, hf_logits(ref, ids)) <= 1e-4


def test_v2_group_limited_greedy_matches_transformers(tmp_path):
    ref = make_hf_model("v2", tmp_path, seed=3, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    model = load_model(tmp_path, dtype="float32")
    ids = prompt(seed=5)
    assert rel_err(model(ids, cache=model.new_cache(batch=1, max_len=64)), hf_logits(ref, ids)) <= 1e-4


@pytest.mark.parametrize("fixture", ["hf_v3", "hf_v2"])
def test_prefill_then_decode_equals_one_forward(fixture, request):
    _, path = request.getfixturevalue(fixture)
    model = load_model(path, dtype="float32")
    ids = prompt(20, seed=2)
    full = model(ids, cache=model.new_cache(batch=1, max_len=32))
    cache = model.new_cache(batch=1, max_len=32)
    steps = [model(ids[:, :8], cache=cache, start_pos=0, form="decompressed")]
    steps += [model(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(8, 20)]
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_batched_rows_are_independent(hf_v3):
    _, path = hf_v3
    model = load_model(path, dtype="float32")
    a, b = prompt(12, seed=3), prompt(12, seed=4)
    both = model(torch.cat([a, b]), cache=model.new_cache(batch=2, max_len=16))
    alone = model(b, cache=model.new_cache(batch=1, max_len=16))
    assert rel_err(both[1:], alone) <= 1e-5


@pytest.mark.parametrize("fixture", ["hf_v3", "hf_v2"])
def test_32_greedy_tokens_identical_to_transformers_generate(fixture, request):
    ref, path = request.getfixturevalue(fixture)
    ours, theirs = greedy_tokens(ref, path, prompt(10, seed=7), 32)
    assert ours == theirs


def greedy_tokens(ref, path, ids: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens after `ids` from hmoe's Generator and from transformers' generate (no EOS stop)."""
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = Generator(load_model(path, dtype="float32"), Tokenizer(path), max_context=128)
    gen.tokenizer.eos_ids = frozenset()  # transformers was told not to stop either
    list(gen.stream(ids[0].tolist(), SamplingParams(temperature=0, max_tokens=n)))
    return gen.stats.token_ids, expected[0, ids.shape[1]:].tolist()


def test_bf16_model_stays_close_to_fp32(hf_v3):
    _, path = hf_v3
    ids = prompt()
    ref = load_model(path, dtype="float32")
    bf16 = load_model(path, dtype="bfloat16")
    a = ref(ids, cache=ref.new_cache(batch=1, max_len=32))
    b = bf16(ids, cache=bf16.new_cache(batch=1, max_len=32), form="absorbed")
    assert rel_err(b, a) < 5e-2
