"""Shipped rules on full-size configs (meta device only), preflight refusals, the tuner, default rules."""

import json

import pytest

from placement.assemble import check_runnable
from placement.defaults import RULES_DIR, default_rules, open_rules, shipped
from placement.inventory import GiB, hypothetical
from placement.plan import build_plan
from placement.preflight import PlanDoesNotFit, check
from placement.tune import tune
from runtime.cli import main
from runtime.config import config_from_dict
from runtime.errors import HmoeError
from runtime.make_model import preset_config

V3 = config_from_dict(preset_config("v3"))
V2_LITE = config_from_dict(preset_config("v2-lite"))
TINY = config_from_dict(preset_config("tiny-v3"))

# rules file -> (model, machine GiB per GPU, RAM GiB, context) it is written for
SHIPPED = {
    "deepseek-v3-1gpu": (V3, [24], 512, 32768),
    "deepseek-v3-gpu-experts": (V3, [78], 512, 32768),
    "deepseek-v2-lite-1gpu": (V2_LITE, [16], 64, 32768),
    "cpu-only": (V2_LITE, [], 64, 32768),
    "cpu-reference": (TINY, [], 8, 2048),
    "all-gpu": (V2_LITE, [40], 64, 32768),
    "two-gpus": (V2_LITE, [24, 24], 64, 32768),
    "gpu-experts": (V2_LITE, [16], 64, 32768),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_runtime_runs_every_shipped_file(name):
    cfg, vram, ram, ctx = SHIPPED[name]
    check_runnable(build_plan(open_rules(name, hypothetical(vram, ram)), cfg, ctx=ctx))


def test_every_shipped_file_is_tested():
    assert set(shipped()) == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_rules_fit_the_machine_they_name(name):
    cfg, vram, ram, ctx = SHIPPED[name]
    machine = hypothetical(vram, ram)
    plan = build_plan(open_rules(name, machine), cfg, ctx=ctx)
    # gpu_experts without statistics (they are the model's, not the file's) warns which it keeps
    assert [w for w in plan.warnings if "no routing statistics were given" not in w] == []
    check(plan, machine)


def test_v3_one_gpu_json(capsys):
    code = main(["rules", "explain", "--preset", "v3", "--rules", str(RULES_DIR / "deepseek-v3-1gpu.yaml"),
                 "--ctx", "32768", "--vram", "24", "--ram", "512", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"]
    experts_cpu = sum(m["bytes"] for m in out["modules"] if m["kind"] == "experts" and m["home"] == "cpu")
    assert 0.94 < experts_cpu / out["total_weight_bytes"] < 0.96
    assert all(m["device"] == "cpu" and m["format"] == "q4_k" for m in out["modules"] if m["kind"] == "experts")
    gpu = out["devices"]["cuda:0"]
    assert gpu["need"] <= 24 * GiB and gpu["cache"] == 61 * 32768 * 576 * 2
    assert {m["device"] for m in out["modules"] if m["kind"] == "attention"} == {"cuda:0"}


def test_explain_table_groups_layer_ranges(capsys):
    assert main(["rules", "explain", "--preset", "v3", "--rules", "deepseek-v3-1gpu", "--ctx", "32768",
                 "--vram", "24", "--ram", "512"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line[:1].isdigit() or line.startswith("- ")}
    assert rows["self_attn"][:5] == ["0-60", "self_attn", "cuda:0", "mla", "fp8"]
    assert rows["mlp"][:5] == ["0-2", "mlp", "cuda:0", "torch", "fp8"]
    assert rows["mlp.experts"][:6] == ["3-60", "mlp.experts", "cpu", "jit", "q4_k", "352.1"]
    assert "cuda:0  16.0 GiB   2.14 GiB" in out and "fits" in out
    assert "routed experts 352.1 GiB (95.2%)" in out


def test_a_plan_that_does_not_fit_is_refused_with_what_to_change(capsys):
    code = main(["rules", "explain", "--preset", "v3", "--rules", "deepseek-v3-1gpu", "--ctx", "32768",
                 "--vram", "16", "--ram", "512"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"hmoe: error: {RULES_DIR / 'deepseek-v3-1gpu.yaml'}: the plan does not fit cuda:0: it "
                          f"needs 19.2 GiB (weights 16.0 GiB, latent cache 2.14 GiB for 32768 tokens, reserve 1.00 GiB)"
                          f" and 16.0 GiB is free; to free 3.19 GiB: move rule 2 (line 16) (10.6 GiB of self_attn) "
                          f"to the CPU or narrow its layers (enough alone)")


def test_ram_overflow_suggests_a_smaller_format():
    machine = hypothetical([], 400)
    plan = build_plan(open_rules("cpu-only", machine), V3, ctx=4096)
    with pytest.raises(PlanDoesNotFit, match=r"does not fit cpu: .* quant: q4_0 in rule 1 \(line 7\) \(saves "
                                             r"\d+\.\d GiB\) \(enough alone\)"):
        check(plan, machine)


def test_context_suggestion_is_enough_alone():
    import re

    machine = hypothetical([16], 64)
    rules = open_rules("deepseek-v2-lite-1gpu", machine)
    with pytest.raises(PlanDoesNotFit) as e:
        check(build_plan(rules, V2_LITE, ctx=163840), machine)
    ctx = int(re.search(r"use --ctx (\d+) or less \(enough alone\)", str(e.value))[1])
    check(build_plan(rules, V2_LITE, ctx=ctx), machine)
    with pytest.raises(PlanDoesNotFit):
        check(build_plan(rules, V2_LITE, ctx=ctx + 1024), machine)


def test_tune_v3_on_24gb():
    t = tune(V3, hypothetical([24], 512), ctx=32768)
    assert t.reasons[0] == "cuda:0 has 24.0 GiB free; 1.00 GiB stays in reserve"
    assert "does not fit" in t.reasons[1] and t.reasons[2].startswith("attention, dense MLPs, shared experts in fp8")
    assert "2 experts of each of the other 58 layers on cuda:0" in "\n".join(t.reasons)
    assert "gpu_experts: {count: 2, device: cuda:0, quant: fp8}" in t.text
    usage = t.plan.usage()
    assert usage["cuda:0"].total + GiB <= 24 * GiB and usage["cuda:0"].total + GiB > 23 * GiB


def test_tune_puts_whole_expert_layers_first():
    t = tune(V2_LITE, hypothetical([24], 64), ctx=32768)
    p = {x.name: x for x in t.plan.placements}
    assert p["model.layers.1.mlp.experts"].device == "cuda:0" and p["model.layers.19.mlp.experts"].device == "cuda:0"
    assert p["model.layers.20.mlp.experts"].op == "jit" and p["model.layers.20.mlp.experts"].gpu_experts.count == 3
    assert p["model.embed_tokens"].device == "cpu" and p["lm_head"].device == "cuda:0"


def test_tune_everything_fits(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert main(["rules", "tune", "--preset", "v2-lite", "--vram", "80", "--ram", "64", "--ctx", "4096",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "26 of 26 layers fit whole on cuda:0" in printed and "everything fits on cuda:0" in printed
    assert main(["rules", "validate", str(out), "--preset", "v2-lite", "--vram", "80", "--ram", "64"]) == 0
    assert capsys.readouterr().out == f"{out}: ok (5 rules, 163 modules of preset v2-lite placed (0 by defaults))\n"


def test_tune_without_gpu_picks_the_most_precise_format_that_fits_ram():
    t = tune(V3, hypothetical([], 512), ctx=4096)
    assert t.reasons[-1].startswith("routed experts on the CPU: q4_k")
    t = tune(V2_LITE, hypothetical([], 64), ctx=4096)
    assert t.reasons[-1].startswith("routed experts on the CPU: bf16")
    with pytest.raises(HmoeError, match=r"the routed experts do not fit the 94.1 GiB of RAM left for them \(after the reserve and the other "
                                         r"modules\): tried bf16 \(1218.0 GiB\), q8_0"):
        tune(V3, hypothetical([], 128), ctx=4096)


def test_default_rules():
    assert all(p.device == "cpu" for p in build_plan(default_rules(TINY, hypothetical([], 8), ctx=512), TINY,
                                                       ctx=512).placements)
    # the default rules use only what the runtime runs today, so hmoe can load what it picks
    gpu = build_plan(default_rules(V3, hypothetical([80], 512), ctx=4096), V3, ctx=4096)
    assert {p.device for p in gpu.placements if p.unit.kind == "attention"} == {"cuda:0"}
    check_runnable(gpu)


def test_detect_reads_free_vram_and_available_ram(monkeypatch):
    import psutil
    import torch

    from placement.inventory import detect

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((20 + i) * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 100 * GiB})())
    machine = detect()
    assert machine.devices == ("cpu", "cuda:0", "cuda:1") and machine.detected
    assert machine.capacity("cuda:1") == 21 * GiB and machine.capacity("cpu") == 100 * GiB


@pytest.mark.parametrize("vram", [8, 16, 24, 26, 28, 30, 32, 48, 80, 141])
@pytest.mark.parametrize("cfg", [V3, V2_LITE], ids=["v3", "v2-lite"])
def test_default_rules_always_load(cfg, vram):
    """What hmoe picks without --rules must pass assembly's check on any GPU size (fp8 attention
    next to experts kept on the GPU, which torch runs only in float formats, included)."""
    check_runnable(tune(cfg, hypothetical([vram], 1024), ctx=4096, runnable_only=True).plan)
