"""Routing statistics: how often each routed expert of each MoE layer was chosen, the file that
`hmoe bench --collect-routing FILE` writes and `gpu_experts: {routing: FILE}` reads to keep the
most used experts of each layer on the GPU.

The file (JSON, schema in docs/rules.md):

    {"format": "hmoe-routing/1", "model": "v2l4", "fingerprint": "...",   # fingerprint: null if unknown
     "n_routed_experts": 64, "top_k": 6, "num_hidden_layers": 4,
     "layers": {"1": {"tokens": 1290, "counts": [64 ints]}, ...}}       # one entry per MoE layer

`tokens` is how many token rows the layer's router saw (prefill and decode); each row chooses
top_k experts, so the counts of a layer sum to tokens × top_k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runtime.errors import HmoeError

FORMAT = "hmoe-routing/1"


@dataclass(frozen=True)
class RoutingStats:
    source: str
    n_routed_experts: int
    top_k: int
    counts: dict[int, tuple[int, ...]]  # MoE layer -> times each expert was chosen
    tokens: dict[int, int]

    def most_used(self, layer: int, n: int) -> tuple[int, ...]:
        """The n most chosen experts of `layer`, ascending ids (ties go to the lower id)."""
        if layer not in self.counts:
            raise HmoeError(f"{self.source}: no routing statistics for layer {layer} (the file has layers "
                            f"{', '.join(map(str, sorted(self.counts)))}); collect them on this model")
        counts = self.counts[layer]
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        return tuple(sorted(ranked[:n]))


def document(*, model: str, fingerprint: str | None, n_routed_experts: int, top_k: int, num_hidden_layers: int,
             counts: dict[int, list[int]], tokens: dict[int, int]) -> dict:
    return {"format": FORMAT, "model": model, "fingerprint": fingerprint, "n_routed_experts": n_routed_experts,
            "top_k": top_k, "num_hidden_layers": num_hidden_layers,
            "layers": {str(i): {"tokens": tokens[i], "counts": list(counts[i])} for i in sorted(counts)}}


def load_routing(path: str | Path, *, n_routed_experts: int) -> RoutingStats:
    """Read and check a statistics file against the model's expert count; one-line errors."""
    path = Path(path)
    return _load(str(path.resolve()) if path.exists() else str(path), n_routed_experts)


@lru_cache(maxsize=8)  # a plan asks once per layer
def _load(path: str, n_routed_experts: int) -> RoutingStats:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HmoeError(f"{path}: no such routing statistics file (write one with "
                        f"`hmoe bench --model DIR --collect-routing FILE`)") from None
    except (OSError, ValueError) as e:
        raise HmoeError(f"{path}: not a routing statistics file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HmoeError(f"{path}: not a routing statistics file (expected \"format\": \"{FORMAT}\")")
    if doc.get("n_routed_experts") != n_routed_experts:
        raise HmoeError(f"{path}: statistics of a model with {doc.get('n_routed_experts')} routed experts per layer; "
                        f"this model has {n_routed_experts}")
    counts, tokens = {}, {}
    for key, entry in (doc.get("layers") or {}).items():
        c = entry.get("counts") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(c, list) or len(c) != n_routed_experts or \
                not all(isinstance(x, int) and x >= 0 for x in c):
            raise HmoeError(f"{path}: layer '{key}' must hold 'counts', {n_routed_experts} non-negative integers")
        counts[int(key)], tokens[int(key)] = tuple(c), int(entry.get("tokens", 0))
    if not counts:
        raise HmoeError(f"{path}: the file holds no layers")
    return RoutingStats(path, n_routed_experts, int(doc.get("top_k", 0)), counts, tokens)
