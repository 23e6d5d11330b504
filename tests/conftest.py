import pytest
import torch

from runtime.make_model import write_tokenizer

# Small shapes that still exercise every branch: q_lora on/off, dense first layers, groups, YaRN.
V3_KWARGS = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
)
V2_KWARGS = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2, first_k_dense_replace=1,
    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=512,
    bos_token_id=0, eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def randomize_(model, seed: int = 0) -> None:
    """transformers initialises norms to 1 and the router bias to 0; randomise everything so that
    each weight (and the bias-only-for-selection rule) changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name else
                        0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def make_hf_model(kind: str, path, seed: int = 0, **overrides):
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                              DeepseekV3ForCausalLM)

    cfg_cls, model_cls, kwargs = {
        "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, V3_KWARGS),
        "v2": (DeepseekV2Config, DeepseekV2ForCausalLM, V2_KWARGS),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**kwargs, **overrides})).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    write_tokenizer(path, max_vocab=model.config.vocab_size)
    return model


@pytest.fixture(scope="session")
def hf_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_v3")
    return make_hf_model("v3", path), path


@pytest.fixture(scope="session")
def hf_v2(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_v2")
    return make_hf_model("v2", path), path


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    from runtime.make_model import write_model

    return write_model(tmp_path_factory.mktemp("tiny_v3"), "tiny-v3", dtype="fp32", seed=0, progress=False)


def rel_err(a, b) -> float:
    """Relative L2 error of a against the reference b (computed in fp32)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def prompt(n=24, seed=1, vocab=256):
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(ref, ids):
    with torch.no_grad():
        return ref(ids).logits.float()
