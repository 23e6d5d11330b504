"""Routed experts computed by cpu_experts' JIT kernels, behind the model's experts interface,
and the on-disk cache of their packed buffers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import HmoeError
from .moe import TorchExperts

FORMATS = ("bf16", "q8_0", "q4_0", "q4_k", "q6_k")


class JitExperts(nn.Module):
    """One MoE layer's routed experts in packed CPU memory; forward(hidden[T, H], ids[T, k], w[T, k])."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = self.engine.forward(hidden.float(), topk_ids, topk_weights.float())
        return out.to(hidden.dtype)

    def nbytes_by_device(self) -> dict[str, int]:
        from cpu_experts.packed_cache import nbytes

        return {"cpu": nbytes(self.engine)}


def build(layer: int, fmt: str, reference: TorchExperts, *, threads: int | None = None,
          numa: str | None = None, down_fmt: str | None = None) -> JitExperts:
    """Quantize a layer's loaded reference weights to `fmt` (down_proj to `down_fmt`, default fmt)
    and pack them for the kernels."""
    from cpu_experts.experts import CPUExperts

    try:
        with torch.no_grad():  # as loaded (bf16: half the bytes to a GPU quantizer, no fp32 copy of the layer)
            engine = CPUExperts.from_tensors(reference.gate_proj.detach(), reference.up_proj.detach(),
                                             reference.down_proj.detach(), fmt=fmt, threads=threads,
                                             numa=numa or "interleave", down_fmt=down_fmt)
    except ValueError as e:  # shapes the format cannot hold, e.g. q4_k needs rows of 256
        raise HmoeError(f"routed experts of layer {layer} cannot run as {_formats(fmt, down_fmt)}: {e}") from None
    return JitExperts(engine)


def _formats(fmt: str, down_fmt: str | None) -> str:
    return fmt if down_fmt in (None, fmt) else f"{fmt} (down {down_fmt})"


def build_from_blocks(layer: int, fmt: str, gate, up, down, *, hidden: int, inter: int, threads: int | None = None,
                      numa: str | None = None, down_fmt: str | None = None) -> JitExperts:
    """Pack a layer's experts given as GGUF blocks, gate/up in `fmt` and down in `down_fmt` (default
    fmt), e.g. a GGUF's own bytes: no requantization."""
    from cpu_experts.experts import CPUExperts

    try:
        engine = CPUExperts.from_blocks(gate, up, down, fmt=fmt, down_fmt=down_fmt, hidden=hidden, inter=inter,
                                        threads=threads, numa=numa or "interleave")
    except ValueError as e:
        raise HmoeError(f"routed experts of layer {layer} cannot run as {_formats(fmt, down_fmt)}: {e}") from None
    return JitExperts(engine)


class PackedCache:
    """Packed expert layers of one checkpoint under $HMOE_CACHE_DIR/packed (or ~/.cache/hmoe/packed).

    A layer's file name hashes its checkpoint tensors (file, size, modification time), the formats
    (gate/up and down) and the sources of cpu_experts' quantizer and layout: any change makes a new file. Writing is
    skipped, with one notice, when the disk would keep less than 10% free."""

    def __init__(self, root: str | Path | None = None):
        base = os.environ.get("HMOE_CACHE_DIR") or Path.home() / ".cache" / "hmoe"
        self.root = Path(root) if root else Path(base) / "packed"
        self._warned = False

    def path(self, fingerprint: str, layer: int, fmt: str, down_fmt: str | None = None) -> Path:
        formats = [fmt] if down_fmt in (None, fmt) else [fmt, down_fmt]
        key = hashlib.sha256(json.dumps([fingerprint, layer, *formats, _code_version()]).encode()).hexdigest()[:32]
        return self.root / f"layer{layer}-{'-'.join(formats)}-{key}.bin"

    def load(self, path: Path, *, fmt: str, num_experts: int, hidden: int, inter: int, threads, numa,
             down_fmt: str | None = None):
        from cpu_experts import packed_cache

        engine = packed_cache.load(path, fmt=fmt, down_fmt=down_fmt, num_experts=num_experts, hidden=hidden,
                                   inter=inter, threads=threads, numa=numa or "interleave")
        return JitExperts(engine) if engine is not None else None

    def save(self, path: Path, experts: JitExperts) -> None:
        from cpu_experts import packed_cache

        size = packed_cache.nbytes(experts.engine)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(self.root)
            if disk.free - size < disk.total // 10:
                self._notice(f"not caching packed experts in {self.root}: the disk would keep less than 10% free")
                return
            packed_cache.save(experts.engine, path)
        except OSError as e:
            self._notice(f"not caching packed experts in {self.root}: {e}")

    def _notice(self, text: str) -> None:
        if not self._warned:
            print(f"hmoe: {text}", file=sys.stderr)
            self._warned = True


def _code_version() -> str:
    """The sources that decide the packed bytes: a change there invalidates every cached file."""
    import cpu_experts

    root = Path(cpu_experts.__file__).parent
    h = hashlib.sha256()
    for name in ("formats.py", "layout.py", "packed_cache.py"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]
