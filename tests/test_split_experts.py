"""GPU-resident experts: routing statistics (`--collect-routing`), the plan's choice of experts, and
SplitExperts (a few experts in torch beside the CPU kernels) against all experts in one place."""

import json

import pytest
import torch

from placement.assemble import allocated_bytes
from placement.inventory import hypothetical
from placement.plan import build_plan
from placement.routing import FORMAT, load_routing
from placement.schema import parse_rules
from placement.yaml_lines import RulesError
from runtime import cli
from runtime.config import load_config
from runtime.loader import load_model
from runtime.moe import TorchExperts
from runtime.split_experts import SplitExperts

from .conftest import rel_err

MACHINE = hypothetical([], 8)
PROMPT = [0, 17, 230, 5, 99, 4, 512, 8]


def random_experts(E, H=32, I=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ex = TorchExperts(E, H, I)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return ex


def subset(ex, ids):
    out = TorchExperts(len(ids), ex.gate_proj.shape[2], ex.gate_proj.shape[1])
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(out, name).copy_(getattr(ex, name)[list(ids)])
    return out


def routing(T, E, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return ids, torch.rand(T, k, generator=gen) + 0.1


def split_of(ex, fast_ids, slow_module=None):
    E = ex.gate_proj.shape[0]
    slow_ids = [e for e in range(E) if e not in fast_ids]
    return SplitExperts(subset(ex, fast_ids), slow_module or subset(ex, slow_ids), fast_ids, E)


# T=1, k=4: dense up to 8 fast experts, gather above; 5 tokens (20 slots) and 48 fast experts: grouped
# (gathering would copy more than 16 experts); more than 16 tokens: grouped
@pytest.mark.parametrize("T,fast_ids,method", [(1, [0, 5, 9], "dense"), (3, [2, 3, 4, 7, 11, 12, 13, 14, 15, 20], "dense"),
                                               (1, list(range(10, 22)), "gather"), (5, list(range(2, 50)), "grouped"),
                                               (40, [1, 6, 30], "grouped")])
def test_split_sums_to_all_experts_in_one_place(T, fast_ids, method, monkeypatch):
    import runtime.split_experts as split_module

    used = []
    original = getattr(split_module, f"_{method}")
    monkeypatch.setattr(split_module, f"_{method}", lambda *a: used.append(method) or original(*a))
    ex = random_experts(64)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(2))
    ids, w = routing(T, 64, 4)
    ids[0] = torch.tensor(fast_ids[:4] if len(fast_ids) >= 4 else fast_ids + [31][:4 - len(fast_ids)])
    split = split_of(ex, fast_ids)
    torch.testing.assert_close(split(x, ids, w), ex(x, ids, w), atol=1e-5, rtol=1e-5)
    split.start(x, ids, w)  # the start/finish path MoE uses
    torch.testing.assert_close(split.finish(), ex(x, ids, w), atol=1e-5, rtol=1e-5)
    assert used == [method, method]


def test_split_routes_each_slot_to_one_side():
    split = split_of(random_experts(8), [1, 6])
    ids = torch.tensor([[1, 6], [0, 6], [3, 2]])
    w = torch.tensor([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0]])
    fast_ids, fast_w, slow_ids, slow_w = split.split(ids, w)
    assert fast_ids.tolist() == [[0, 1], [0, 1], [0, 0]] and fast_w.tolist() == [[0.5, 0.25], [0, 0.125], [0, 0]]
    # slow part: experts 0 2 3 4 5 7 -> 0..5; a fast slot reuses the token's own slow expert (or 0)
    assert slow_ids.tolist() == [[0, 0], [0, 0], [2, 1]] and slow_w.tolist() == [[0, 0], [0.75, 0], [1.0, 2.0]]


def test_split_with_the_cpu_kernels_matches_the_kernels_alone():
    """The zero-weight slots the CPU part gets (a duplicate of the token's own expert) add nothing."""
    from runtime.jit_experts import build

    ex = random_experts(16, H=64, I=32)
    fast_ids = [2, 9, 13]
    whole = build(1, "bf16", ex, threads=2)
    part = build(1, "bf16", subset(ex, [e for e in range(16) if e not in fast_ids]), threads=2)
    split = split_of(ex, fast_ids, slow_module=part)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    ids, w = routing(5, 16, 4)
    ids[0] = torch.tensor([2, 9, 13, 0])
    ids[1] = torch.tensor([2, 9, 13, 1])
    with torch.no_grad():
        want, ref = whole(x, ids, w), ex(x, ids, w)
        got = split(x, ids, w)
    assert rel_err(got, ref) < 1e-2 and rel_err(want, ref) < 1e-2
    assert rel_err(got, want) < 1e-2


