"""llama.cpp deepseek2 GGUF files: config, tensors (both MLA layouts), tokenizer, split files,
routed experts handed to the CPU kernels as the file's own blocks, and one-line errors for bad files.

The GGUFs here are written by `llama_cpp_gguf`, which follows llama.cpp's convert_hf_to_gguf.py
(DeepseekV2Model) step by step with gguf.GGUFWriter and gguf's own tensor-name map, independently
of hmoe's reader and of hmoe's converter.
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the GPU machine runs the tests from source without it

from placement.inventory import hypothetical
from placement.plan import build_plan
from placement.schema import parse_rules
from runtime.config import config_from_dict, load_config
from runtime.errors import ConfigError, HmoeError
from runtime.gguf_file import GGUFError
from runtime.gguf_weights import GGUFWeights, natural_format
from runtime.jit_experts import JitExperts
from runtime.loader import checkpoint_names, load_model
from runtime.make_model import preset_config, write_model, write_tokenizer
from runtime.model import DeepseekForCausalLM
from runtime.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
OURS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K, "bf16": Q.BF16}
IDS = torch.randint(2, 1000, (1, 24), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- writing GGUFs as llama.cpp does

def _quantize(x: np.ndarray, qtype) -> np.ndarray:
    if qtype in (Q.Q4_K, Q.Q6_K):  # gguf-py has no k-quant quantizer; ours is ggml's, byte for byte
        from cpu_experts.formats import quantize

        return quantize(x, {Q.Q4_K: "q4_k", Q.Q6_K: "q6_k"}[qtype])
    return gguf.quants.quantize(x, qtype)


def llama_cpp_gguf(hf_dir, path, *, mla="split", experts=Q.F32, dense=Q.F32, split_max_tensors=0, arch="deepseek2",
                   skip=(), drop_keys=(), projection_types=None):
    """A GGUF of an HF DeepSeek directory as llama.cpp's converter writes it (tensor by tensor).
    projection_types: e.g. {"down": Q.Q6_K} overrides `experts` for ffn_{proj}_exps (Q4_K_M's mix)."""
    from safetensors import safe_open

    hp = json.loads((hf_dir / "config.json").read_text())
    n_layers = hp["num_hidden_layers"]
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    keys = []

    def key(method, *value):
        keys.append((method, value))

    rope = hp.get("rope_scaling") or hp.get("rope_parameters") or {}
    key("add_block_count", n_layers)
    key("add_context_length", hp["max_position_embeddings"])
    key("add_embedding_length", hp["hidden_size"])
    key("add_feed_forward_length", hp["intermediate_size"])
    key("add_head_count", hp["num_attention_heads"])
    key("add_head_count_kv", 1 if mla == "split" else hp["num_attention_heads"])
    key("add_rope_freq_base", rope.get("rope_theta", hp.get("rope_theta", 10000.0)))
    key("add_layer_norm_rms_eps", hp["rms_norm_eps"])
    key("add_expert_count", hp["n_routed_experts"])
    key("add_expert_used_count", hp["num_experts_per_tok"])
    key("add_expert_group_count", hp.get("n_group", 1))
    key("add_expert_group_used_count", hp.get("topk_group", 1))
    key("add_expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID if hp.get("scoring_func") == "sigmoid"
        else gguf.ExpertGatingFuncType.SOFTMAX)
    key("add_leading_dense_block_count", hp["first_k_dense_replace"])
    key("add_vocab_size", hp["vocab_size"])
    if hp.get("q_lora_rank") is not None:
        key("add_q_lora_rank", hp["q_lora_rank"])
    key("add_kv_lora_rank", hp["kv_lora_rank"])
    if mla == "split":
        key("add_key_length", hp["kv_lora_rank"] + hp["qk_rope_head_dim"])
        key("add_value_length", hp["kv_lora_rank"])
        key("add_key_length_mla", hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
        key("add_value_length_mla", hp["v_head_dim"])
    else:  # before llama.cpp's MLA change
        key("add_key_length", hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
        key("add_value_length", hp["v_head_dim"])
    key("add_expert_feed_forward_length", hp["moe_intermediate_size"])
    key("add_expert_shared_count", hp["n_shared_experts"])
    key("add_expert_weights_scale", hp.get("routed_scaling_factor", 1.0))
    if hp.get("norm_topk_prob"):
        key("add_expert_weights_norm", True)
    key("add_rope_dimension_count", hp["qk_rope_head_dim"])
    if rope.get("rope_type", rope.get("type")) == "yarn":
        key("add_rope_scaling_type", gguf.RopeScalingType.YARN)
        key("add_rope_scaling_factor", rope["factor"])
        key("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"])
        key("add_rope_scaling_yarn_beta_fast", rope.get("beta_fast", 32))
        key("add_rope_scaling_yarn_beta_slow", rope.get("beta_slow", 1))
        key("add_rope_scaling_yarn_log_mul", 0.1 * rope["mscale_all_dim"])
    for method, value in keys:
        if method not in drop_keys:
            getattr(w, method)(*value)
    _add_vocab(w, hf_dir, hp)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors |= {k: f.get_tensor(k).float() for k in f.keys()}
    out = []
    for name, data in tensors.items():
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if ".mlp.experts." in name:
            continue
        if name.endswith("kv_b_proj.weight") and mla == "split":
            H, v, nope = hp["num_attention_heads"], hp["v_head_dim"], hp["qk_nope_head_dim"]
            kv_b = data.view(H, v + nope, data.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
            out += [(name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)),
                    (name.replace("kv_b_proj", "v_b_proj"), v_b)]
            continue
        out.append((name, data))
    for layer in range(n_layers):  # the experts merged into one 3D tensor per projection
        for proj in ("down_proj", "gate_proj", "up_proj"):
            parts = [tensors.get(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight") for e in range(hp["n_routed_experts"])]
            if parts[0] is not None:
                out.append((f"model.layers.{layer}.mlp.experts.{proj}.weight", torch.stack(parts)))
    for name, data in out:
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname, name
        if gname in skip:
            continue
        x = data.contiguous().numpy()
        qtype = Q.F32 if x.ndim == 1 or "ffn_gate_inp" in gname else experts if "_exps" in gname else dense
        for proj, t in (projection_types or {}).items():
            qtype = t if f"ffn_{proj}_exps" in gname else qtype
        if x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16  # llama.cpp's fallback for rows its blocks cannot hold
        if qtype == Q.F32:
            w.add_tensor(gname, x)
        else:
            w.add_tensor(gname, _quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(path.parent.glob(path.stem + "*.gguf")) if split_max_tensors else [path]


def _add_vocab(w, hf_dir, hp):
    """As llama.cpp's _set_vocab_gpt2 + SpecialVocab: tokens padded to vocab_size, types, merges, ids."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    added = {t["id"]: t for t in tj["added_tokens"]}
    by_id = {i: t for t, i in tj["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(hp["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokens.index(tc["bos_token"]))
    w.add_eos_token_id(tokens.index(tc["eos_token"]))
    w.add_add_bos_token(tc["add_bos_token"])
    w.add_chat_template(tc["chat_template"])


def write_hf(out, raw, seed=0):
    """A random HF checkpoint of any shape (fp32), with make_model's tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(raw)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in checkpoint_names(model):
        shape = tuple(t.shape)
        tensors[name] = (1 + 0.1 * torch.randn(shape, generator=gen) if len(shape) == 1 and "norm" in name else
                         0.05 * torch.randn(shape, generator=gen) if len(shape) == 1 else
                         torch.randn(shape, generator=gen) * shape[-1] ** -0.5)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(raw))
    write_tokenizer(out, max_vocab=raw["vocab_size"])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_v3):
    """HF directories: tiny-v3 (sigmoid, YaRN, q_lora), tiny-v2 (softmax, no q_lora), and one with
    rows of 256 for the k-quants."""
    root = tmp_path_factory.mktemp("gguf_models")
    wide = {**preset_config("tiny-v3", layers=2), "hidden_size": 256, "moe_intermediate_size": 256,
            "intermediate_size": 256, "num_attention_heads": 2, "n_routed_experts": 8, "n_group": 2, "topk_group": 1,
            "num_experts_per_tok": 2, "torch_dtype": "float32"}
    return {"v3": tiny_v3, "v2": write_model(root / "v2", "tiny-v2", dtype="fp32", seed=1, progress=False),
            "wide": write_hf(root / "wide", wide, seed=2)}


def logits(model, ids=IDS):
    return model(ids, cache=model.new_cache(batch=1, max_len=32))


def jit_plan(path, fmt):
    rules = parse_rules(f"name: jit\nrules:\n  - match: 'model\\.layers\\.\\d+\\.mlp\\.experts'\n    op: jit\n"
                        f"    quant: {fmt}\n    threads: 2\n  - match: '.*'\n    dtype: fp32\n", "jit.yaml",
                        hypothetical([], 8))
    return build_plan(rules, load_config(path), ctx=32)


# ---------------------------------------------------------------- config and tensors

@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("mla", ["split", "kv_b"])
def test_gguf_model_equals_the_safetensors_model(models, tmp_path, kind, mla):
    (path,) = llama_cpp_gguf(models[kind], tmp_path / "m.gguf", mla=mla)
    assert load_config(path) == load_config(models[kind])
    ref, ours = load_model(models[kind], dtype="float32"), load_model(path)  # an all-F32 GGUF loads as fp32
    a, b = ref.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(ours), logits(ref))


def test_quantized_dense_weights_load_as_bf16(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf", dense=Q.Q8_0, experts=Q.Q8_0)
    model = load_model(path)
    assert load_config(path).torch_dtype == "bfloat16" and model.lm_head.weight.dtype == torch.bfloat16
    ref = load_model(models["v3"], dtype="float32")
    a, b = logits(ref), logits(model)
    assert float((b - a).norm() / a.norm()) < 0.1


def test_missing_keys_take_llama_cpp_defaults_and_required_ones_are_named(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v2"], tmp_path / "old.gguf", mla="kv_b",
                             drop_keys=("add_expert_gating_func", "add_expert_group_count", "add_expert_group_used_count"))
    cfg = load_config(path)  # a V2 file from before these keys: softmax, greedy, one group
    assert (cfg.architecture, cfg.scoring_func, cfg.topk_method, cfg.n_group) == ("DeepseekV2ForCausalLM", "softmax",
                                                                                  "greedy", 1)
    (path,) = llama_cpp_gguf(models["v2"], tmp_path / "bad.gguf", drop_keys=("add_expert_count",))
    with pytest.raises(GGUFError, match=r"bad.gguf: missing required key 'deepseek2.expert_count'"):
        load_config(path)
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "mla.gguf", drop_keys=("add_key_length_mla",))
    with pytest.raises(ConfigError, match=r"missing required key 'deepseek2.attention.key_length_mla'"):
        load_config(path)


# ---------------------------------------------------------------- routed experts

def _spy_blocks(monkeypatch, down_format=False):
    from cpu_experts.experts import CPUExperts

    seen = []
    original = CPUExperts.from_blocks.__func__

    def spy(cls, gate, up, down, **kw):
        fmt = (kw["fmt"], kw.get("down_fmt") or kw["fmt"]) if down_format else kw["fmt"]
        seen.append((fmt, gate, up, down))
        return original(cls, gate, up, down, **kw)

    monkeypatch.setattr(CPUExperts, "from_blocks", classmethod(spy))
    return seen


@pytest.mark.parametrize("kind, fmt", [("v3", "q8_0"), ("v3", "q4_0"), ("wide", "q4_k"), ("wide", "q6_k")])
def test_quantized_experts_reach_the_kernels_byte_identical(models, tmp_path, monkeypatch, capsys, kind, fmt):
    (path,) = llama_cpp_gguf(models[kind], tmp_path / "m.gguf", experts=OURS[fmt])
    assert GGUFWeights(path).expert_format() == fmt
    seen = _spy_blocks(monkeypatch)
    jit = load_model(path, plan=jit_plan(path, fmt))
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    moe = [i for i, layer in enumerate(jit.model.layers) if isinstance(getattr(layer.mlp, "experts", None), JitExperts)]
    assert len(seen) == len(moe) > 0
    for layer, (got_fmt, *blocks) in zip(moe, seen):
        assert got_fmt == fmt
        for proj, got in zip(("gate", "up", "down"), blocks):
            assert np.array_equal(np.asarray(got), stored[f"blk.{layer}.ffn_{proj}_exps.weight"])
    assert "warning" not in capsys.readouterr().err  # nothing was requantized
    # the kernels compute what the dequantized weights compute
    ref = load_model(path)
    gen = torch.Generator().manual_seed(1)
    cfg = ref.cfg
    x = torch.randn(6, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:cfg.num_experts_per_tok] for _ in range(6)])
    w = torch.rand(6, cfg.num_experts_per_tok, generator=gen)
    with torch.no_grad():
        a = ref.model.layers[moe[0]].mlp.experts(x, ids, w)
        b = jit.model.layers[moe[0]].mlp.experts(x, ids, w)
    assert float((b - a).norm() / a.norm()) < 3e-2


