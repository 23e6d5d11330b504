"""`hmoe sweep` on a tiny expert shape: rows per setting, skipped settings with reasons, best, JSON, plot."""

import json

import pytest

from cpu_experts import numa
from runtime import bench_sweep
from runtime.bench_sweep import Shape, plot, run_sweep, table

from .test_cli import hmoe

TINY = Shape("tiny", num_experts=16, topk=4, hidden=64, inter=32)
ROW_KEYS = {"tokens", "ms", "ms_min", "experts_touched", "weight_gb", "gbs", "gflops", "pct_bandwidth"}


@pytest.fixture(scope="module")
def swept():
    return run_sweep(TINY, "q8_0", [1, 2, 4096], ["none", "interleave"], [1, 8], repeats=2, bw_bytes=32 << 20,
                     log=lambda *a: None)


def test_sweep_rows_and_skips(swept):
    settings = swept["settings"]
    assert [(s["numa"], s["threads"]) for s in settings] == [("none", 1), ("none", 2), ("none", 4096),
                                                            ("interleave", 1), ("interleave", 2),
                                                            ("interleave", 4096)]
    big = [s for s in settings if s["threads"] == 4096]
    assert all(s["status"] == "skipped" and "physical cores" in s["reason"] for s in big)
    ran = [s for s in settings if s["status"] == "ok"]
    assert ran, "this machine ran no setting at all"
    for s in ran:
        assert [r["tokens"] for r in s["results"]] == [1, 8]
        for r in s["results"]:
            assert set(r) == ROW_KEYS and r["ms"] > 0 and r["gbs"] > 0 and r["gflops"] > 0
            # one token reads exactly top-k distinct experts
            assert r["tokens"] != 1 or r["experts_touched"] == TINY.topk
    assert swept["read_bandwidth_gbs"] > 0


def test_best_setting_is_the_fastest_per_token_count(swept):
    for T in (1, 8):
        runs = [(r["ms"], s["threads"], s["numa"]) for s in swept["settings"] if s["status"] == "ok"
                for r in s["results"] if r["tokens"] == T]
        best = swept["best"][str(T)]
        assert (best["ms"], best["threads"], best["numa"]) == min(runs)
    text = table(swept)
    assert "best at 1 token: " in text and "best at 8 tokens: " in text
    assert "skipped: 4096 threads" in text and "| threads | numa" in text


def test_plot_is_written(swept, tmp_path):
    out = tmp_path / "sweep.png"
    plot(swept, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_refused_numa_policies_are_skipped_with_the_reason(monkeypatch):
    def refuse(policy):
        if policy == "split":
            raise ValueError("NUMA policy 'split' on 2 nodes is not implemented yet; use 'interleave' or 'none'")
        return "none" if policy == "interleave" else policy

    monkeypatch.setattr(numa, "effective_policy", refuse)
    assert "not implemented yet" in bench_sweep.skip_reason(1, "split", 4)
    assert "libnuma unavailable" in bench_sweep.skip_reason(1, "interleave", 4)
    assert bench_sweep.skip_reason(1, "none", 4) is None
    assert "physical cores" in bench_sweep.skip_reason(5, "none", 4)


def test_sweep_command_json_and_plot(tiny_v3, tmp_path):
    png = tmp_path / "p.png"
    r = hmoe("sweep", "--model", tiny_v3, "--fmt", "q8_0", "--threads", "1,4096", "--numa", "none", "--tokens",
             "1,4", "--repeats", "2", "--bw-gib", "0.03", "--json", "--plot", png)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"date", "cpu", "cores", "commit", "command", "shape", "fmt", "read_bandwidth_gbs", "settings",
            "best"} <= set(out)
    assert out["shape"] == {"name": tiny_v3.name, "num_experts": 16, "topk": 4, "hidden": 64, "inter": 32}
    assert out["command"].startswith("hmoe sweep ") and "--threads 1,4096" in out["command"]
    assert [s["status"] for s in out["settings"]] == ["ok", "skipped"]
    assert set(out["best"]) == {"1", "4"} and out["best"]["1"]["threads"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "tokens     4" in r.stderr  # progress on stderr


def test_sweep_bad_input_is_one_line(capsys):
    from runtime import cli

    assert cli.main(["sweep", "--shape", "v3", "--numa", "interleave,spread"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--numa takes comma-separated policies" in err
    assert cli.main(["sweep", "--shape", "v3", "--tokens", "1,x"]) == 2
    assert "--tokens takes comma-separated integers" in capsys.readouterr().err
