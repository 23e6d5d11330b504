"""`hmoe convert`: HF directory -> GGUF as llama.cpp writes it, GGUF -> HF directory, round trips."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the GPU machine runs the tests from source without it

from runtime.checkpoint import Checkpoint
from runtime.config import load_config
from runtime.gguf_weights import GGUFWeights
from runtime.loader import checkpoint_names
from runtime.model import DeepseekForCausalLM
from runtime.tokenizer import Tokenizer
from tests.test_gguf import hmoe, llama_cpp_gguf, one_error_line

Q = gguf.GGMLQuantizationType


def tensors_of(path):
    return {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data)) for t in gguf.GGUFReader(path).tensors}


def metadata_of(path):
    skip = ("general.", "GGUF.", "split.")
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith(skip)}


def hf_tensors(model_dir):
    ckpt, cfg = Checkpoint(model_dir), load_config(model_dir)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    return {name: ckpt.read(name, tuple(t.shape)) for name, t in checkpoint_names(model)}


@pytest.mark.parametrize("mla", ["split", "kv_b"])
def test_hf_to_gguf_writes_what_llama_cpp_writes(tiny_v3, tmp_path, mla):
    ours = tmp_path / "ours.gguf"
    rc, _, err = hmoe("convert", "--model", tiny_v3, "--out", ours, "--experts", "f32", "--dtype", "f32", "--mla", mla)
    assert rc == 0, err
    (theirs,) = llama_cpp_gguf(tiny_v3, tmp_path / "theirs.gguf", mla=mla)
    a, b = tensors_of(ours), tensors_of(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert np.array_equal(a[name][2], b[name][2]), name
    ma, mb = metadata_of(ours), metadata_of(theirs)
    assert {k: v for k, v in ma.items() if k.startswith("deepseek2.")} == \
           {k: v for k, v in mb.items() if k.startswith("deepseek2.")}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ma[key] == mb[key], key


def test_round_trip_hf_gguf_hf_is_exact(tiny_v3, tmp_path):
    path, back = tmp_path / "m.gguf", tmp_path / "back"
    assert hmoe("convert", "-m", tiny_v3, "-o", path, "--experts", "f32", "--dtype", "f32")[0] == 0
    rc, out, err = hmoe("convert", "-m", path, "-o", back, "--dtype", "f32")
    assert rc == 0 and out.startswith(f"wrote {back}"), err
    assert load_config(back) == load_config(tiny_v3)
    a, b = hf_tensors(tiny_v3), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The quick brown fox <｜User｜>hi<｜Assistant｜>"
    assert Tokenizer(back).encode(text) == Tokenizer(tiny_v3).encode(text)
    msgs = [{"role": "user", "content": "hello"}]
    assert Tokenizer(back).render_chat(msgs) == Tokenizer(tiny_v3).render_chat(msgs)


def test_q8_0_experts_survive_gguf_hf_gguf_byte_for_byte(tiny_v3, tmp_path):
    first, back, second = tmp_path / "a.gguf", tmp_path / "back", tmp_path / "b.gguf"
    for args in (("-m", tiny_v3, "-o", first, "--experts", "q8_0"), ("-m", first, "-o", back, "--dtype", "f32"),
                 ("-m", back, "-o", second, "--experts", "q8_0")):
        rc, _, err = hmoe("convert", *args)
        assert rc == 0, err
    a, b = tensors_of(first), tensors_of(second)
    experts = [n for n in a if "_exps." in n]
    assert experts and all(a[n][0] == Q.Q8_0 for n in experts)
    assert all(np.array_equal(a[n][2], b[n][2]) for n in a)  # bf16 dense weights too: f32 holds them exactly


def test_split_output_loads(tiny_v3, tmp_path):
    rc, out, err = hmoe("convert", "-m", tiny_v3, "-o", tmp_path / "m.gguf", "--split-max-tensors", "15",
                        "--experts", "bf16")
    assert rc == 0 and "m-00001-of-" in out, err
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 1 and not (tmp_path / "m.gguf").exists()
    weights = GGUFWeights(shards[0])
    assert weights.expert_format() == "bf16"
    a = hf_tensors(tiny_v3)
    for name in ("model.layers.2.self_attn.kv_b_proj.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(weights.read(name, tuple(a[name].shape)).to(torch.bfloat16), a[name].to(torch.bfloat16))


def test_convert_errors_are_one_line(tiny_v3, tmp_path):
    cases = [
        (("-m", tiny_v3, "-o", tmp_path / "x.gguf", "--experts", "q4_k"), "rows of 64 values do not divide into Q4_K"),
        (("-m", tiny_v3, "-o", tmp_path / "x.bin"), "the output of a directory is a GGUF; name it *.gguf"),
        (("-m", tiny_v3, "-o", tmp_path / "x.gguf", "--split-max-size", "lots"), "expected a size like 48G"),
        (("-m", tmp_path / "none.gguf", "-o", tmp_path / "d"), "none.gguf: no such file"),
    ]
    for args, message in cases:
        assert message in one_error_line(hmoe("convert", *args))
    (tmp_path / "x.gguf").unlink(missing_ok=True)
    assert not list(tmp_path.glob("*.gguf"))  # a failed conversion leaves no file behind


def test_gguf_config_json_is_complete(tiny_v3, tmp_path):
    path, back = tmp_path / "m.gguf", tmp_path / "back"
    assert hmoe("convert", "-m", tiny_v3, "-o", path)[0] == 0
    assert hmoe("convert", "-m", path, "-o", back)[0] == 0
    raw = json.loads((back / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["rope_scaling"]["mscale_all_dim"] == 1.0 and raw["n_group"] == 4


def test_format_names_of_the_command_match_the_converter():
    from runtime.commands import convert
    from runtime import gguf_convert

    assert tuple(gguf_convert.EXPERT_FORMATS) == convert.EXPERT_FORMATS
    assert tuple(gguf_convert.DENSE_FORMATS) == convert.DENSE_FORMATS
    assert tuple(gguf_convert.MLA_LAYOUTS) == convert.MLA_LAYOUTS
