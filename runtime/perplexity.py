"""Perplexity over a text file, computed the way llama-perplexity does.

The text is cut into chunks of `ctx` tokens; each chunk is evaluated from an empty cache (first
token replaced by BOS) and only its second half is scored, so every scored token sees at least
ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import HmoeError
from .model import DeepseekForCausalLM


@dataclass
class PerplexityResult:
    ppl: float
    uncertainty: float  # one standard error, propagated to PPL
    tokens_scored: int
    chunk_ppls: list[float]


def chunk_perplexities(model: DeepseekForCausalLM, tokens: list[int], ctx: int, bos_id: int | None,
                       max_chunks: int | None = None) -> Iterator[tuple[int, float, PerplexityResult]]:
    """Yield (chunk number, running PPL, result so far) after each chunk."""
    if ctx < 4:
        raise HmoeError(f"--ctx must be at least 4, got {ctx}")
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise HmoeError(f"the text has {len(tokens)} tokens; perplexity needs at least --ctx={ctx}")
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    cache = model.new_cache(batch=1, max_len=ctx)
    device = model.lm_head.weight.device
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    chunk_ppls = []
    for i in range(n_chunks):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        x = torch.tensor([chunk], device=device)
        logits = model(x, cache=cache, start_pos=0)[0]  # [ctx, V] fp32
        logprobs = logits[first - 1:-1].log_softmax(dim=-1)
        nll = -logprobs.gather(1, x[0, first:, None]).squeeze(1).double()
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.numel()
        chunk_ppls.append(math.exp(float(nll.mean())))
        mean = nll_sum / count
        var = max(nll2_sum / count - mean * mean, 0.0)
        unc = math.sqrt(var / (count - 1)) if count > 1 else float("nan")
        ppl = math.exp(mean)
        yield i + 1, ppl, PerplexityResult(ppl, ppl * unc, count, chunk_ppls)