def stats_file(path, E=16, layers=(1, 2), hot=(3, 7, 11, 12)):
    counts = {str(i): {"tokens": 10, "counts": [10 if e in hot else (e % 3) for e in range(E)]} for i in layers}
    for entry in counts.values():
        entry["tokens"] = sum(entry["counts"]) // 4
    path.write_text(json.dumps({"format": FORMAT, "model": "tiny", "fingerprint": None, "n_routed_experts": E,
                                "top_k": 4, "num_hidden_layers": 3, "layers": counts}))
    return path


def split_rules(routing_line=""):
    return ("name: split on the CPU\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    device: cpu\n"
            "    op: jit\n    quant: bf16\n    threads: 2\n"
            f"    gpu_experts: {{count: 4, device: cpu, quant: fp32{routing_line}}}\n"
            "  - {match: '.*', device: cpu, dtype: fp32}\n")


def test_the_plan_keeps_the_most_used_experts(tiny_v3, tmp_path):
    stats_file(tmp_path / "stats.json")
    cfg = load_config(tiny_v3)
    plan = build_plan(parse_rules(split_rules(", routing: stats.json"), str(tmp_path / "r.yaml"), MACHINE), cfg, ctx=64)
    experts = [p for p in plan.placements if p.unit.kind == "experts"]
    assert [p.gpu_expert_ids for p in experts] == [(3, 7, 11, 12)] * 2 and plan.warnings == ()
    plan = build_plan(parse_rules(split_rules(), "r.yaml", MACHINE), cfg, ctx=64)
    assert [p.gpu_expert_ids for p in plan.placements if p.unit.kind == "experts"] == [(0, 1, 2, 3)] * 2
    assert len(plan.warnings) == 1 and "keeps experts 0-3 of each layer on cpu, as no routing statistics" in \
        plan.warnings[0]


def test_routing_file_errors_name_the_rule(tiny_v3, tmp_path):
    cfg = load_config(tiny_v3)
    rules = parse_rules(split_rules(", routing: missing.json"), str(tmp_path / "r.yaml"), MACHINE)
    with pytest.raises(RulesError, match=r"r.yaml:8: .*missing.json: no such routing statistics file"):
        build_plan(rules, cfg, ctx=64)
    stats_file(tmp_path / "s.json", E=8)
    rules = parse_rules(split_rules(", routing: s.json"), str(tmp_path / "r.yaml"), MACHINE)
    with pytest.raises(RulesError, match="statistics of a model with 8 routed experts per layer; this model has 16"):
        build_plan(rules, cfg, ctx=64)
    stats_file(tmp_path / "l.json", layers=(1,))
    rules = parse_rules(split_rules(", routing: l.json"), str(tmp_path / "r.yaml"), MACHINE)
    with pytest.raises(RulesError, match="no routing statistics for layer 2"):
        build_plan(rules, cfg, ctx=64)


def greedy(model, ids, n):
    cache = model.new_cache(batch=1, max_len=len(ids) + n)
    device = model.lm_head.weight.device
    logits = model(torch.tensor([ids], device=device), cache=cache, start_pos=0, last_only=True)[0, -1]
    out, first = [], logits
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]], device=device), cache=cache, start_pos=pos, last_only=True)[0, -1]
    return out, first.float().cpu()


def check_split_model(tiny_v3, tmp_path, device):
    """Rules with 4 experts per layer on `device`: the most used experts there, the plan's bytes
    allocated, and the reference model's tokens and logits."""
    stats_file(tmp_path / "stats.json")
    rules = split_rules(", routing: stats.json").replace("device: cpu, quant: fp32", f"device: '{device}', quant: fp32")
    if device != "cpu":
        rules = rules.replace("{match: '.*', device: cpu, dtype: fp32}",
                              "{match: 'model\\.embed_tokens', device: cpu, dtype: fp32}\n"
                              f"  - {{match: '.*', device: '{device}', dtype: fp32}}")
    from placement.inventory import detect

    plan = build_plan(parse_rules(rules, str(tmp_path / "r.yaml"), detect() if device != "cpu" else MACHINE),
                      load_config(tiny_v3), ctx=64)
    model = load_model(tiny_v3, plan=plan, progress=False)
    split = model.model.layers[1].mlp.experts
    assert isinstance(split, SplitExperts) and split.fast_ids == (3, 7, 11, 12)
    assert split.fast.gate_proj.device.type == torch.device(device).type
    allocated, usage = allocated_bytes(model), plan.usage()
    assert allocated.get(device, 0) == usage[device].weights if device != "cpu" else True
    assert abs(allocated["cpu"] - usage["cpu"].weights) <= 1024, (allocated, usage)
    tokens, logits = greedy(model, PROMPT, 10)
    want_tokens, want_logits = greedy(load_model(tiny_v3, progress=False), PROMPT, 10)
    assert tokens == want_tokens
    assert rel_err(logits, want_logits) < 2e-2  # the CPU part runs bf16 weights


