"""Kimi-K2 GGUFs: the 'kimi-k2' pre-tokenizer (Moonshot's tiktoken pattern) and a Kimi-K2-shaped
deepseek2 config (384 experts, one group, sigmoid, one dense layer, scale 2.827)."""
import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

from runtime.config import load_config
from runtime.gguf_file import GGUFFile
from runtime.gguf_tokenizer import KIMI_K2_PATTERN, GGUFTokenizerError, tokenizer_from_gguf
from runtime.loader import load_model
from runtime.make_model import preset_config
from tests.test_gguf import llama_cpp_gguf, logits, write_hf

SAMPLES = {  # what Moonshot's pattern splits them into (checked by hand against the pattern)
    "中文English混合": ["中文", "English", "混合"],
    "getUserName iPhone HELLO's": ["get", "User", "Name", " i", "Phone", " HELLO's"],
    "北京市 Pascal 12345678 !!\n\n  x": ["北京市", " Pascal", " ", "123", "456", "78", " !!\n\n", " ", " x"],
    "价格是100元！好吗？\n\nOK": ["价格是", "100", "元", "！", "好吗", "？\n\n", "OK"],
    "They'RE here's  \t\n a   b\r\n": ["They'RE", " here's", "  \t\n", " a", "  ", " b", "\r\n"],
    "日本語のテキスト、カタカナ": ["日本語", "のテキスト", "、カタカナ"],
}


def kimi_gguf(path, pre="kimi-k2"):
    """A small byte-level BPE vocabulary, written as llama.cpp writes Kimi-K2's: model gpt2, pre kimi-k2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = " ".join(SAMPLES) + " 汉字汉字 world worlds 2025年 can't"
    tok.train_from_iterator([text] * 3, trainers.BpeTrainer(vocab_size=360, special_tokens=["[BOS]", "[EOS]"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    data = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(data["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_kimi_k2_pre_tokenizer_splits_as_the_pattern_and_round_trips(tmp_path):
    tok, config = tokenizer_from_gguf(GGUFFile(kimi_gguf(tmp_path / "k.gguf")))
    assert (config["bos_token"], config["eos_token"]) == ("[BOS]", "[EOS]")
    try:
        import regex
        pattern = regex.compile(KIMI_K2_PATTERN, regex.V1)  # an independent engine with class intersection
    except ImportError:
        pattern = None
    for text, expected in SAMPLES.items():
        pieces = [tok.decoder.decode([p]) for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]  # from byte-level
        assert pieces == expected, (text, pieces)
        if pattern is not None:
            assert pattern.findall(text) == expected
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == [i for piece in expected for i in tok.encode(piece, add_special_tokens=False).ids]
        assert tok.decode(ids) == text
    mixed = "Kimi说：1+1=2, isn't it?\n\n\t中文 mixed 文本  end "
    assert tok.decode(tok.encode(mixed, add_special_tokens=False).ids) == mixed


def test_unknown_pre_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(GGUFTokenizerError, match=r"'tokenizer.ggml.pre' is 'kimi-k9'; hmoe knows .*kimi-k2"):
        tokenizer_from_gguf(GGUFFile(kimi_gguf(tmp_path / "k.gguf", pre="kimi-k9")))


@pytest.mark.parametrize("q_lora", [True, False])
def test_kimi_k2_shaped_config_loads_and_matches_safetensors(tmp_path, q_lora):
    raw = {**preset_config("tiny-v3", layers=2), "n_routed_experts": 384, "num_experts_per_tok": 8, "n_group": 1,
           "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "first_k_dense_replace": 1,
           "routed_scaling_factor": 2.827, "norm_topk_prob": True, "torch_dtype": "float32",
           "q_lora_rank": 48 if q_lora else None, "moe_intermediate_size": 16}
    hf = write_hf(tmp_path / "kimi", raw, seed=3)
    (path,) = llama_cpp_gguf(hf, tmp_path / "kimi.gguf")
    cfg = load_config(path)
    assert cfg == load_config(hf)
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.scoring_func, cfg.first_k_dense_replace,
            cfg.routed_scaling_factor, cfg.q_lora_rank) == (384, 1, 1, "sigmoid", 1, 2.827, 48 if q_lora else None)
    ref, ours = load_model(hf, dtype="float32"), load_model(path)
    assert torch.equal(logits(ours), logits(ref))
