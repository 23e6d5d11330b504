"""Weights: FP8 block dequantization, sharded and single files, and one-line errors for bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError, ConfigError
from runtime.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from runtime.loader import load_model


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (7, 5)])
def test_fp8_block_dequant_matches_direct_computation(shape):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 3).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=gen) + 0.5
    expected = torch.empty(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            expected[i, j] = float(w[i, j].float()) * float(scales[i // 128, j // 128])
    assert torch.equal(dequantize_fp8_blocks(w, scales), expected)


def test_fp8_quantize_roundtrip_error_is_bounded():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(1))
    q, s = quantize_fp8_blocks(w)
    back = dequantize_fp8_blocks(q, s)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2**-4 per element
    assert float(((back - w).abs() / w.abs().clamp(min=1e-3)).median()) < 2**-4
    assert float((back - w).norm() / w.norm()) < 0.04


def test_fp8_scale_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_blocks(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(1, 1))


def test_fp8_checkpoint_loads_with_dequantized_weights(tmp_path, hf_v3):
    ref, path = hf_v3
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(path, fp8_dir)
    tensors = load_file(fp8_dir / "model.safetensors")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    q, s = quantize_fp8_blocks(tensors[name])
    tensors[name], tensors[name + "_scale_inv"] = q, s
    save_file(tensors, fp8_dir / "model.safetensors")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(fp8_dir, dtype="float32")
    assert torch.equal(model.model.layers[1].self_attn.kv_b_proj.weight, dequantize_fp8_blocks(q, s))


def test_sharded_checkpoint_equals_single_file(tmp_path, hf_v3):
    ref, path = hf_v3
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a, b = load_model(path, dtype="float32"), load_model(tmp_path, dtype="float32")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_mtp_layer_is_skipped(tmp_path, hf_v3):
    _, path = hf_v3
    shutil.copytree(path, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # num_hidden_layers = 3
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    load_model(tmp_path / "m", dtype="float32")


def _copy_with(tmp_path, path, edit):
    shutil.copytree(path, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    return tmp_path / "m"


def test_missing_tensor_names_the_tensor(tmp_path, hf_v3):
    bad = _copy_with(tmp_path, hf_v3[1], lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        load_model(bad)


def test_wrong_shape_names_file_tensor_and_shapes(tmp_path, hf_v3):
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = _copy_with(tmp_path, hf_v3[1], lambda t: t.__setitem__(name, torch.zeros(64, 60)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' "
                                              r"has shape \[64, 60\], the config implies \[64, 64\]"):
        load_model(bad)


def test_truncated_file_names_file_and_tensor(tmp_path, hf_v3):
    shutil.copytree(hf_v3[1], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '.+' ends at byte"):
        Checkpoint(tmp_path / "m")
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint(tmp_path / "m")


def test_missing_shard_names_the_shard(tmp_path, hf_v3):
    hf_v3[0].save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{shard.name}', which is missing"):
        Checkpoint(tmp_path)


def test_bad_config_names_the_key(tmp_path, hf_v3):
    shutil.copytree(hf_v3[1], tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("kv_lora_rank")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required key 'kv_lora_rank'"):
        load_model(tmp_path / "m")
