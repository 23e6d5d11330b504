"""Prefill then decode over the latent cache, with streaming text, stop strings and a context limit.

The cache persists across calls: a prompt that extends the previous conversation (a chat turn)
only prefills its new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import ContextLimitError
from .graph import DecodeGraphs
from .model import DeepseekForCausalLM
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""  # "eos", "stop", "length", "context", "interrupted"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill's logits; the rest cost one step each
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


class Generator:
    def __init__(self, model: DeepseekForCausalLM, tokenizer: Tokenizer, max_context: int | None = None,
                 prefill_chunk: int = 2048, graph: bool = True):
        self.model, self.tokenizer = model, tokenizer
        limit = model.cfg.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache(batch=1, max_len=self.max_context)
        self.decode = DecodeGraphs(model, self.cache, enabled=graph)  # decode steps; eager where graphs cannot run
        self.cached_ids: list[int] = []
        self.stats = Stats()

    def reset(self) -> None:
        self.cached_ids = []

    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        device = self.model.lm_head.weight.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        if len(ids) == 1:
            return self.decode.step(x, start)[0, -1]
        return self.model(x, cache=self.cache, start_pos=start, last_only=True)[0, -1]

    def _prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        reuse = 0
        for a, b in zip(self.cached_ids, prompt_ids[:-1]):  # recompute at least the last prompt token
            if a != b:
                break
            reuse += 1
        logits = None
        for start in range(reuse, len(prompt_ids), self.prefill_chunk):
            logits = self._forward(prompt_ids[start:start + self.prefill_chunk], start)
        self.cached_ids = list(prompt_ids)
        self.stats.prefilled_tokens = len(prompt_ids) - reuse
        return logits

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text pieces as they are produced; `self.stats` holds counts and times after."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_context:
            raise ContextLimitError(f"the prompt has {len(prompt_ids)} tokens; the context limit is "
                                    f"{self.max_context} (set --ctx, or shorten the prompt / /reset the chat)")
        self.stats = stats = Stats(prompt_tokens=len(prompt_ids))
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        t0 = time.perf_counter()
        logits = self._prefill(prompt_ids)
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_ids: list[int] = []
        emitted = ""  # text already yielded
        try:
            while True:
                token = sample(logits, params, gen)
                if token in self.tokenizer.eos_ids:
                    stats.finish_reason = "eos"
                    break
                out_ids.append(token)
                text = self.tokenizer.decode(out_ids)
                cut = _stop_position(text, params.stop)
                if cut is not None:
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    stats.finish_reason = "stop"
                    break
                safe = _safe_prefix_len(text, params.stop)
                if safe > len(emitted):
                    yield text[len(emitted):safe]
                    emitted = text[:safe]
                if len(out_ids) >= params.max_tokens:
                    stats.finish_reason = "length"
                    break
                position = len(self.cached_ids)
                if position >= self.max_context:
                    stats.finish_reason = "context"
                    break
                logits = self._forward([token], position)
                self.cached_ids.append(token)
            if stats.finish_reason in ("eos", "length", "context"):
                tail = self.tokenizer.decode(out_ids)
                if len(tail) > len(emitted) and not tail.endswith("\ufffd"):
                    yield tail[len(emitted):]
        except KeyboardInterrupt:
            stats.finish_reason = "interrupted"
        finally:
            stats.decode_s = time.perf_counter() - t0
            stats.generated_tokens = len(out_ids)
            stats.token_ids = out_ids  # self.cached_ids lists exactly the tokens whose latents are cached


def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: hold back a trailing partial character (U+FFFD from an
    incomplete UTF-8 sequence) and any tail that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
