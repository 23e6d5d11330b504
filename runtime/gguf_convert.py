"""Conversion between an HF-style model directory and a deepseek2 GGUF, both ways, tensor by tensor.

HF -> GGUF writes what llama.cpp's convert_hf_to_gguf.py writes (names, layouts, metadata,
tokenizer), with the routed experts in one of the formats the CPU kernels run (quantized by
cpu_experts.formats, byte-identical to ggml's reference quantizers); other weights in f32, bf16,
f16 or q8_0, norms and the router in f32 as llama.cpp keeps them. GGUF -> HF dequantizes every
tensor to bf16 or f32 safetensors with config.json and tokenizer files. Only one tensor is in
memory at a time (a layer's stacked experts for GGUF output).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .errors import HmoeError
from .gguf_config import add_metadata, check_expressible, config_from_gguf, hf_config
from .gguf_file import ARCH, open_gguf
from .gguf_names import PROJECTIONS, experts_name, k_b_name, split_kv_b, to_gguf, v_b_name
from .gguf_tokenizer import add_tokenizer, save_hf_tokenizer
from .gguf_weights import GGUFWeights
from .loader import checkpoint_names
from .model import DeepseekForCausalLM
from .safetensors_writer import ShardWriter, TensorSpec, plan_shards, write_index

Q = GGMLQuantizationType
EXPERT_FORMATS = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K}
DENSE_FORMATS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPE = {"f32": LlamaFileType.ALL_F32, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
             "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_M, "q6_k": LlamaFileType.MOSTLY_Q6_K}
MLA_LAYOUTS = ("split", "kv_b")


class ConvertError(HmoeError):
    pass


@dataclass
class _Job:
    name: str                       # GGUF tensor name
    shape: tuple[int, ...]          # logical shape, numpy order
    qtype: GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # fp32 values of `shape`

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def encode(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """fp32 values -> what GGUFWriter stores: F32/F16 arrays, or uint8 blocks [..., row_bytes]."""
    if qtype == Q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    from cpu_experts.formats import quantize

    return quantize(x, {v: k for k, v in EXPERT_FORMATS.items()}[qtype])


def hf_to_gguf(model_dir: str | Path, out: str | Path, *, experts: str = "q8_0", dtype: str = "bf16",
               mla: str = "split", split_max_size: int = 0, split_max_tensors: int = 0,
               progress: bool = False) -> list[Path]:
    """Write `out` (.gguf; shards `out-0000K-of-0000N.gguf` when split) from an HF model directory."""
    model_dir, out = Path(model_dir), Path(out)
    if experts not in EXPERT_FORMATS or dtype not in DENSE_FORMATS or mla not in MLA_LAYOUTS:
        raise ConvertError(f"expected experts in {list(EXPERT_FORMATS)}, dtype in {list(DENSE_FORMATS)}, mla in "
                           f"{list(MLA_LAYOUTS)}; got {experts!r}, {dtype!r}, {mla!r}")
    cfg = load_config(model_dir)
    check_expressible(cfg, str(model_dir / "config.json"))
    ckpt = Checkpoint(model_dir, cfg.fp8_block_size)
    jobs = _jobs(cfg, ckpt, EXPERT_FORMATS[experts], DENSE_FORMATS[dtype], mla)
    w = GGUFWriter(out, ARCH, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    w.add_name(model_dir.name)
    w.add_file_type(FILE_TYPE[experts])
    w.add_quantization_version(2)
    add_metadata(w, cfg, mla=mla)
    add_tokenizer(w, model_dir, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    for job in jobs:
        blocks = job.qtype not in (Q.F32, Q.F16)
        shape = (*job.shape[:-1], job.shape[-1] // GGML_QUANT_SIZES[job.qtype][0] * GGML_QUANT_SIZES[job.qtype][1])
        w.add_tensor_info(job.name, shape if blocks else job.shape,
                          np.dtype(np.uint8 if blocks else np.float16 if job.qtype == Q.F16 else np.float32),
                          job.nbytes, raw_dtype=job.qtype if blocks else None)
    files = w.format_shard_names(out)
    try:
        w.write_header_to_file(out)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, desc=f"writing {out.name}",
                  disable=not progress) as bar:
            for job in jobs:
                data = encode(job.produce(), job.qtype)
                assert data.nbytes == job.nbytes, job.name
                w.write_tensor_data(data)
                bar.update(job.nbytes)
        w.close()
    except BaseException:  # no half-written GGUF that looks complete to a reader's header
        w.close()
        for f in files:
            f.unlink(missing_ok=True)
        raise
    return files


def _jobs(cfg: ModelConfig, ckpt: Checkpoint, expert_type: GGMLQuantizationType, dense_type: GGMLQuantizationType,
          mla: str) -> list[_Job]:
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    names = list(dict.fromkeys(name for name, _ in checkpoint_names(model)))  # a tied lm_head is listed twice
    shapes = {name: tuple(t.shape) for name, t in checkpoint_names(model)}

    def read(name):
        return lambda: ckpt.read(name, shapes[name]).numpy()

    jobs, stacked = [], set()
    for name in names:
        ref = to_gguf(name)
        if ref is None:
            raise ConvertError(f"{name}: has no deepseek2 GGUF name")
        if ref.expert is not None:
            if ref.gguf not in stacked:
                stacked.add(ref.gguf)
                jobs.append(_experts_job(cfg, ckpt, ref.layer, ref.gguf, expert_type))
            continue
        shape = shapes[name]
        if ref.is_kv_b and mla == "split":
            jobs.extend(_split_kv_b_jobs(cfg, read(name), ref.layer, dense_type))
            continue
        keep_f32 = len(shape) == 1 or ".ffn_gate_inp." in ref.gguf  # as llama.cpp: norms, biases, router
        jobs.append(_Job(ref.gguf, shape, Q.F32 if keep_f32 else _dense_type(dense_type, shape), read(name)))
    return sorted(jobs, key=lambda j: _order(j.name))


def _dense_type(qtype: GGMLQuantizationType, shape) -> GGMLQuantizationType:
    """q8_0 needs rows of 32; narrower rows fall back to bf16 (not f16: W_UK overflows fp16)."""
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else Q.BF16


def _split_kv_b_jobs(cfg: ModelConfig, read_kv_b, layer: int, dense_type) -> list[_Job]:
    H, nope, v, kv_lora = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def part(i):  # each part reads kv_b again: small, and no state between jobs
        return lambda: split_kv_b(read_kv_b(), H, nope)[i]

    return [_Job(k_b_name(layer), (H, kv_lora, nope), _dense_type(dense_type, (nope,)), part(0)),
            _Job(v_b_name(layer), (H, v, kv_lora), _dense_type(dense_type, (kv_lora,)), part(1))]


def _experts_job(cfg: ModelConfig, ckpt: Checkpoint, layer: int, gguf_name: str, qtype) -> _Job:
    proj = next(p for p in PROJECTIONS if experts_name(layer, p) == gguf_name)
    E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rows, cols = (H, I) if proj == "down_proj" else (I, H)
    block = GGML_QUANT_SIZES[qtype][0]
    if cols % block:
        raise ConvertError(f"{gguf_name}: rows of {cols} values do not divide into {qtype.name}'s blocks of {block}; "
                           f"choose another --experts format")

    def produce():
        names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(E)]
        return np.stack([ckpt.read(n, (rows, cols)).numpy() for n in names])

    return _Job(gguf_name, (E, rows, cols), qtype, produce)


def _order(name: str) -> tuple:
    """llama.cpp's order: token_embd, then the blocks in order, then output_norm and output."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def gguf_to_hf(path: str | Path, out_dir: str | Path, *, dtype: str = "bf16", shard_gb: float = 4.0,
               progress: bool = False) -> Path:
    """Write an HF-style directory (config.json, safetensors shards, tokenizer files) from a GGUF."""
    torch_dtype = {"bf16": torch.bfloat16, "f32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ConvertError(f"safetensors output is bf16 or f32, not {dtype!r}")
    out = Path(out_dir)
    f = open_gguf(path)
    cfg = config_from_gguf(f)
    weights = GGUFWeights(path, cfg)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    specs = {}
    for name, t in checkpoint_names(model):
        keep = torch.float32 if name.endswith("e_score_correction_bias") else torch_dtype
        specs.setdefault(name, TensorSpec(name, tuple(t.shape), keep))
    shards = plan_shards(list(specs.values()), int(shard_gb * 2**30))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True, desc=f"writing {out.name}",
              disable=not progress) as bar:
        for shard, file in zip(shards, names):
            writer = ShardWriter(out / file, shard)
            for spec in shard:
                writer.begin(spec.name)
                writer.write(weights.read(spec.name, spec.shape, spec.dtype))
                bar.update(spec.nbytes)
            writer.close()
    write_index(out, shards, names)
    raw = hf_config(cfg) | {"torch_dtype": str(torch_dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_hf_tokenizer(f, out)
    return out
