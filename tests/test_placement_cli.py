"""`hmoe rules` as a user runs it: in a subprocess, errors as one line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]


def hmoe(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_explain_full_size_v3_without_files():
    r = hmoe("rules", "explain", "--preset", "v3", "--rules", "deepseek-v3-1gpu", "--ctx", "32768",
             "--vram", "24", "--ram", "512", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["model"] == "preset v3" and out["ctx"] == 32768
    # embed; attention and 2 norms per layer; 3 dense MLPs; gate, experts, shared per MoE layer; norm, lm_head
    assert len(out["modules"]) == 1 + 61 * 3 + 3 + 58 * 3 + 2


def test_validate_error_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: typo\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    op: jit\n"
                   "    qaunt: q4_k\n")
    r = hmoe("rules", "validate", bad)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"hmoe: error: {bad}:5: unknown key 'qaunt' in rule 1; did you mean 'quant'?\n"


def test_validate_against_a_model_prints_warnings(tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text("name: t\nrules:\n  - match: 'lm_head'\n  - match: 'model\\.layers\\.\\d+\\.mlp'\n"
                     "  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    layers: 0\n")
    assert main(["rules", "validate", str(rules), "--preset", "tiny-v3", "--vram", "0", "--ram", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{rules}: ok (3 rules, 19 modules of preset tiny-v3 placed (17 by defaults))\n"
    assert captured.err == (f"hmoe: warning: {rules}:5: rule 3 (match 'model\\.layers\\.\\d+\\.mlp\\.experts', "
                            f"layers 0) matches no module of this model\n")


def test_explain_model_dir_shows_defaulted_modules(tiny_v3, tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text("name: only attention\nrules:\n  - match: 'model\\.layers\\.\\d+\\.self_attn'\n")
    assert main(["rules", "explain", "--model", str(tiny_v3), "--rules", str(rules), "--vram", "0", "--ram", "8"]) == 0
    out = capsys.readouterr().out
    assert "0-2     self_attn" in out and "placed by defaults (no rule matches): 16 modules" in out
    assert "context: 2048 tokens" in out  # --ctx defaults to min(4096, the model's limit)


def test_missing_gpu_and_shipped_names(capsys):
    assert main(["rules", "validate", "two-gpus", "--vram", "24"]) == 2
    assert capsys.readouterr().err.endswith("two-gpus.yaml:14: device 'cuda:1' is not present: the machine "
                                            "described by --vram has 1 GPU (cuda:0)\n")
