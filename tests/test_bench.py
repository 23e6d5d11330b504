"""`hmoe bench` on the tiny model: tests and their names, depth semantics, roofline, md / JSON / CSV."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from runtime import cli
from runtime.bench_model import BenchTest, Runner, context_needed, make_tests, routed_experts
from runtime.errors import HmoeError
from runtime.loader import load_model

from .test_cli import hmoe

RESULT_KEYS = {"test", "n_prompt", "n_gen", "n_depth", "reps", "samples_ns", "samples_ts", "avg_ns", "stddev_ns",
               "avg_ts", "stddev_ts", "roofline_fraction", "graph",
               "outside_experts_fraction", "cpu_jobs_ms_per_token", "outside_jobs_fraction", "read_gbs_before_reps",
               "roofline_fraction_paired"}


def test_tests_are_named_as_llama_bench_names_them():
    tests = make_tests([512], [128], [8192, 0])
    assert [t.name for t in tests] == ["pp512", "tg128", "pp512 @ d8192", "tg128 @ d8192"]
    assert context_needed(tests) == 8192 + 512
    assert [t.name for t in make_tests([0], [16], [0])] == ["tg16"]
    with pytest.raises(HmoeError, match="nothing to run"):
        make_tests([0], [0], [0])


def test_depth_is_the_cache_content_before_the_test(tiny_v3):
    """A test at depth d sees exactly the d fill tokens before it, also after other tests ran and
    when a deeper fill continues from a shallower one."""
    model = load_model(tiny_v3, dtype="float32")
    runner = Runner(model, max_len=64, ubatch=8, seed=1)

    def reference(depth, n):
        ids = torch.cat([runner.depth_ids[:depth], runner.test_ids[:n]])[None]
        return model(ids, cache=model.new_cache(batch=1, max_len=64), last_only=True)

    runner.fill(20, log=lambda *a: None)
    torch.testing.assert_close(runner._prefill(runner.test_ids[:5], 20), reference(20, 5))
    runner.run(BenchTest(0, 3, 20))  # a generation test overwrites positions from 20 on
    assert runner.filled == 20
    runner.fill(30, log=lambda *a: None)
    torch.testing.assert_close(runner._prefill(runner.test_ids[:12], 30), reference(30, 12))


def test_roofline_bytes_come_from_the_format_and_top_k(tiny_v3):
    model = load_model(tiny_v3, dtype="float32")
    ref = routed_experts(model)  # torch experts in fp32: gate, up, down of 64 x 32 at 4 bytes
    assert (ref["moe_layers"], ref["top_k"], ref["bytes_per_expert"]) == (2, 4, 3 * 64 * 32 * 4)
    assert ref["bytes_per_token"] == 2 * 4 * 3 * 64 * 32 * 4


def test_bench_json(tiny_v3, tmp_path):
    r = hmoe("bench", "--model", tiny_v3, "-p", "16", "-n", "4", "-d", "0,32", "-r", "2", "--bw-gib", "0.03",
             "--experts", "q8_0", "--experts-threads", "2", "-o", "json", "--out", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert json.loads((tmp_path / "b.json").read_text()) == out
    assert {"date", "cpu", "cores", "commit", "command", "model", "roofline", "results"} <= set(out)
    assert out["command"].startswith("hmoe bench ") and "--n-depth 0,32" in out["command"]
    assert [r["test"] for r in out["results"]] == ["pp16", "tg4", "pp16 @ d32", "tg4 @ d32"]
    roof = out["roofline"]
    # q8_0 repacked: 1.0625 bytes per weight; 2 MoE layers x top-4 experts of 3 x 64 x 32 weights
    assert roof["bytes_per_expert"] == 3 * 64 * 32 * 1.0625 and roof["bytes_per_token"] == 2 * 4 * 6528
    assert roof["experts"] == "q8_0 (cpu_experts)" and roof["bandwidth_threads"] == 2
    assert roof["tokens_per_s"] == pytest.approx(roof["read_bandwidth_gbs"] * 1e9 / roof["bytes_per_token"])
    for row in out["results"]:
        assert set(row) == RESULT_KEYS and row["reps"] == 2 and len(row["samples_ts"]) == 2
        n = row["n_prompt"] or row["n_gen"]
        assert row["samples_ts"] == pytest.approx([n / (ns / 1e9) for ns in row["samples_ns"]], rel=1e-6)
        assert row["avg_ts"] == pytest.approx(sum(row["samples_ts"]) / 2)
        if row["n_gen"]:
            assert row["roofline_fraction"] == pytest.approx(row["avg_ts"] / roof["tokens_per_s"])
        else:
            assert row["roofline_fraction"] is None
    assert "filling the cache to depth 32" in r.stderr and "repetition 2/2" in r.stderr
    # a CPU model decodes eagerly: tg rows say so, prompt rows never use graphs
    assert [row["graph"] for row in out["results"]] == [None, False, None, False]
    assert out["decode_graph"]["on"] is False and "cpu" in out["decode_graph"]["reason"]
    assert out["handover"] is None  # CPU experts driven by the CPU itself: no hand-over
    assert out["cpu_experts_step_ms"] > 0  # q8_0 experts in cpu_experts: timed alone, then a tg step's share
    # the experts' weight bytes: every expert of the 2 MoE layers, at the repacked bytes of one
    n_experts = json.loads((Path(tiny_v3) / "config.json").read_text())["n_routed_experts"]
    assert out["host_memory"]["cpu_experts_bytes"] == 2 * n_experts * 6528
    for row in out["results"]:
        if row["n_gen"]:
            assert row["outside_experts_fraction"] == pytest.approx(
                1 - out["cpu_experts_step_ms"] / (1e3 / row["avg_ts"]))
            # the steps' own expert jobs: part of each step, the rest of the step is outside them
            step_ms = sum(row["samples_ns"]) / 1e6 / (row["reps"] * row["n_gen"])
            assert 0 < row["cpu_jobs_ms_per_token"] < step_ms
            assert row["outside_jobs_fraction"] == pytest.approx(1 - row["cpu_jobs_ms_per_token"] / step_ms, rel=1e-3)
            # each repetition against the read right before it: the median of those fractions
            reads = row["read_gbs_before_reps"]
            assert len(reads) == 2 and min(reads) > 0
            paired = sorted(ts * roof["bytes_per_token"] / (gbs * 1e9) for ts, gbs in zip(row["samples_ts"], reads))
            assert row["roofline_fraction_paired"] == pytest.approx(sum(paired) / 2)
        else:
            assert row["outside_experts_fraction"] is None and row["cpu_jobs_ms_per_token"] is None
            assert row["read_gbs_before_reps"] is None and row["roofline_fraction_paired"] is None


def test_bench_markdown_and_csv(tiny_v3, capsys):
    args = ["bench", "--model", str(tiny_v3), "-p", "8", "-n", "2", "-r", "2", "--bw-gib", "0.03", "--no-warmup"]
    assert cli.main(args) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].replace(" ", "") == "|model|experts|test|t/s|ofroofline|"
    assert [line.split("|")[3].strip() for line in md[2:4]] == ["pp8", "tg2"]
    assert " ± " in md[2] and md[3].rstrip(" |").endswith("%")
    assert md[5].startswith("decode roofline: 2 MoE layers × top-4 × ")
    assert cli.main(args + ["-o", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["test"] for r in rows] == ["pp8", "tg2"] and float(rows[1]["avg_ts"]) > 0
    assert rows[0]["roofline_fraction"] == "" and float(rows[1]["roofline_fraction"]) > 0


def test_depth_beyond_the_context_is_one_clear_error(tiny_v3, capsys):
    assert cli.main(["bench", "--model", str(tiny_v3), "-d", "4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need a context of 4608 tokens" in err and "max_position_embeddings" in err
