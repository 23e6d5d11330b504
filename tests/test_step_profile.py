"""`hmoe bench --breakdown` (runtime.step_profile): the timeline arithmetic on a made-up timeline, the
clear error without a GPU, and on a GPU a real profile of a hybrid tiny model."""

import pytest
import torch

from runtime import cli
from runtime.step_profile import cpu_windows, split_timeline

D2H, H2D = "Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pinned -> Device)"


def test_a_layer_window_runs_from_the_copies_out_to_the_copy_back():
    events = [(0, 10, "attention"), (10, 12, D2H), (12, 13, D2H), (15, 25, "shared experts"),
              (100, 102, H2D), (103, 110, "add"),
              (110, 111, D2H), (140, 141, H2D), (150, 160, "lm_head")]
    assert cpu_windows(events) == [(13, 100), (111, 140)]
    parts = split_timeline(events)
    assert parts["windows"] == 2 and parts["cpu_windows_us"] == 87 + 29
    assert parts["gpu_busy_inside_windows_us"] == 10  # the shared experts
    # outside: attention 10 + copies 3 + 2 + 7 + 1 + 1 + 10
    assert parts["gpu_busy_outside_us"] == 34
    assert parts["span_us"] == 160
    assert parts["idle_elsewhere_us"] == 160 - 116 - 34  # 1 us before "add", 9 before lm_head


def test_no_copy_back_means_no_window():
    assert cpu_windows([(0, 1, D2H), (2, 3, "k")]) == []
    assert split_timeline([])["span_us"] == 0.0


def test_breakdown_without_a_gpu_is_one_clear_error(tiny_v3, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench", "--model", str(tiny_v3), "-p", "0", "-n", "2", "-r", "1", "--bw-gib", "0.03",
                     "--breakdown"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("hmoe: error: --breakdown profiles decode steps on a GPU")
    assert not any("repetition" in line for line in err)  # refused before any test ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_breakdown_of_a_hybrid_model(tiny_v3, tmp_path):
    import json

    rules = tmp_path / "hybrid.yaml"
    rules.write_text("name: hybrid\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n"
                     "    op: jit\n    quant: q8_0\n  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n")
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--model", str(tiny_v3), "--rules", str(rules), "-p", "0", "-n", "4", "-r", "1",
                     "--bw-gib", "0.03", "--experts-threads", "2", "--breakdown", "--out", str(out)]) == 0
    b = json.loads(out.read_text())["step_breakdown"]
    assert b["hybrid_layers"] == 2 and b["cpu_windows_per_step"] == 2  # tiny-v3: 2 MoE layers, 1 window each
    assert b["cpu_experts_alone_native_ms"] > 0 and b["cpu_windows_ms"] > 0
    parts = b["cpu_windows_ms"] + b["gpu_busy_outside_ms"] + b["idle_elsewhere_ms"]
    assert parts == pytest.approx(b["span_ms"], rel=1e-6)
    assert b["span_ms"] <= b["wall_step_ms"] * 1.01
    # the jobs ran inside the windows: submit to last worker out is part of each window
    assert 0 < b["cpu_jobs_in_step_ms"] < b["cpu_windows_ms"]
    assert b["window_minus_jobs_per_layer_us"] == pytest.approx(
        (b["cpu_windows_ms"] - b["cpu_jobs_in_step_ms"]) / 2 * 1e3)


def test_a_gpu_driven_pool_leaves_one_core_for_the_hand_over(monkeypatch):
    from cpu_experts import numa
    from orchestrator.hybrid import default_workers

    monkeypatch.setattr(numa, "physical_cpus", lambda: list(range(16)))
    assert default_workers() == 15
    monkeypatch.setattr(numa, "physical_cpus", lambda: [0, 1])
    assert default_workers() == 2  # too few cores to spare one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hybrid_layers_default_to_one_worker_per_core_but_one(tiny_v3, tmp_path):
    from orchestrator.hybrid import default_workers
    from placement.inventory import detect
    from placement.plan import build_plan
    from placement.schema import parse_rules
    from runtime.config import load_config
    from runtime.loader import load_model
    from runtime.step_profile import hybrid_layers

    text = ("name: hybrid\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n    op: jit\n"
            "    quant: q8_0\n  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n")
    plan = build_plan(parse_rules(text, "hybrid.yaml", detect()), load_config(tiny_v3), ctx=256)
    layers = hybrid_layers(load_model(tiny_v3, plan=plan))
    assert layers and all(e.engine.threads == default_workers() for e in layers)


def test_overlap_of_interval_lists_equals_the_pairwise_sum():
    import random

    from runtime.step_profile import _overlap, _union

    rng = random.Random(1)
    for _ in range(200):
        a = _union([(s, s + rng.uniform(0, 5)) for s in (rng.uniform(0, 100) for _ in range(30))])
        b = _union([(s, s + rng.uniform(0, 8)) for s in (rng.uniform(0, 100) for _ in range(10))])
        pairwise = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
        assert _overlap(a, b) == pytest.approx(pairwise, abs=1e-9)
