"""What every benchmark result carries (date, machine, commit, command) and the table printers."""

from __future__ import annotations

import csv
import datetime
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """$HMOE_COMMIT when set (a copied tree on another machine, whose git metadata may be stale), else
    the source's git commit with '+dirty' when tracked files differ from it; '' when neither says."""
    if os.environ.get("HMOE_COMMIT"):
        return os.environ["HMOE_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


def machine() -> dict:
    """CPU model, physical cores the process may use, and the GPU when torch sees one (no CUDA init otherwise)."""
    from cpu_experts.bench import cpu_model
    from cpu_experts.numa import physical_cpus

    out = {"cpu": cpu_model(), "cores": len(physical_cpus())}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def settings_from_env() -> dict:
    """HMOE_* variables that change what runs (HMOE_HANDOVER, HMOE_CUDA_SYNC, ...): part of the command."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("HMOE_") and k not in ("HMOE_CACHE_DIR", "HMOE_COMMIT")}


def metadata(command: str) -> dict:
    env = settings_from_env()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **machine(), "commit": commit(), "command": command, **({"env": env} if env else {})}


def script_metadata(script: str, argv: list[str] | None) -> dict:
    """metadata() of a benchmark script run as `python SCRIPT ARGS` (argv None: the process's own)."""
    return metadata(f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv))


def write_json(path: str | None, result: dict) -> None:
    """The result as indented JSON at path (nothing when path is None or empty)."""
    if path:
        import json
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def command_line(name: str, args, skip: tuple[str, ...] = ()) -> str:
    """The command that reproduces a run: every option with its value (defaults included)."""
    parts = ["hmoe", name]
    for key, value in vars(args).items():
        if key in ("func", "command") + skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub table; numbers right-aligned (as llama-bench prints them)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [bool(rows) and all(isinstance(r[i], (int, float)) or _numeric(str(r[i])) for r in rows)
             for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _numeric(s: str) -> bool:
    head = s.split(" ")[0].rstrip("%")
    try:
        float(head)
        return True
    except ValueError:
        return False


def csv_text(headers: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buf.getvalue()


def int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """'1,64,512' -> [1, 64, 512]; a clear error naming the option otherwise."""
    from .errors import HmoeError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise HmoeError(f"{option} takes comma-separated integers >= {minimum}, got '{text}'")
    return values
