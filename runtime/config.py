"""Model configuration: Hugging Face `config.json` of DeepSeek V2 / V3 / V3.2 into one frozen dataclass.

Strict about keys: a missing required key or two keys that contradict each other is one
`ConfigError` that names the key and the file. Derived sizes are properties, never stored twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")

# Router variants that exist in DeepSeek's code: (scoring_func, topk_method)
ROUTERS = {("softmax", "greedy"), ("softmax", "group_limited_greedy"), ("sigmoid", "noaux_tc")}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None

    @property
    def cos_sin_scale(self) -> float:
        """YaRN's magnitude correction applied to cos/sin (1 for plain RoPE)."""
        if self.type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Factor on the attention softmax scale: mscale(factor, mscale_all_dim)**2 under YaRN."""
        if self.type == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: queries come from one q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    fp8_block_size: tuple[int, int] | None = None
    # DeepSeek-V3.2 lightning indexer (DSA); None for V2/V3.
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: c_kv ‖ k_pe (576 for DeepSeek)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # qk_head_dim (192), never the absorbed 576: both attention forms must agree.
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale

    @property
    def has_indexer(self) -> bool:
        return self.index_topk is not None

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a model directory (or the file itself), or a GGUF's metadata."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from .gguf_config import load_gguf_config

        return load_gguf_config(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: no such file (a model directory holds config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    return config_from_dict(raw, source=str(file))


def config_from_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    keys = _Keys(raw, source)
    arch = _architecture(raw, source)
    v3 = arch != "DeepseekV2ForCausalLM"
    v32 = arch == "DeepseekV32ForCausalLM"
    # q_lora_rank must be present; null is meaningful (V2-Lite projects queries directly)
    q_lora = keys.int("q_lora_rank") if keys.get("q_lora_rank", required=True) is not None else None

    cfg = ModelConfig(
        architecture=arch,
        vocab_size=keys.int("vocab_size"),
        hidden_size=keys.int("hidden_size"),
        intermediate_size=keys.int("intermediate_size"),
        num_hidden_layers=keys.int("num_hidden_layers"),
        num_attention_heads=keys.int("num_attention_heads"),
        q_lora_rank=q_lora,
        kv_lora_rank=keys.int("kv_lora_rank"),
        qk_nope_head_dim=keys.int("qk_nope_head_dim"),
        qk_rope_head_dim=keys.int("qk_rope_head_dim"),
        v_head_dim=keys.int("v_head_dim"),
        moe_intermediate_size=keys.int("moe_intermediate_size"),
        n_routed_experts=keys.int("n_routed_experts"),
        n_shared_experts=keys.int("n_shared_experts", default=0),
        num_experts_per_tok=keys.int("num_experts_per_tok"),
        n_group=keys.int("n_group", default=1),
        topk_group=keys.int("topk_group", default=1),
        topk_method=keys.str("topk_method", default="noaux_tc" if v3 else "greedy"),
        scoring_func=keys.str("scoring_func", default="sigmoid" if v3 else "softmax"),
        norm_topk_prob=keys.bool("norm_topk_prob", default=v3),
        routed_scaling_factor=keys.float("routed_scaling_factor", default=1.0),
        first_k_dense_replace=keys.int("first_k_dense_replace", default=0, minimum=0),
        moe_layer_freq=keys.int("moe_layer_freq", default=1),
        rms_norm_eps=keys.float("rms_norm_eps", default=1e-6),
        tie_word_embeddings=keys.bool("tie_word_embeddings", default=False),
        max_position_embeddings=keys.int("max_position_embeddings", default=4096),
        rope=_rope(raw, keys),
        rope_interleave=keys.bool("rope_interleave", default=True),
        bos_token_id=keys.int("bos_token_id", default=None, minimum=0),
        eos_token_ids=_eos(raw, source),
        torch_dtype=keys.str("torch_dtype", default=None) or keys.str("dtype", default="bfloat16"),
        fp8_block_size=_fp8_block(raw, source),
        index_n_heads=keys.int("index_n_heads", default=None) if v32 else None,
        index_head_dim=keys.int("index_head_dim", default=None) if v32 else None,
        index_topk=keys.int("index_topk", default=None) if v32 else None,
    )
    _check_consistency(cfg, raw, source)
    return cfg


class _Keys:
    """Typed access to config keys with errors that name the key."""

    _MISSING = object()

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, key, default=_MISSING, required=False):
        if key in self.raw:
            return self.raw[key]
        if required or default is self._MISSING:
            raise ConfigError(f"{self.source}: missing required key '{key}'")
        return default

    def int(self, key, default=_MISSING, minimum=1):
        """An integer >= minimum; null counts as absent when there is a default."""
        value = self.get(key, default)
        if value is None and default is not self._MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.source}: key '{key}' must be an integer >= {minimum}, found {value!r}")
        return value

    def float(self, key, default=_MISSING):
        value = self.get(key, default)
        if value is None and default is not self._MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.source}: key '{key}' must be a number, found {value!r}")
        return float(value)

    def bool(self, key, default=_MISSING):
        value = self.get(key, default)
        if value is None:
            return bool(default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: key '{key}' must be true or false, found {value!r}")
        return value

    def str(self, key, default=_MISSING):
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.source}: key '{key}' must be a string, found {value!r}")
        return value


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures")
    if archs is None:
        by_type = {"deepseek_v2": ARCHITECTURES[0], "deepseek_v3": ARCHITECTURES[1], "deepseek_v32": ARCHITECTURES[2]}
        if raw.get("model_type") in by_type:
            return by_type[raw["model_type"]]
        raise ConfigError(f"{source}: missing required key 'architectures' (e.g. [\"DeepseekV3ForCausalLM\"])")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(f"{source}: key 'architectures' is {archs!r}; hmoe runs {', '.join(ARCHITECTURES)}")
    return archs[0]


def _rope(raw: dict, keys: _Keys) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs and
    # DeepSeek's own write `rope_scaling` (null for plain RoPE) plus a top-level `rope_theta`.
    if raw.get("rope_parameters") is not None and raw.get("rope_scaling") is not None:
        raise ConfigError(f"{keys.source}: both 'rope_parameters' and 'rope_scaling' are set; keep one")
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{keys.source}: key '{key}' must be an object, found {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{keys.source}: key '{key}.rope_type' is {rope_type!r}; hmoe supports 'default' and 'yarn'")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    sub = _Keys(params, f"{keys.source}: '{key}'")
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=sub.float("factor"),
        original_max_position_embeddings=sub.int(
            "original_max_position_embeddings", default=raw.get("max_position_embeddings", 4096)
        ),
        beta_fast=sub.float("beta_fast", default=32.0),
        beta_slow=sub.float("beta_slow", default=1.0),
        mscale=sub.float("mscale", default=0.0) if params.get("mscale") is not None else 0.0,
        mscale_all_dim=sub.float("mscale_all_dim", default=0.0) if params.get("mscale_all_dim") is not None else 0.0,
        attention_factor=sub.float("attention_factor") if params.get("attention_factor") is not None else None,
    )


def _eos(raw: dict, source: str) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{source}: key 'eos_token_id' must be a token id or a list of them, found {eos!r}")
    return tuple(ids)


def _fp8_block(raw: dict, source: str) -> tuple[int, int] | None:
    q = raw.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{source}: key 'quantization_config.quant_method' is {method!r}; hmoe reads 'fp8' checkpoints")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: key 'quantization_config.weight_block_size' must be two positive integers, found {block!r}")
    return tuple(block)


def _check_consistency(cfg: ModelConfig, raw: dict, source: str) -> None:
    def bad(msg):
        raise ConfigError(f"{source}: {msg}")

    if (cfg.scoring_func, cfg.topk_method) not in ROUTERS:
        bad(f"keys 'scoring_func'={cfg.scoring_func!r} and 'topk_method'={cfg.topk_method!r} do not form a DeepSeek router "
            f"(expected one of {sorted(ROUTERS)})")
    if cfg.n_routed_experts % cfg.n_group:
        bad(f"key 'n_group'={cfg.n_group} does not divide 'n_routed_experts'={cfg.n_routed_experts}")
    if cfg.topk_group > cfg.n_group:
        bad(f"key 'topk_group'={cfg.topk_group} is larger than 'n_group'={cfg.n_group}")
    per_group = cfg.n_routed_experts // cfg.n_group
    if cfg.topk_method != "greedy" and cfg.num_experts_per_tok > cfg.topk_group * per_group:
        bad(f"key 'num_experts_per_tok'={cfg.num_experts_per_tok} exceeds the experts in 'topk_group' groups "
            f"({cfg.topk_group} x {per_group})")
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        bad(f"key 'num_experts_per_tok'={cfg.num_experts_per_tok} exceeds 'n_routed_experts'={cfg.n_routed_experts}")
    if cfg.topk_method == "noaux_tc" and per_group < 2:
        bad(f"key 'n_group'={cfg.n_group} leaves {per_group} expert per group; 'noaux_tc' scores groups by their top 2")
    if cfg.qk_rope_head_dim % 2:
        bad(f"key 'qk_rope_head_dim'={cfg.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        bad(f"key 'first_k_dense_replace'={cfg.first_k_dense_replace} exceeds 'num_hidden_layers'={cfg.num_hidden_layers}")
    if raw.get("attention_bias"):
        bad("key 'attention_bias'=true is not supported (DeepSeek's projections have no bias)")
    if raw.get("hidden_act", "silu") != "silu":
        bad(f"key 'hidden_act'={raw['hidden_act']!r} is not supported (DeepSeek uses 'silu')")
    kv_heads = raw.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != cfg.num_attention_heads:
        bad(f"key 'num_key_value_heads'={kv_heads} must equal 'num_attention_heads'={cfg.num_attention_heads} in MLA")
    if cfg.architecture == "DeepseekV32ForCausalLM" and None in (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk):
        missing = [k for k in ("index_n_heads", "index_head_dim", "index_topk") if raw.get(k) is None][0]
        bad(f"missing required key '{missing}' (DeepseekV32ForCausalLM has a lightning indexer)")
    if cfg.has_indexer and cfg.q_lora_rank is None:
        bad("key 'q_lora_rank' is null; the V3.2 indexer projects its queries from the q_lora latent")
    if cfg.has_indexer and not cfg.qk_rope_head_dim <= cfg.index_head_dim:
        bad(f"key 'index_head_dim'={cfg.index_head_dim} is smaller than 'qk_rope_head_dim'={cfg.qk_rope_head_dim} "
            "(the indexer rotates its first qk_rope_head_dim values)")
    if cfg.rope.type == "yarn" and cfg.rope.factor < 1:
        bad(f"key 'rope_scaling.factor'={cfg.rope.factor} must be >= 1 for YaRN")