def test_split_model_on_the_cpu_gives_the_references_tokens(tiny_v3, tmp_path):
    check_split_model(tiny_v3, tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_model_on_the_gpu_gives_the_references_tokens(tiny_v3, tmp_path):
    check_split_model(tiny_v3, tmp_path, "cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,fast_ids", [(1, [0, 5, 9]), (1, list(range(10, 22))), (40, [1, 6, 30])])
def test_split_on_cuda_matches_one_place(T, fast_ids):
    ex = random_experts(32)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(2))
    ids, w = routing(T, 32, 4)
    E = 32
    split = SplitExperts(subset(ex, fast_ids).cuda(), subset(ex, [e for e in range(E) if e not in fast_ids]).cuda(),
                         fast_ids, E)
    got = split(x.cuda(), ids.cuda(), w.cuda())
    torch.testing.assert_close(got.cpu(), ex(x, ids, w), atol=1e-4, rtol=1e-4)


def test_shipped_gpu_experts_rules_plan_on_a_tiny_model():
    from placement.defaults import open_rules
    from runtime.config import config_from_dict
    from runtime.make_model import preset_config

    machine = hypothetical([16], 8)
    plan = build_plan(open_rules("gpu-experts", machine), config_from_dict(preset_config("tiny-v3")), ctx=256)
    experts = [p for p in plan.placements if p.unit.kind == "experts"]
    assert all(p.gpu_expert_ids == (0, 1, 2, 3) and p.gpu_experts.device == "cuda:0" for p in experts)
    # tiny-v3: 16 experts of 3 x 64 x 32 weights; 12 in RAM as q8_0 (34 bytes per 32), 4 on the GPU in bf16
    assert all(p.bytes == 12 * 3 * 64 * 32 * 34 // 32 and p.gpu_bytes == 4 * 3 * 64 * 32 * 2 for p in experts)
    assert plan.usage()["cpu"].weights == sum(p.bytes for p in plan.placements if p.home == "cpu")
    assert plan.usage()["cuda:0"].weights == sum(p.bytes for p in plan.placements if p.device == "cuda:0"
                                                 and p.unit.kind != "experts") + sum(p.gpu_bytes for p in experts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shipped_gpu_experts_rules_run_a_tiny_model(tiny_v3):
    from placement.defaults import open_rules
    from placement.inventory import detect

    plan = build_plan(open_rules("gpu-experts", detect()), load_config(tiny_v3), ctx=64)
    model = load_model(tiny_v3, plan=plan, progress=False)
    assert isinstance(model.model.layers[1].mlp.experts, SplitExperts)
    tokens, logits = greedy(model, PROMPT, 8)  # bf16 on the GPU and q8_0 experts: close, not equal
    assert len(tokens) == 8 and rel_err(logits, greedy(load_model(tiny_v3, progress=False), PROMPT, 8)[1]) < 0.1


def test_bench_collects_routing(tiny_v3, tmp_path, capsys):
    out = tmp_path / "routing.json"
    args = ["bench", "--model", str(tiny_v3), "-p", "8", "-n", "4", "-r", "1", "--bw-gib", "0.01",
            "--collect-routing", str(out)]
    assert cli.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == FORMAT and doc["model"] == tiny_v3.name and isinstance(doc["fingerprint"], str)
    assert (doc["n_routed_experts"], doc["top_k"], doc["num_hidden_layers"]) == (16, 4, 3)
    assert sorted(doc["layers"]) == ["1", "2"]  # layer 0 is dense
    for entry in doc["layers"].values():  # warm-ups and repetitions: pp8 twice, tg2 (a graph's warm-up) then tg4
        assert entry["tokens"] == 8 + 8 + 2 + 4 and sum(entry["counts"]) == entry["tokens"] * 4
        assert len(entry["counts"]) == 16 and all(c >= 0 for c in entry["counts"])
    assert cli.main(args) == 0  # a second run adds to the same model's file
    again = json.loads(out.read_text())
    assert all(again["layers"][k]["counts"] == [2 * c for c in doc["layers"][k]["counts"]] for k in doc["layers"])
    stats = load_routing(out, n_routed_experts=16)
    assert len(stats.most_used(1, 4)) == 4
    capsys.readouterr()


def test_default_rules_skip_a_split_too_small_to_pay():
    from placement.tune import tune
    from runtime.config import config_from_dict
    from runtime.make_model import preset_config

    v3 = config_from_dict(preset_config("v3"))
    t = tune(v3, hypothetical([80], 512), ctx=4096, runnable_only=True)
    assert "gpu_experts" not in t.text and any("under 1/20 of the layer's 256" in r for r in t.reasons)
    assert "gpu_experts: {count: 1, device: cuda:0" in tune(v3, hypothetical([80], 512), ctx=4096).text


def test_explain_names_the_experts_kept_and_what_cannot_run(tiny_v3, tmp_path, capsys):
    stats_file(tmp_path / "stats.json")
    rules = tmp_path / "r.yaml"
    rules.write_text(split_rules(", routing: stats.json").replace("device: cpu, quant: fp32", "quant: bf16"))
    assert cli.main(["rules", "explain", "--model", str(tiny_v3), "--rules", str(rules), "--vram", "16", "--ram", "8",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = [m["gpu_experts"] for m in out["modules"] if m["gpu_experts"]]
    assert [g["experts"] for g in kept] == [[3, 7, 11, 12]] * 2 and all(g["device"] == "cuda:0" for g in kept)
    assert out["features_today"]["gpu_experts"] and all(m["runs_today"] for m in out["modules"])
    fp8 = tmp_path / "fp8-experts.yaml"  # kept experts run in torch: fp8 ones are not built
    fp8.write_text(open("rules/deepseek-v3-gpu-experts.yaml").read().replace("device: cuda:0, quant: bf16}",
                                                                            "device: cuda:0, quant: fp8}"))
    assert cli.main(["rules", "explain", "--preset", "v3", "--rules", str(fp8), "--vram", "80", "--ram", "512"]) == 0
    assert "gpu_experts in fp8 on cuda:0" in capsys.readouterr().out.splitlines()[-1]


def test_split_of_a_gguf_model_takes_the_files_blocks(tiny_v3, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q

    from .test_gguf import llama_cpp_gguf

    (path,) = llama_cpp_gguf(tiny_v3, tmp_path / "m.gguf", experts=Q.Q8_0)
    stats_file(tmp_path / "stats.json")
    rules = parse_rules(split_rules(", routing: stats.json").replace("quant: bf16", "quant: q8_0"),
                        str(tmp_path / "r.yaml"), MACHINE)
    plan = build_plan(rules, load_config(path), ctx=64)
    split = load_model(path, plan=plan, progress=False)
    whole = load_model(path, plan=build_plan(parse_rules(split_rules().replace("quant: bf16", "quant: q8_0").replace(
        "    gpu_experts: {count: 4, device: cpu, quant: fp32}\n", ""), "w.yaml", MACHINE), load_config(path), ctx=64),
        progress=False)
    assert isinstance(split.model.layers[1].mlp.experts, SplitExperts)
    a, b = greedy(split, PROMPT, 6), greedy(whole, PROMPT, 6)
    assert a[0] == b[0] and rel_err(a[1], b[1]) < 1e-2


def test_split_of_a_gguf_layer_keeps_its_own_down_format(tiny_v3, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q

    from .test_gguf import llama_cpp_gguf

    (path,) = llama_cpp_gguf(tiny_v3, tmp_path / "m.gguf", experts=Q.Q4_0, projection_types={"down": Q.Q8_0})
    from runtime.gguf_weights import GGUFWeights

    rules = parse_rules(split_rules().replace("quant: bf16", "quant: q4_0"), str(tmp_path / "r.yaml"), MACHINE)
    plan = build_plan(rules, load_config(path), ctx=64, stored_experts=GGUFWeights(path).stored_formats())
    model = load_model(path, plan=plan, progress=False)
    engine = model.model.layers[1].mlp.experts.slow.engine
    assert (engine.fmt, engine.down_fmt) == ("q4_0", "q8_0")  # the file's blocks, not requantized
    allocated, usage = allocated_bytes(model), plan.usage()
    assert abs(allocated["cpu"] - usage["cpu"].weights) <= 1024, (allocated, usage)


def test_an_error_between_start_and_finish_leaves_the_experts_usable(tiny_v3, monkeypatch):
    """Ctrl-C in the shared experts (or a failed graph capture) must not leave the CPU part started:
    the next forward would refuse with 'start() twice'."""
    from runtime.moe import MoE

    plan = build_plan(parse_rules(split_rules(), "r.yaml", MACHINE), load_config(tiny_v3), ctx=64)
    model = load_model(tiny_v3, plan=plan, progress=False)
    moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(3, model.cfg.hidden_size)
    want = moe(x)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(moe.shared_experts, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            moe(x)
    with monkeypatch.context() as m:
        m.setattr("runtime.split_experts.fast_forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            moe(x)
    torch.testing.assert_close(moe(x), want)
