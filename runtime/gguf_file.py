"""Open a GGUF file, or every shard of a split one (`name-00001-of-00003.gguf`), with `gguf`.

What the file claims is checked at open: magic and version, every tensor's ggml type, that each
tensor's data lies inside its file, and that a split file's shards are all there and agree. A
truncated download is one error naming the file and the first tensor it cuts, before any weight
is read. Tensor data stays memory-mapped (numpy views in GGUF's own layout: quantized tensors are
uint8 [..., row_bytes], F32/F16 typed arrays); nothing is read until asked for.
"""

from __future__ import annotations

import functools
import math
import re
from importlib.metadata import version
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor

from .errors import CheckpointError

ARCH = "deepseek2"
SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_MISSING = object()


class GGUFError(CheckpointError):
    pass


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (llama.cpp's gguf-split names); else [path]."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for i, p in enumerate(paths, 1):
        if not p.exists():
            raise GGUFError(f"{p}: no such file (shard {i} of {count} of the split GGUF {path.name})")
    return paths


class _Reader(GGUFReader):
    """GGUFReader that checks each tensor's type and extent before it maps the data."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path)

    def _build_tensors(self, start_offs, fields) -> None:
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise GGUFError(f"{self.path}: tensor '{name}' has ggml type {int(raw_type[0])}, unknown to gguf "
                                f"{version('gguf')} (upgrade the gguf package)") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            dims = [int(d) for d in dims]
            if dims and dims[0] % block:
                raise GGUFError(f"{self.path}: tensor '{name}' has rows of {dims[0]} values, not a multiple of "
                                f"{qtype.name}'s block of {block}")
            end = start_offs + int(offset[0]) + math.prod(dims) // block * type_size
            if end > size:
                raise GGUFError(f"{self.path}: truncated GGUF file: tensor '{name}' ends at byte {end}, "
                                f"the file has {size}")
        super()._build_tensors(start_offs, fields)


def _open_reader(path: Path) -> _Reader:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    try:
        return _Reader(path)
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        # gguf reports a short header as a bare IndexError or a failed reshape
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None


class GGUFFile:
    """Metadata (from the first shard) and tensors (from all shards) of one GGUF model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.paths = shard_paths(self.path)
        readers = [_open_reader(p) for p in self.paths]
        self._check_split(readers)
        self.fields = readers[0].fields
        self.tensors: dict[str, ReaderTensor] = {}
        self.file_of: dict[str, Path] = {}
        for p, reader in zip(self.paths, readers):
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{p}: tensor '{t.name}' is also in {self.file_of[t.name]}")
                self.tensors[t.name] = t
                self.file_of[t.name] = p
        arch = self.get("general.architecture", None)
        if arch != ARCH:
            raise GGUFError(f"{self.path}: key 'general.architecture' is {arch!r}; hmoe runs llama.cpp's "
                            f"'{ARCH}' (DeepSeek V2, V2-Lite, V3, R1, Kimi-K2, Moonlight)")

    def _check_split(self, readers: list[_Reader]) -> None:
        count = len(readers)
        for i, (p, r) in enumerate(zip(self.paths, readers)):
            f = r.fields.get("split.count")
            claimed = f.contents() if f is not None else 1
            no = r.fields["split.no"].contents() if "split.no" in r.fields else 0
            if claimed != count or no != i:
                raise GGUFError(f"{p}: is shard {no + 1} of {claimed} of a split GGUF, expected shard {i + 1} of "
                                f"{count}; keep llama.cpp's '-0000K-of-0000N.gguf' names")
        total = readers[0].fields.get("split.tensors.count")
        found = sum(len(r.tensors) for r in readers)
        if total is not None and total.contents() != found:
            raise GGUFError(f"{self.path}: the split GGUF lists {total.contents()} tensors, its shards hold {found}")

    def get(self, key: str, default=_MISSING):
        """A metadata value (int, float, bool, str or list); a missing key without default is an error."""
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: missing required key '{key}'")
            return default
        return field.contents()

    def describe(self, name: str) -> str:
        """`file: tensor 'x'` for messages: the shard that holds it."""
        return f"{self.file_of.get(name, self.path)}: tensor '{name}'"


def shape_of(t: ReaderTensor) -> tuple[int, ...]:
    """A tensor's shape in numpy / PyTorch order ([out, in]); GGUF lists dimensions fastest first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


@functools.lru_cache(maxsize=4)
def _cached(path: str, stats: tuple) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
    """One parse per file version: config, tokenizer and weights of a model share it (keyed by every
    shard's size and mtime, so a changed or missing shard is noticed)."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    stats = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in shard_paths(path))
    return _cached(str(path), stats)
