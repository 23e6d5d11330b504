"""The tokenizer of a GGUF (`tokenizer.ggml.*`: gpt2-style byte-level BPE with merges) as a
`tokenizers` Tokenizer plus the tokenizer_config entries hmoe reads (special tokens, add_bos,
`tokenizer.chat_template`), and the reverse: tokenizer.json into GGUF metadata.

llama.cpp names the pre-tokenizer (`tokenizer.ggml.pre`) instead of storing its regexes; the
regexes below are llama.cpp's (llama-vocab.cpp) for the names DeepSeek models use, which are
the Split patterns of the models' own tokenizer.json files, and Kimi-K2's tiktoken pattern
('kimi-k2'). Another name is a one-line error naming the ones hmoe knows.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import HmoeError
from .gguf_file import GGUFFile

# Cased letters as DeepSeek-LLM's tokenizer lists them (written as code point ranges).
_LETTERS = "".join(f"{chr(a)}-{chr(b)}" if a != b else chr(a) for a, b in (
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
    (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
    (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC),
    (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3),
    (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3),
    (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943)))

# Kimi-K2's tiktoken pattern (Moonshot's tokenization_kimi.py `pat_str`): Han runs on their own,
# Han removed from the letter classes (`&&`, which Oniguruma, the `tokenizers` regex engine, reads
# as class intersection), cased words split at case changes with optional contractions, digits in
# threes. llama.cpp matches it with a hand-written splitter; we run the pattern itself.
_KIMI_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_K2_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}*{_KIMI_LETTERS_LOWER}+{_CONTRACTIONS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}+{_KIMI_LETTERS_LOWER}*{_CONTRACTIONS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# tokenizer.ggml.pre -> Split regexes (each "Isolated"), followed by byte-level without its own regex
PRE_TOKENIZERS = {
    "kimi-k2": [KIMI_K2_PATTERN],
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+"
        "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[" + _LETTERS + "]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ],
}
GPT2 = "gpt2"  # byte-level BPE with GPT-2's own regex
SUPPORTED = (GPT2, *PRE_TOKENIZERS)


class GGUFTokenizerError(HmoeError):
    pass


def pre_tokenizer(name: str, source) -> pre_tokenizers.PreTokenizer:
    if name == GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(f"{source}: key 'tokenizer.ggml.pre' is {name!r}; hmoe knows {', '.join(SUPPORTED)}")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in PRE_TOKENIZERS[name]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(f: GGUFFile) -> tuple[Tokenizer, dict]:
    """(tokenizer, tokenizer_config-style dict) from a GGUF's metadata."""
    kind = f.get("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise GGUFTokenizerError(f"{f.path}: key 'tokenizer.ggml.model' is {kind!r}; hmoe reads 'gpt2' "
                                 f"(byte-level BPE, as DeepSeek's GGUFs use)")
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type", None) or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"{f.path}: key 'tokenizer.ggml.token_type' has {len(types)} entries for "
                                 f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [_pair(m, f.path) for m in f.get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer(f.get("tokenizer.ggml.pre", GPT2), f.path)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == TokenType.CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == TokenType.USER_DEFINED])

    def text(key):
        i = f.get(key, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "bos_token": text("tokenizer.ggml.bos_token_id"), "eos_token": text("tokenizer.ggml.eos_token_id"),
        "pad_token": text("tokenizer.ggml.padding_token_id"), "unk_token": text("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", f.get("tokenizer.ggml.bos_token_id", None) is not None)),
        "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": f.get("tokenizer.chat_template", None),
    }
    return tok, config


def _pair(merge: str, source) -> tuple[str, str]:
    cut = merge.find(" ", 1)  # as llama.cpp: a token never starts with the separator
    if cut < 0:
        raise GGUFTokenizerError(f"{source}: merge {merge!r} in 'tokenizer.ggml.merges' is not two tokens")
    return merge[:cut], merge[cut + 1:]


def save_hf_tokenizer(f: GGUFFile, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of a GGUF's tokenizer into `out`."""
    tok, config = tokenizer_from_gguf(f)
    tok.save(str(out / "tokenizer.json"))
    config = {k: v for k, v in config.items() if v is not None}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def add_tokenizer(w: GGUFWriter, model_dir: Path, vocab_size: int, bos_id: int | None, eos_id: int | None) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template from a model directory's tokenizer files."""
    file = model_dir / "tokenizer.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GGUFTokenizerError(f"{file}: cannot be read ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFTokenizerError(f"{file}: model type {model.get('type')!r}; GGUF 'gpt2' tokenizers are byte-level BPE")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise GGUFTokenizerError(f"{file}: token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding has rows the tokenizer never produces, as llama.cpp pads
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(TokenType.NORMAL if i not in added else
                     TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(data.get("pre_tokenizer"), file))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def token_id(key):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if value is not None else None

    for key, value in (("bos", bos_id if bos_id is not None else token_id("bos_token")),
                       ("eos", eos_id if eos_id is not None else token_id("eos_token")),
                       ("padding", token_id("pad_token")), ("unknown", token_id("unk_token"))):
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.add_add_bos_token(bool(config.get("add_bos_token", bos_id is not None)))
    w.add_add_eos_token(bool(config.get("add_eos_token", False)))
    template = _chat_template(model_dir, config)
    if template:
        w.add_chat_template(template)


def _pre_name(spec: dict | None, file: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, if it is one that name stands for exactly."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return GPT2
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        last = parts[-1] if parts else {}
        splits = [p.get("pattern", {}).get("Regex") for p in parts[:-1] if p.get("type") == "Split"]
        if last.get("type") == "ByteLevel" and not last.get("use_regex", True) and len(splits) == len(parts) - 1:
            for name, regexes in PRE_TOKENIZERS.items():
                if splits == regexes:
                    return name
    raise GGUFTokenizerError(f"{file}: its pre-tokenizer is none that a GGUF can name (hmoe writes "
                             f"{', '.join(SUPPORTED)})")


def _chat_template(model_dir: Path, config: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
