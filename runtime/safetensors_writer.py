"""Write safetensors files tensor by tensor (header first, then data), sharded with an index.

Nothing is held in memory beyond the tensor being written, so a 31 GB checkpoint needs
about the memory of its largest tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DTYPES, INDEX_FILE

ST_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


class ShardWriter:
    """Writes one safetensors file whose tensors arrive in the order of `specs`."""

    def __init__(self, path: Path, specs: list[TensorSpec]):
        header, offset = {}, 0
        for s in specs:
            header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.pending = [s.name for s in specs]

    def begin(self, name: str) -> None:
        """Start tensor `name`; its bytes follow through one or more `write` calls, in row order."""
        assert self.pending and self.pending[0] == name, f"expected {self.pending[:1]}, got {name}"
        self.pending.pop(0)

    def write(self, part: torch.Tensor) -> None:
        self.file.write(part.contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        assert not self.pending, f"tensors never written: {self.pending[:3]}"
        self.file.close()


def write_index(out_dir: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    weight_map = {s.name: name for shard, name in zip(shards, names) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
