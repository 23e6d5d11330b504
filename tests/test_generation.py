"""Sampling, streaming, stop strings, chat-turn cache reuse and the context limit."""

import pytest
import torch

from runtime.errors import ContextLimitError, HmoeError
from runtime.generate import Generator, _safe_prefix_len
from runtime.loader import load_model
from runtime.sampling import SamplingParams, sample
from runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gen(tiny_v3):
    model = load_model(tiny_v3, dtype="float32")
    return Generator(model, Tokenizer(tiny_v3, model.cfg.eos_token_ids), max_context=96)


def run(gen, text="Hello there", **params):
    ids = gen.tokenizer.encode(text)
    gen.reset()
    pieces = list(gen.stream(ids, SamplingParams(**params)))
    return pieces, gen.stats


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0), None) == 1
    assert {sample(logits, SamplingParams(temperature=5, top_k=1), gen) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(temperature=5, top_p=0.01), gen) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(temperature=1, top_k=2), gen) for _ in range(200)} == {1, 2}
    with pytest.raises(HmoeError, match="top-p"):
        SamplingParams(top_p=0)


def test_seed_makes_sampling_repeatable(gen):
    a = run(gen, temperature=1.0, seed=5, max_tokens=12)[1].token_ids
    b = run(gen, temperature=1.0, seed=5, max_tokens=12)[1].token_ids
    c = run(gen, temperature=1.0, seed=6, max_tokens=12)[1].token_ids
    assert a == b and a != c


def test_streamed_pieces_are_the_decoded_text(gen):
    pieces, stats = run(gen, max_tokens=20)
    assert len(pieces) > 1 and stats.finish_reason == "length" and stats.generated_tokens == 20
    assert "".join(pieces) == gen.tokenizer.decode(stats.token_ids)


def test_stop_string_ends_the_reply_before_it(gen):
    full = "".join(run(gen, max_tokens=30)[0])
    stop = full[10:14]
    pieces, stats = run(gen, max_tokens=30, stop=(stop,))
    assert stats.finish_reason == "stop" and "".join(pieces) == full[: full.index(stop)]


def test_partial_stop_strings_and_characters_are_held_back():
    assert _safe_prefix_len("abc<|en", ("<|end|>",)) == 3
    assert _safe_prefix_len("abc\ufffd", ()) == 3


def test_eos_stops_generation(gen):
    pieces, stats = run(gen, max_tokens=8)
    first = stats.token_ids[0]
    gen.tokenizer.eos_ids = frozenset({first})
    try:
        pieces, stats = run(gen, max_tokens=8)
    finally:
        gen.tokenizer.eos_ids = frozenset({1})
    assert stats.finish_reason == "eos" and stats.token_ids == [] and pieces == []


def test_context_limit(gen):
    with pytest.raises(ContextLimitError, match="the prompt has 120 tokens; the context limit is 96"):
        list(gen.stream([5] * 120, SamplingParams()))
    _, stats = run(gen, text="word " * 40, max_tokens=500)
    assert stats.finish_reason == "context" and stats.prompt_tokens + stats.generated_tokens == 97


def test_chat_turn_reuses_the_cached_prefix(gen):
    gen.reset()
    tok = gen.tokenizer
    history = [{"role": "user", "content": "Hello"}]
    reply = "".join(gen.stream(tok.encode_chat(history), SamplingParams(max_tokens=6)))
    first = list(gen.stats.token_ids)
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    ids = tok.encode_chat(history)
    list(gen.stream(ids, SamplingParams(max_tokens=6)))
    assert gen.stats.prefilled_tokens < len(ids)
    # the same turn from an empty cache gives the same tokens
    second = list(gen.stats.token_ids)
    gen.reset()
    list(gen.stream(ids, SamplingParams(max_tokens=6)))
    assert gen.stats.token_ids == second and first


def test_chat_template_renders_like_deepseek(tiny_v3):
    tok = Tokenizer(tiny_v3)
    text = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}])
    assert text == "<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜><｜User｜>Q<｜Assistant｜>"
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode("Hi")[0] == tok.bos_id


def test_v32_context_is_not_capped_at_index_topk(tmp_path):
    from runtime.make_model import write_model

    path = write_model(tmp_path, "tiny-v32", dtype="fp32", progress=False)
    model = load_model(path, dtype="float32")
    gen = Generator(model, Tokenizer(path), max_context=4096)  # DSA runs past index_topk (tests/test_dsa_parity.py)
    assert gen.max_context == model.cfg.max_position_embeddings > model.cfg.index_topk
