"""DeepSeek-V3.2 (DSA) parity with transformers' DeepseekV32ForCausalLM on random tiny models (fp32),
with index_topk well below the sequence length so that the sparse paths decide the result."""

from pathlib import Path

import pytest
import torch

from runtime.loader import load_model
from runtime.make_model import write_model, write_tokenizer

from .conftest import V3_KWARGS, hf_logits, prompt, randomize_, rel_err
from .test_parity_hf import greedy_tokens

TOPK = 8
# 16 indexer heads: an index score is exactly 0 only if all heads' ReLUs are 0 (odds 2**-16), so
# top-k ties, which two implementations may break differently, stay improbable.
V32_KWARGS = dict(V3_KWARGS, index_n_heads=16, index_head_dim=16, index_topk=TOPK)


@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    path = tmp_path_factory.mktemp("hf_v32")
    torch.manual_seed(0)
    ref = DeepseekV32ForCausalLM(DeepseekV32Config(**V32_KWARGS)).eval()
    randomize_(ref, seed=0)
    ref.save_pretrained(path)
    write_tokenizer(path, max_vocab=ref.config.vocab_size)
    return ref, path


def dense(model):
    """The same model with the indexer selecting every key (plain MLA)."""
    for layer in model.model.layers:
        layer.self_attn.indexer.topk = 1 << 30
    return model


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_full_sequence_logits_match_transformers(hf_v32, form):
    ref, path = hf_v32
    model = load_model(path, dtype="float32")
    ids = prompt(40)
    expected = hf_logits(ref, ids)
    ours = model(ids, cache=model.new_cache(batch=1, max_len=64), form=form)
    assert rel_err(ours, expected) <= 1e-4
    plain = dense(model)(ids, cache=model.new_cache(batch=1, max_len=64), form=form)
    assert rel_err(plain[:, TOPK:], expected[:, TOPK:]) > 1e-2  # sparsity changed the result
    assert rel_err(plain[:, :TOPK], expected[:, :TOPK]) <= 1e-4  # up to top-k keys: dense == DSA


def test_chunked_prefill_then_decode_matches_transformers(hf_v32):
    ref, path = hf_v32
    model = load_model(path, dtype="float32")
    ids = prompt(36, seed=2)
    cache = model.new_cache(batch=1, max_len=64)
    steps = [model(ids[:, :6], cache=cache, start_pos=0, form="decompressed"),  # within top-k: dense path
             model(ids[:, 6:20], cache=cache, start_pos=6, form="decompressed"),  # masked prefill past a prefix
             model(ids[:, 20:24], cache=cache, start_pos=20, form="absorbed")]  # gathered, several queries
    steps += [model(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(24, 36)]  # decode
    assert rel_err(torch.cat(steps, dim=1), hf_logits(ref, ids)) <= 1e-4


def test_greedy_tokens_identical_to_transformers_generate(hf_v32):
    ref, path = hf_v32
    ours, theirs = greedy_tokens(ref, path, prompt(12, seed=7), 24)
    assert ours == theirs


def test_make_model_tiny_v32_loads_in_transformers(tmp_path):
    """make-model writes the indexer under transformers' names, and both agree past index_topk (64)."""
    from transformers import DeepseekV32ForCausalLM

    path = write_model(tmp_path, "tiny-v32", dtype="fp32", progress=False)
    ref = DeepseekV32ForCausalLM.from_pretrained(Path(path), dtype=torch.float32).eval()
    model = load_model(path, dtype="float32")
    ids = prompt(80, seed=3, vocab=1024)
    ours = model(ids, cache=model.new_cache(batch=1, max_len=96))
    assert rel_err(ours, hf_logits(ref, ids)) <= 1e-4