def test_other_expert_types_are_requantized_with_one_warning(models, tmp_path, monkeypatch, capsys):
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf", experts=Q.Q5_0)
    weights = GGUFWeights(path)
    assert weights.expert_format() == "q8_0"  # q6_k would keep more bits, but needs rows of 256
    seen = _spy_blocks(monkeypatch)
    load_model(path, plan=jit_plan(path, "q8_0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q5_0" in err[0] and "requantized to q8_0" in err[0], err
    from cpu_experts.formats import quantize

    q5 = gguf.GGUFReader(path).tensors
    stored = {t.name: t.data for t in q5}
    first_moe = load_config(path).first_k_dense_replace
    expected = np.stack([quantize(gguf.quants.dequantize(e, Q.Q5_0), "q8_0")
                         for e in stored[f"blk.{first_moe}.ffn_up_exps.weight"]])
    assert np.array_equal(seen[0][2], expected)


def test_natural_format_keeps_precision():
    assert natural_format((Q.Q4_K, Q.Q4_K, Q.Q4_K), 256, 256) == "q4_k"
    assert natural_format((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256) == "q6_k"  # Q4_K_M's mixed layers
    assert natural_format((Q.Q2_K, Q.Q3_K, Q.Q3_K), 256, 256) == "q4_k"
    assert natural_format((Q.Q5_K, Q.Q5_K, Q.Q5_K), 256, 256) == "q6_k"
    assert natural_format((Q.IQ4_XS,) * 3, 256, 256) == "q4_k"
    assert natural_format((Q.F16,) * 3, 64, 32) == "bf16"
    assert natural_format((Q.Q4_K,) * 3, 2048, 1408) == "q4_0"  # V2-Lite's inter 1408 is no multiple of 256
    assert natural_format((Q.Q6_K,) * 3, 2048, 1408) == "q8_0"


# ---------------------------------------------------------------- split files

def test_split_gguf_loads_from_any_shard(models, tmp_path):
    shards = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf", split_max_tensors=12)
    assert len(shards) > 2 and shards[0].name == f"m-00001-of-{len(shards):05d}.gguf"
    (single,) = llama_cpp_gguf(models["v3"], tmp_path / "one.gguf")
    ref = load_model(single)
    model = load_model(shards[1])
    a, b = ref.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Tokenizer(shards[-1]).encode("Hello there") == Tokenizer(single).encode("Hello there")
    shards[-1].unlink()
    with pytest.raises(GGUFError, match=rf"{shards[-1].name}: no such file \(shard {len(shards)} of {len(shards)}"):
        load_config(shards[0])


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_and_chat_template_from_metadata(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf")
    ref, ours = Tokenizer(models["v3"], (1,)), Tokenizer(path, load_config(path).eos_token_ids)
    from runtime.demo_text import CORPUS

    text = CORPUS[:2000] + " 12345 ünïcödé  tabs\tand\nnewlines <｜User｜>x<｜Assistant｜>"
    assert ours.encode(text) == ref.encode(text) and ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert ours.render_chat(msgs) == ref.render_chat(msgs) and ours.encode_chat(msgs) == ref.encode_chat(msgs)
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (ref.bos_id, ref.eos_ids, ref.add_bos)


def test_deepseek_v3_pre_tokenizer_round_trips(tmp_path):
    """A tokenizer with DeepSeek-V3's pre-tokenizer: named 'deepseek-v3' in the GGUF, rebuilt identically."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from runtime.gguf_file import GGUFFile
    from runtime.gguf_tokenizer import PRE_TOKENIZERS, add_tokenizer, tokenizer_from_gguf

    spec = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
        for r in PRE_TOKENIZERS["deepseek-v3"]] + [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # for training; replaced below
    tok.decoder = decoders.ByteLevel()
    text = "Hello 世界! 1234567 ひらがな カタカナ can't\n\n  x = f(y) + 3.14;\tdone"
    tok.train_from_iterator([text] * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = spec
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "deepseek2")
    add_tokenizer(w, tmp_path, 400, None, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "t.gguf")
    assert f.get("tokenizer.ggml.pre") == "deepseek-v3"
    rebuilt, config = tokenizer_from_gguf(f)
    original = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sample = text + " 世界世界 99999 <s>"
    assert rebuilt.encode(sample).ids == original.encode(sample).ids
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"


def test_deepseek_llm_letters_are_runs_of_cased_letters():
    """The code point ranges of DeepSeek-LLM's letter class: each a maximal run of Lu/Ll/Lt letters,
    which a mistyped bound would break."""
    import unicodedata

    from runtime.gguf_tokenizer import _LETTERS

    cased = {"Lu", "Ll", "Lt"}
    i = 0
    while i < len(_LETTERS):
        a = b = ord(_LETTERS[i])
        if i + 2 < len(_LETTERS) and _LETTERS[i + 1] == "-":
            b, i = ord(_LETTERS[i + 2]), i + 3
        else:
            i += 1
        assert all(unicodedata.category(chr(c)) in cased for c in range(a, b + 1)), hex(a)
        assert unicodedata.category(chr(a - 1)) not in cased and unicodedata.category(chr(b + 1)) not in cased, hex(a)


# ---------------------------------------------------------------- bad files

def hmoe(*args):
    """`hmoe ARGS` in this process (the CLI's parser and error handling, without a torch import per
    call): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(result) -> str:
    """The run failed with exit 2 and exactly one `hmoe: error:` line."""
    rc, _, err = result
    errors = [line for line in err.splitlines() if line.startswith("hmoe: error: ")]
    assert rc == 2 and len(errors) == 1, err
    return errors[0]


def test_truncated_file_is_one_line_naming_file_and_tensor(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(GGUFError, match=r"cut.gguf: truncated GGUF file: tensor '[a-z_.0-9]+' ends at byte \d+"):
        load_config(cut)
    line = one_error_line(hmoe("generate", "--model", cut, "-p", "hi", "-n", "1"))
    assert line.startswith(f"hmoe: error: {cut}: truncated GGUF file: tensor '")
    head = tmp_path / "head.gguf"
    head.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GGUFError, match=r"head.gguf: not a readable GGUF file, truncated or corrupt"):
        load_config(head)


def test_unknown_architecture_is_named(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v2"], tmp_path / "m.gguf", arch="llama")
    with pytest.raises(GGUFError, match=r"key 'general.architecture' is 'llama'; hmoe runs llama.cpp's 'deepseek2'"):
        load_model(path)


def test_missing_tensor_names_the_gguf_tensor(models, tmp_path):
    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf", skip=("blk.1.attn_kv_a_mqa.weight",
                                                                      "blk.2.attn_k_b.weight"))
    with pytest.raises(GGUFError, match=r"m.gguf: missing tensor 'blk.1.attn_kv_a_mqa.weight' "
                                        r"\(hmoe's 'model.layers.1.self_attn.kv_a_proj_with_mqa.weight'\)"):
        load_model(path)
    assert "missing tensor 'blk.1.attn_kv_a_mqa.weight'" in one_error_line(hmoe("generate", "--model", path, "-p", "hi"))


def test_not_a_gguf_and_no_such_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(HmoeError, match=r"junk.gguf: not a readable GGUF file"):
        load_config(junk)
    with pytest.raises(HmoeError, match=r"nothere.gguf: no such file"):
        load_config(tmp_path / "nothere.gguf")


def test_cli_runs_a_gguf(models, tmp_path):
    """As a user runs it: a subprocess."""
    from tests.test_cli import hmoe as subprocess_hmoe

    (path,) = llama_cpp_gguf(models["v3"], tmp_path / "m.gguf", experts=Q.Q8_0)
    r = subprocess_hmoe("generate", "--model", path, "-p", "Hello there", "-n", "4", "--json", "--no-pack-cache")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["generated_token_ids"]) == 4
    assert "jit q8_0" in r.stderr  # the default rules keep the file's expert format
    rc, out, err = hmoe("rules", "explain", "--model", path, "--vram", "0")
    assert rc == 0 and "q8_0" in out, err
