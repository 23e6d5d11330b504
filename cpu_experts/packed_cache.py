"""Packed experts on disk: the repacked buffers of a CPUExperts written once, read back at the next start.

Quantizing and repacking a DeepSeek-V3 layer takes seconds to minutes; reading its packed bytes
back runs at disk speed. A file holds one layer: a JSON header line (format, shape, the layout's
geometry, every buffer's size) and then the buffers, raw. A file whose header does not match what
the caller asks for (another format, a changed layout) is ignored and rebuilt, never trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from .experts import CPUExperts

MAGIC = "hmoe-packed-experts-1"


def _buffers(experts: CPUExperts):
    """(name, Buffer) of every distinct weight buffer, in a fixed order."""
    out = []
    for mat_name in ("gate", "up", "down"):
        mat = getattr(experts, mat_name)
        out += [(f"{mat_name}.payload", mat.payload), (f"{mat_name}.scale", mat.scale)]
        if mat.has_bias:
            out.append((f"{mat_name}.bias", mat.bias))
    return out


def _header(experts: CPUExperts) -> dict:
    return {"magic": MAGIC, "fmt": experts.fmt, "down_fmt": experts.down_fmt, "E": experts.E, "H": experts.H,
            "I": experts.I, "geometry": dataclasses.asdict(experts.geo),
            "down_geometry": dataclasses.asdict(experts.down_geo),
            "buffers": [[name, buf.nbytes] for name, buf in _buffers(experts)]}


def nbytes(experts: CPUExperts) -> int:
    return sum(buf.nbytes for _, buf in _buffers(experts))


def save(experts: CPUExperts, path: str | Path) -> None:
    """Write atomically (a crash leaves no half file that a later start would read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write((json.dumps(_header(experts)) + "\n").encode())
        for _, buf in _buffers(experts):
            f.write(memoryview(buf.array(np.uint8)))
    os.replace(tmp, path)


def load(path: str | Path, **ctor) -> CPUExperts | None:
    """A CPUExperts(**ctor) filled from `path`, or None when the file is missing or was written for
    something else (format, shape, layout)."""
    path = Path(path)
    if not path.is_file():
        return None
    experts = CPUExperts(**ctor)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            if header != json.loads(json.dumps(_header(experts))):
                experts.close()
                return None
            for _, buf in _buffers(experts):
                view = memoryview(buf.array(np.uint8))
                if f.readinto(view) != buf.nbytes:
                    experts.close()
                    return None
    except (OSError, ValueError):
        experts.close()
        return None
    return experts
