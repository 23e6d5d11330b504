"""Synthetic DeepSeek checkpoints with random weights, at tiny or real shapes.

Writes a Hugging Face style directory (config.json, sharded safetensors, tokenizer.json,
tokenizer_config.json with a chat template). Deterministic for a seed: every tensor has its own
random stream, and tensors are generated and written in row chunks, so a full-size V2-Lite
(~31 GB in bf16) needs about 1 GB of RAM: tensors are made on all cores, at most 1 GB of them
held at once.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .config import config_from_dict
from .demo_text import CORPUS
from .errors import HmoeError
from .fp8 import quantize_fp8_blocks
from .loader import checkpoint_names
from .model import DeepseekForCausalLM
from .safetensors_writer import ShardWriter, TensorSpec, plan_shards, write_index

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-V3's template, reduced to system / user / assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

_COMMON = {"bos_token_id": 0, "eos_token_id": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "hidden_act": "silu", "attention_bias": False}

_TINY_V3 = {
    **_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 16,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "max_position_embeddings": 2048, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}

_V3 = {
    **_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "max_position_embeddings": 163840, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}

PRESETS = {
    "tiny-v2": {
        **_COMMON, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": None, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
        "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "rope_scaling": None,
    },
    "tiny-v3": _TINY_V3,
    "tiny-v32": {**_TINY_V3, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
                 "index_n_heads": 4, "index_head_dim": 16, "index_topk": 64},
    "v2-lite": {
        **_COMMON, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 163840, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "v3": _V3,
    "v32": {**_V3, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
            "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048},
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}

# Weights DeepSeek keeps out of FP8 in its own checkpoints.
_NOT_FP8 = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "e_score_correction_bias", "indexer")


def preset_config(preset: str, layers: int | None = None) -> dict:
    if preset not in PRESETS:
        raise HmoeError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    raw = copy.deepcopy(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise HmoeError(f"--layers must be >= 1, got {layers}")
        raw["num_hidden_layers"] = layers
        raw["first_k_dense_replace"] = min(raw["first_k_dense_replace"], layers)
    return raw


def tensor_specs(raw: dict, dtype: torch.dtype) -> list[tuple[TensorSpec, str]]:
    """(spec, init) for every checkpoint tensor, in the loader's own order; init is how to fill it."""
    cfg = config_from_dict(raw)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    specs = []
    for name, dest in checkpoint_names(model):  # includes V3.2's self_attn.indexer.* (transformers' names)
        specs.extend(_specs_for(name, tuple(dest.shape), dtype))
    return specs


def _specs_for(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[TensorSpec, str]]:
    if name.endswith("e_score_correction_bias"):
        return [(TensorSpec(name, shape, torch.float32), "bias")]
    if len(shape) == 1:  # norm weights are 1, the indexer's LayerNorm bias 0
        return [(TensorSpec(name, shape, dtype if dtype != torch.float8_e4m3fn else torch.bfloat16),
                 "zeros" if name.endswith(".bias") else "ones")]
    init = "embedding" if "embed_tokens" in name else "linear"
    if dtype == torch.float8_e4m3fn:
        if any(k in name for k in _NOT_FP8):
            return [(TensorSpec(name, shape, torch.bfloat16), init)]
        scales = (-(-shape[0] // 128), -(-shape[1] // 128))
        return [(TensorSpec(name, shape, dtype), init), (TensorSpec(name + "_scale_inv", scales, torch.float32), "scale")]
    return [(TensorSpec(name, shape, dtype), init)]


def _random_rows(spec: TensorSpec, init: str, seed: int, chunk_rows: int):
    """Yield fp32 row blocks of the tensor, from a random stream of its own."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    rows = spec.shape[0]
    cols = math.prod(spec.shape[1:])
    std = {"linear": cols**-0.5, "embedding": 1.0, "bias": 0.02}.get(init)
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        shape = (n,) + spec.shape[1:]
        if init == "ones":
            yield torch.ones(shape)
        elif init == "zeros":
            yield torch.zeros(shape)
        else:
            yield torch.randn(shape, generator=gen) * std


def _make_tensor(spec: TensorSpec, init: str, seed: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A tensor's bytes as row chunks in its dtype, and its FP8 block scales (None unless FP8)."""
    row_bytes = max(spec.nbytes // spec.shape[0], 1)
    chunk_rows = max(128, (64 << 20) // row_bytes // 128 * 128)  # ~64 MB, whole 128-row blocks
    chunks, scales = [], []
    for rows in _random_rows(spec, init, seed, chunk_rows):
        if spec.dtype == torch.float8_e4m3fn:
            q, scale_inv = quantize_fp8_blocks(rows)
            chunks.append(q)
            scales.append(scale_inv)
        else:
            chunks.append(rows.to(spec.dtype))
    return chunks, (torch.cat(scales) if scales else None)


def _made_in_parallel(order: list[TensorSpec], init_of: dict[str, str], seed: int, budget: int = 1 << 30):
    """_make_tensor for each spec, yielded in order, computed on all cores (torch's RNG and casts
    release the GIL; one stream per tensor keeps the bytes independent of the thread count) with at
    most `budget` bytes of finished or running tensors held at once (always at least one)."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque = deque()
        held, nxt = 0, 0
        while nxt < len(order) or queue:
            while nxt < len(order) and len(queue) < 2 * workers and (not queue or held + order[nxt].nbytes <= budget):
                spec = order[nxt]
                queue.append((spec.nbytes, pool.submit(_make_tensor, spec, init_of[spec.name], seed)))
                held += spec.nbytes
                nxt += 1
            nbytes, future = queue.popleft()
            yield future.result()
            held -= nbytes


def write_model(out_dir: str | Path, preset: str, *, layers: int | None = None, dtype: str = "bf16", seed: int = 0,
                shard_gb: float = 4.0, progress: bool = True) -> Path:
    out = Path(out_dir)
    raw = preset_config(preset, layers)
    torch_dtype = DTYPES[dtype]
    raw["torch_dtype"] = "bfloat16" if dtype == "fp8" else str(torch_dtype).removeprefix("torch.")
    if dtype == "fp8":
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    specs = tensor_specs(raw, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards([s for s, _ in specs], int(shard_gb * 2**30))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    init_of = {s.name: init for s, init in specs}
    total = sum(s.nbytes for s, _ in specs)
    order = [spec for shard in shards for spec in shard if init_of[spec.name] != "scale"]
    made = _made_in_parallel(order, init_of, seed)
    pending_scales: torch.Tensor | None = None  # FP8 block scales of the weight just written
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {preset}", disable=not progress) as bar:
        for shard, file in zip(shards, names):
            writer = ShardWriter(out / file, shard)
            for spec in shard:
                writer.begin(spec.name)
                if init_of[spec.name] == "scale":  # written right after its weight
                    writer.write(pending_scales)
                else:
                    chunks, pending_scales = next(made)
                    for chunk in chunks:
                        writer.write(chunk)
                bar.update(spec.nbytes)
            writer.close()
    write_index(out, shards, names)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_tokenizer(out, max_vocab=raw["vocab_size"])
    return out


def write_tokenizer(out: Path, max_vocab: int) -> None:
    """A byte-level BPE trained on a built-in English text, with DeepSeek-style special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(max_vocab, 1000), special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "model_max_length": 16384, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2, ensure_ascii=False) + "\n")
