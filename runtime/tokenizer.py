"""Tokenizer (`tokenizer.json` through `tokenizers`) and chat template (`tokenizer_config.json`,
rendered with jinja2 the way transformers renders it)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import HmoeError


class TokenizerError(HmoeError):
    pass


def _token_text(value) -> str | None:
    """Special tokens are written either as strings or as AddedToken dicts with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()):
        model_dir = Path(model_dir)
        if model_dir.suffix.lower() == ".gguf":  # tokenizer.ggml.* and tokenizer.chat_template
            from .gguf_file import open_gguf
            from .gguf_tokenizer import tokenizer_from_gguf

            self.tok, self.config = tokenizer_from_gguf(open_gguf(model_dir))
        else:
            self.tok, self.config = self._load_files(model_dir)
        self.special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._id(self.special["bos_token"])
        self.add_bos = bool(self.config.get("add_bos_token", self.bos_id is not None))
        eos = set(eos_token_ids)
        if self._id(self.special["eos_token"]) is not None:
            eos.add(self._id(self.special["eos_token"]))
        self.eos_ids = frozenset(eos)
        self.chat_template = self._load_template(model_dir, self.config)

    @staticmethod
    def _load_files(model_dir: Path) -> tuple[HFTokenizer, dict]:
        file = model_dir / "tokenizer.json"
        if not file.exists():
            raise TokenizerError(f"{file}: no such file (hmoe reads Hugging Face tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{file}: cannot be read as a tokenizer ({e})") from None
        config_file = model_dir / "tokenizer_config.json"
        return tok, json.loads(config_file.read_text()) if config_file.exists() else {}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @staticmethod
    def _load_template(model_dir: Path, config: dict) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"  # transformers >= 4.43 may save it apart
        if jinja_file.exists():
            return jinja_file.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json 'chat_template'); "
                                 "use `hmoe generate` for plain text")
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **{k: v for k, v in self.special.items() if v is not None})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes the BOS token itself, as transformers' apply_chat_template assumes.
        return self.encode(self.render_chat(messages), add_bos=False)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers uses for chat templates (trim/lstrip blocks, loop controls)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
