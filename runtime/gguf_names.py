"""hmoe's tensor names (the Hugging Face checkpoint's) <-> llama.cpp's deepseek2 GGUF names.

Layouts, as llama.cpp's convert_hf_to_gguf.py writes them (shapes in numpy order, [out, in];
GGUF lists the same dimensions reversed):
- every [out, in] matrix is stored as is; no RoPE rows are permuted, because llama.cpp runs
  deepseek2 with rope type NORM (adjacent pairs), the interleaved layout of DeepSeek's
  checkpoints that hmoe keeps too;
- routed experts are one tensor per layer and projection, ffn_{gate,up,down}_exps [E, out, in];
- kv_b_proj [H * (nope + v), kv_lora] is one attn_kv_b in older files and, since llama.cpp's MLA
  change (2025-04), attn_k_b [H, kv_lora, nope] (W_UK transposed per head) plus
  attn_v_b [H, v, kv_lora] (W_UV);
- e_score_correction_bias is exp_probs_b.bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# model.layers.{i}.<key> -> blk.{i}.<value>
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


@dataclass(frozen=True)
class Ref:
    """Where an hmoe tensor lives in a GGUF: a tensor, or one expert's slice of a 3D tensor."""
    gguf: str
    layer: int | None = None
    expert: int | None = None

    @property
    def is_kv_b(self) -> bool:
        return self.gguf.endswith(".attn_kv_b.weight")


def experts_name(layer: int, proj: str) -> str:
    """The 3D tensor of one layer's routed experts: proj is gate_proj, up_proj or down_proj."""
    return f"blk.{layer}.ffn_{proj.removesuffix('_proj')}_exps.weight"


def k_b_name(layer: int) -> str:
    return f"blk.{layer}.attn_k_b.weight"


def v_b_name(layer: int) -> str:
    return f"blk.{layer}.attn_v_b.weight"


def to_gguf(name: str) -> Ref | None:
    """The GGUF home of an hmoe tensor name, or None for a name deepseek2 GGUFs do not carry."""
    if name in GLOBAL:
        return Ref(GLOBAL[name])
    m = _LAYER_NAME.fullmatch(name)
    if not m:
        return None
    layer, rest = int(m[1]), m[2]
    if rest in LAYER:
        return Ref(f"blk.{layer}.{LAYER[rest]}", layer)
    e = _EXPERT.fullmatch(rest)
    if e:
        return Ref(experts_name(layer, e[2]), layer, int(e[1]))
    return None


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """attn_k_b [H, kv_lora, nope] + attn_v_b [H, v, kv_lora] -> kv_b_proj [H * (nope + v), kv_lora]."""
    kv_lora = k_b.shape[1]
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, kv_lora)


def split_kv_b(kv_b: np.ndarray, heads: int, nope: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [H * (nope + v), kv_lora] -> (attn_k_b [H, kv_lora, nope], attn_v_b [H, v, kv_lora])."""
    per_head = kv_b.reshape(heads, -1, kv_b.shape[-1])
    return (np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)),
            np.ascontiguousarray(per_head[:, nope:]))
