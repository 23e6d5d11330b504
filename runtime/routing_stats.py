"""Collecting routing statistics (`--collect-routing FILE` on `hmoe bench` and `hmoe generate`):
how often each routed expert of each MoE layer is chosen, counted on the router's device without
a host sync, written in placement/routing.py's format."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from placement.routing import FORMAT, document

from .errors import HmoeError
from .moe import MoE


class RoutingCounter:
    """Forward hooks on every MoE layer's router while open; `write(path)` adds the counts to the file.

    Counts every token row each router sees: prompts (prefill), decode steps, and warm-ups. The hook
    only enqueues a scatter-add into a per-layer tensor and tokens are derived from the counts (each
    row chooses top_k experts), so a CUDA graph captured while the counter is attached counts on
    every replay; one captured before it was attached runs no hook and counts nothing."""

    def __init__(self, model):
        self.cfg = model.cfg
        self.counts: dict[int, torch.Tensor] = {}
        self.layers: list[int] = []
        self._handles = []
        for i, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, MoE):
                self.layers.append(i)
                self._handles.append(layer.mlp.gate.register_forward_hook(functools.partial(self._count, i)))
        if not self._handles:
            raise HmoeError("the model has no MoE layers: there is no routing to collect")

    def _count(self, layer: int, module, args, output) -> None:
        _, ids = output
        flat = ids.reshape(-1)
        counts = self.counts.get(layer)
        if counts is None:
            counts = self.counts[layer] = torch.zeros(self.cfg.n_routed_experts, dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # no host sync (bincount would size on the host)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def result(self, *, model: str, fingerprint: str | None) -> dict:
        E, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        counts = {i: (self.counts[i].tolist() if i in self.counts else [0] * E) for i in self.layers}
        tokens = {i: sum(c) // k for i, c in counts.items()}
        return document(model=model, fingerprint=fingerprint, n_routed_experts=E, top_k=k,
                        num_hidden_layers=self.cfg.num_hidden_layers, counts=counts, tokens=tokens)

    def write(self, path: str | Path, *, model: str, fingerprint: str | None) -> dict:
        """Write the counts to `path`, added to those already there for the same model; returns the file's doc."""
        doc = self.result(model=model, fingerprint=fingerprint)
        path = Path(path)
        if path.exists():
            doc = _merge(path, doc)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return doc


def _merge(path: Path, doc: dict) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HmoeError(f"{path}: exists and is not a routing statistics file ({e}); remove it or choose another "
                        f"--collect-routing file") from None
    same = isinstance(old, dict) and old.get("format") == FORMAT and all(
        old.get(k) == doc[k] for k in ("fingerprint", "n_routed_experts", "top_k", "num_hidden_layers"))
    if not same:
        raise HmoeError(f"{path}: holds routing statistics of another model (or is another kind of file); "
                        f"remove it or choose another --collect-routing file")
    for key, entry in doc["layers"].items():
        prev = old["layers"].get(key, {"tokens": 0, "counts": [0] * len(entry["counts"])})
        entry["tokens"] += prev["tokens"]
        entry["counts"] = [a + b for a, b in zip(entry["counts"], prev["counts"])]
    return doc


def model_fingerprint(model_dir: str | Path) -> str | None:
    """A short id of the checkpoint's files (path, size, mtime), or None when it cannot tell."""
    from .checkpoint import Checkpoint
    from .config import load_config

    try:
        if Path(model_dir).suffix.lower() == ".gguf":
            p = Path(model_dir).resolve()
            text = json.dumps([str(p), p.stat().st_size, p.stat().st_mtime_ns])
        else:
            ckpt = Checkpoint(model_dir, load_config(model_dir).fp8_block_size)
            text = ckpt.fingerprint(list(ckpt.file_of))
    except Exception:  # a statistics file without a fingerprint is still useful
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]
