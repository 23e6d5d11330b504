"""config.json of DeepSeek V2 / V3 / V3.2: keys, derived values, and clear errors."""

import math

import pytest

from runtime.config import config_from_dict
from runtime.errors import ConfigError
from runtime.make_model import PRESETS


def v3(**changes):
    raw = {**PRESETS["v3"], **changes}
    return {k: v for k, v in raw.items() if v is not ...}


def test_v3_real_config_values():
    cfg = config_from_dict(v3())
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    mscale = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * mscale**2)  # never 576**-0.5
    assert cfg.rope.cos_sin_scale == pytest.approx(1.0)  # mscale == mscale_all_dim


def test_v2_lite_config_values():
    cfg = config_from_dict(PRESETS["v2-lite"])
    assert cfg.q_lora_rank is None and (cfg.scoring_func, cfg.topk_method) == ("softmax", "greedy")
    assert not cfg.norm_topk_prob and cfg.n_routed_experts == 64


def test_rope_parameters_and_rope_scaling_agree():
    old = config_from_dict(v3())
    params = {**PRESETS["v3"]["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    params.pop("type")
    new = config_from_dict(v3(rope_scaling=..., rope_theta=..., rope_parameters=params))
    assert old.rope == new.rope


def test_v32_keeps_indexer_fields():
    cfg = config_from_dict(PRESETS["v32"])
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)
    with pytest.raises(ConfigError, match="missing required key 'index_topk'"):
        config_from_dict({**PRESETS["v32"], "index_topk": None})


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": ...}, "missing required key 'hidden_size'"),
    ({"q_lora_rank": ...}, "missing required key 'q_lora_rank'"),
    ({"hidden_size": "7168"}, "key 'hidden_size' must be an integer"),
    ({"n_group": 7}, "key 'n_group'=7 does not divide 'n_routed_experts'=256"),
    ({"topk_group": 9}, "key 'topk_group'=9 is larger than 'n_group'=8"),
    ({"scoring_func": "softmax"}, "keys 'scoring_func'='softmax' and 'topk_method'='noaux_tc' do not form"),
    ({"num_key_value_heads": 1}, "'num_key_value_heads'=1 must equal 'num_attention_heads'=128"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "hmoe supports 'default' and 'yarn'"),
    ({"rope_scaling": {"type": "yarn"}}, "missing required key 'factor'"),
    ({"architectures": ["LlamaForCausalLM"]}, "key 'architectures'"),
    ({"num_experts_per_tok": 300}, "'num_experts_per_tok'=300"),
    ({"attention_bias": True}, "key 'attention_bias'=true is not supported"),
    ({"hidden_act": "gelu"}, "key 'hidden_act'='gelu' is not supported"),
])
def test_bad_config_is_one_clear_error(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(v3(**changes))
