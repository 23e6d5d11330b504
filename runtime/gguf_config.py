"""The model config of a deepseek2 GGUF (its `deepseek2.*` metadata) and the reverse.

Reading builds the Hugging Face config.json dict that the metadata stands for and hands it to
`config_from_dict`, so every consistency check of config.json applies; its messages are
rewritten to name the GGUF key. Defaults follow llama.cpp for keys that older files lack:
softmax gating (V2 files predate `expert_gating_func`), no weight normalisation, scale 1, one
expert group (routing without group limit, as llama.cpp did before `expert_group_count`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, RopeScalingType

from .config import ModelConfig, config_from_dict
from .errors import ConfigError
from .gguf_file import ARCH, GGUFFile, open_gguf

A = ARCH + "."
V2, V3 = "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"

# config.json key -> the GGUF key it comes from (for messages)
GGUF_KEY = {
    "vocab_size": A + "vocab_size", "hidden_size": A + "embedding_length",
    "intermediate_size": A + "feed_forward_length", "num_hidden_layers": A + "block_count",
    "num_attention_heads": A + "attention.head_count", "q_lora_rank": A + "attention.q_lora_rank",
    "kv_lora_rank": A + "attention.kv_lora_rank", "qk_rope_head_dim": A + "rope.dimension_count",
    "qk_nope_head_dim": A + "attention.key_length_mla", "v_head_dim": A + "attention.value_length_mla",
    "moe_intermediate_size": A + "expert_feed_forward_length", "n_routed_experts": A + "expert_count",
    "n_shared_experts": A + "expert_shared_count", "num_experts_per_tok": A + "expert_used_count",
    "n_group": A + "expert_group_count", "topk_group": A + "expert_group_used_count",
    "scoring_func": A + "expert_gating_func", "norm_topk_prob": A + "expert_weights_norm",
    "routed_scaling_factor": A + "expert_weights_scale", "first_k_dense_replace": A + "leading_dense_block_count",
    "rms_norm_eps": A + "attention.layer_norm_rms_epsilon", "max_position_embeddings": A + "context_length",
    "rope_scaling.factor": A + "rope.scaling.factor", "factor": A + "rope.scaling.factor",
    "original_max_position_embeddings": A + "rope.scaling.original_context_length",
}


def load_gguf_config(path: str | Path) -> ModelConfig:
    return config_from_gguf(open_gguf(path))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    raw = hf_dict_from_gguf(f)
    try:
        return config_from_dict(raw, source=str(f.path))
    except ConfigError as e:  # name the GGUF key, not the config.json key it became
        raise ConfigError(re.sub(r"'([a-z_.]+)'", lambda m: f"'{GGUF_KEY.get(m[1], m[1])}'", str(e))) from None


def hf_dict_from_gguf(f: GGUFFile) -> dict:
    """The config.json dict a deepseek2 GGUF's metadata stands for."""
    gating = f.get(A + "expert_gating_func", int(ExpertGatingFuncType.SOFTMAX))
    if gating not in (ExpertGatingFuncType.SOFTMAX, ExpertGatingFuncType.SIGMOID):
        raise ConfigError(f"{f.path}: key '{A}expert_gating_func' is {gating}; DeepSeek routers are 1 (softmax, V2) "
                          f"or 2 (sigmoid, V3)")
    sigmoid = gating == ExpertGatingFuncType.SIGMOID
    n_group = f.get(A + "expert_group_count", 1)
    rope_dim = f.get(A + "rope.dimension_count")
    kv_lora = f.get(A + "attention.kv_lora_rank")
    nope, v_head = _head_dims(f, rope_dim, kv_lora)
    tokens = f.fields.get("tokenizer.ggml.tokens")  # counted, not decoded
    embd = f.tensors.get("token_embd.weight")
    vocab = f.get(A + "vocab_size", len(tokens.data) if tokens else int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        raise ConfigError(f"{f.path}: missing required key '{A}vocab_size' (and no token list or token_embd.weight)")
    raw = {
        "architectures": [V3 if sigmoid else V2],
        "vocab_size": vocab,
        "hidden_size": f.get(A + "embedding_length"),
        "intermediate_size": f.get(A + "feed_forward_length"),
        "num_hidden_layers": f.get(A + "block_count"),
        "num_attention_heads": f.get(A + "attention.head_count"),
        "q_lora_rank": f.get(A + "attention.q_lora_rank", 0) or None,  # V2-Lite: queries from one attn_q
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": v_head,
        "moe_intermediate_size": f.get(A + "expert_feed_forward_length"),
        "n_routed_experts": f.get(A + "expert_count"),
        "n_shared_experts": f.get(A + "expert_shared_count", 0),
        "num_experts_per_tok": f.get(A + "expert_used_count"),
        "n_group": n_group,
        "topk_group": f.get(A + "expert_group_used_count", 1),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else "group_limited_greedy" if n_group > 1 else "greedy",
        "norm_topk_prob": bool(f.get(A + "expert_weights_norm", False)),
        "routed_scaling_factor": _decimal(f.get(A + "expert_weights_scale", 1.0)),
        "first_k_dense_replace": f.get(A + "leading_dense_block_count", 0),
        "moe_layer_freq": 1,
        "rms_norm_eps": _decimal(f.get(A + "attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "max_position_embeddings": f.get(A + "context_length"),
        "rope_theta": _decimal(f.get(A + "rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(f),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _eos_ids(f),
        "torch_dtype": _torch_dtype(f),
        "hidden_act": "silu",
    }
    return raw


def _head_dims(f: GGUFFile, rope_dim: int, kv_lora: int) -> tuple[int, int]:
    """(qk_nope_head_dim, v_head_dim). Files since llama.cpp's MLA change give the per-head sizes in
    key/value_length_mla (key/value_length then describe the MQA form, kv_lora + rope and kv_lora)."""
    if A + "attention.key_length_mla" in f.fields:
        return f.get(A + "attention.key_length_mla") - rope_dim, f.get(A + "attention.value_length_mla")
    key = f.get(A + "attention.key_length", None)
    if key is None or key == kv_lora + rope_dim:
        raise ConfigError(f"{f.path}: missing required key '{A}attention.key_length_mla' (the query/key head size, "
                          f"e.g. 192)")
    return key - rope_dim, f.get(A + "attention.value_length")


def _rope_scaling(f: GGUFFile) -> dict | None:
    kind = f.get(A + "rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise ConfigError(f"{f.path}: key '{A}rope.scaling.type' is {kind!r}; hmoe supports 'none' and 'yarn'")
    rope = {
        "type": "yarn",
        "factor": _decimal(f.get(A + "rope.scaling.factor")),
        "original_max_position_embeddings": f.get(A + "rope.scaling.original_context_length"),
        "beta_fast": _decimal(f.get(A + "rope.scaling.yarn_beta_fast", 32.0)),
        "beta_slow": _decimal(f.get(A + "rope.scaling.yarn_beta_slow", 1.0)),
    }
    # llama.cpp keeps only 0.1 * mscale_all_dim; DeepSeek's configs have mscale == mscale_all_dim
    # (the cos/sin scale is then 1, as llama.cpp computes it).
    log_mul = f.get(A + "rope.scaling.yarn_log_multiplier", None)
    if log_mul is not None:
        rope["mscale"] = rope["mscale_all_dim"] = _decimal(_decimal(log_mul) / 0.1)
    return rope


def _decimal(x):
    """GGUF floats are float32: 2.827 reads back as 2.8269999; take the shortest decimal that the
    float32 rounds to (what the writer started from). Integers and None pass through."""
    return float(str(np.float32(x))) if isinstance(x, float) else x


def _eos_ids(f: GGUFFile) -> list[int]:
    ids = [f.get(k, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _torch_dtype(f: GGUFFile) -> str:
    """float32 when every weight outside the routed experts is F32; else bfloat16 (GPU-side tensors
    are dequantized to bf16, fp16 would overflow in the absorbed W_UK product)."""
    dense = [t for name, t in f.tensors.items() if "_exps." not in name and len(t.shape) > 1]
    return "float32" if dense and all(t.tensor_type == GGMLQuantizationType.F32 for t in dense) else "bfloat16"


def check_expressible(cfg: ModelConfig, source: str) -> None:
    """Refuse configs that have no deepseek2 GGUF equivalent."""
    if cfg.has_indexer:
        raise ConfigError(f"{source}: DeepSeek-V3.2's indexer has no deepseek2 GGUF equivalent")
    if cfg.moe_layer_freq != 1:
        raise ConfigError(f"{source}: key 'moe_layer_freq'={cfg.moe_layer_freq} has no deepseek2 GGUF equivalent (1)")
    if not cfg.rope_interleave:
        raise ConfigError(f"{source}: key 'rope_interleave'=false has no deepseek2 GGUF equivalent "
                          f"(llama.cpp rotates interleaved pairs)")


def add_metadata(w: GGUFWriter, cfg: ModelConfig, *, mla: str) -> None:
    """deepseek2.* keys as llama.cpp's converter writes them; mla 'split' (attn_k_b/attn_v_b) or 'kv_b'."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if mla == "split":  # the MQA form: one KV head of kv_lora + rope, values of kv_lora
        w.add_head_count_kv(1)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_key_length(cfg.qk_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    if cfg.rope.type == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope.factor)
        w.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(cfg.rope.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.rope.beta_slow)
        if cfg.rope.mscale_all_dim:
            w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope.mscale_all_dim)


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for a model read from a GGUF (`config_from_dict` of it gives `cfg` back)."""
    r = cfg.rope
    rope_scaling = None
    if r.type == "yarn":
        rope_scaling = {"type": "yarn", "factor": r.factor, "original_max_position_embeddings":
                        r.original_max_position_embeddings, "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                        "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim}
        if r.attention_factor is not None:
            rope_scaling["attention_factor"] = r.attention_factor
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": [cfg.architecture],
        "model_type": {V2: "deepseek_v2", V3: "deepseek_v3"}.get(cfg.architecture, "deepseek_v32"),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "topk_method": cfg.topk_method, "scoring_func": cfg.scoring_func, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor, "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": cfg.moe_layer_freq, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": r.theta, "rope_scaling": rope_scaling, "rope_interleave": cfg.rope_interleave,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "torch_dtype": cfg.torch_dtype, "hidden_act": "silu", "attention_bias": False,
    }
