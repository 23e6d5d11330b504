"""The built-in demo model: a tiny random DeepSeek-V3-shaped checkpoint, made on first use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_PRESET = "tiny-v3"
DEMO_VERSION = 1  # bump when the demo's preset or writer changes


def cache_dir() -> Path:
    return Path(os.environ.get("HMOE_CACHE_DIR") or Path.home() / ".cache" / "hmoe")


def demo_model_dir() -> Path:
    """Path of the demo checkpoint, written (atomically) the first time it is asked for."""
    target = cache_dir() / f"demo-{DEMO_PRESET}-v{DEMO_VERSION}"
    if (target / "config.json").exists():
        return target
    from .make_model import write_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_model(tmp, DEMO_PRESET, dtype="fp32", seed=0, progress=False)
        try:
            tmp.rename(target)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
