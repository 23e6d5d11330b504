"""Lazy safetensors reading: one file or shards (`model.safetensors.index.json`), tensor by tensor.

Headers are checked against file sizes at open, so a truncated download is one clear error that
names the file and the first tensor it cuts, before any weight is read. Tensors are read through
safetensors' memory map; FP8 weights are dequantized per 128x128 block on read, or read as
they are stored (`read_fp8`) for modules that keep them in fp8.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8}


def read_header(file: Path) -> dict:
    """The safetensors header of `file` ({name: {dtype, shape, data_offsets}}), validated against its size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise CheckpointError(f"{file}: truncated safetensors file: tensor '{name}' ends at byte {end}, "
                                  f"the file has {size}")
    return header


class Checkpoint:
    """Names, shapes and lazily read tensors of a model directory's safetensors files."""

    def __init__(self, model_dir: str | Path, fp8_block: tuple[int, int] | None = (128, 128)):
        self.dir = Path(model_dir)
        self.fp8_block = fp8_block or (128, 128)
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        for file in self._files():
            for name, info in read_header(file).items():
                self.file_of[name] = file
                self.info[name] = info
        self._handles: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard '{f.name}', which is missing from {self.dir}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files and no {INDEX_FILE}")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def fingerprint(self, names) -> str:
        """Identifies these tensors' bytes without reading them: file, size and mtime of their files."""
        files = sorted({self.file_of[n] for n in names if n in self.file_of})
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return json.dumps([stats, sorted(names)])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES.get(self.info[name]["dtype"], None)

    def _raw(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def _checked(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """The stored tensor `name`, checked against `shape`."""
        if name not in self.info:
            raise CheckpointError(f"{self.dir}: missing tensor '{name}'")
        found = self.shape(name)
        if shape is not None and found != tuple(shape):
            raise CheckpointError(f"{self.file_of[name]}: tensor '{name}' has shape {list(found)}, "
                                  f"the config implies {list(shape)}")
        return self._raw(name)

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name` as `dtype`, checked against `shape`; FP8 dequantized with its block scales."""
        tensor = self._checked(name, shape)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + "_scale_inv"
            if scale_name not in self.info:
                raise CheckpointError(f"{self.file_of[name]}: FP8 tensor '{name}' has no '{scale_name}'")
            try:
                return dequantize_fp8_blocks(tensor, self._raw(scale_name), self.fp8_block, dtype)
            except ValueError as e:
                raise CheckpointError(f"{self.file_of[name]}: tensor '{scale_name}': {e}") from None
        return tensor.to(dtype)

    def read_fp8(self, name: str, shape: tuple[int, int], device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`name` as (e4m3 [out, in], fp32 scale_inv [ceil(out/128), ceil(in/128)]): an FP8 tensor in
        128x128 blocks goes in as stored; anything else (bf16, fp32, other blocks) is quantized here,
        on `device` (where the weight goes: a GPU quantizes a large checkpoint much faster)."""
        tensor = self._checked(name, shape)
        scale_name = name + "_scale_inv"
        if tensor.dtype != torch.float8_e4m3fn or self.fp8_block != (128, 128):
            return quantize_fp8_blocks(self.read(name, shape, dtype=torch.float32).to(device))
        if scale_name not in self.info:
            raise CheckpointError(f"{self.file_of[name]}: FP8 tensor '{name}' has no '{scale_name}'")
        scale = self._raw(scale_name)
        expected = (-(-shape[0] // 128), -(-shape[1] // 128))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self.file_of[scale_name]}: tensor '{scale_name}' has shape {list(scale.shape)}, "
                                  f"its weight {list(shape)} in 128x128 blocks needs {list(expected)}")
        return tensor, scale.float()
