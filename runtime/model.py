"""The DeepSeek V2/V3 graph in torch, with module names equal to the checkpoint's.

Plain math over tensors: no devices, placement or files here. Build it on the meta device,
then `runtime.loader` fills it tensor by tensor. Shapes: B batch, T new tokens, S cached + new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_attention.attention import backend_for, choose_form, mla_attention
from gpu_attention.dsa import DSACache, dsa_attention
from gpu_attention.latent_cache import DEFAULT_PAGE_SIZE, LatentCache

from .config import ModelConfig
from .fp8_linear import dense_weight
from .indexer import Indexer
from .moe import MLP, MoE, add_parts
from .rope import RotaryTables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None):
        """norm(x); given delta, (x + delta, norm(x + delta)): the residual add that precedes a norm is
        done by its kernel on a GPU (no launch of its own). delta may be MoE.forward_parts' pair
        (routed fp32, shared), added first as add_parts adds them."""
        if x.is_cuda and x.dtype in _FUSED_DTYPES and backend_for(x.device) == "triton":
            from .fused import add_rms_norm, rms_norm  # one kernel instead of eight (decode is launch-bound)

            if delta is None:
                return rms_norm(x, self.weight, self.eps)
            parts = delta if isinstance(delta, tuple) else (delta,)
            if parts[-1].dtype == x.dtype:
                return add_rms_norm(x, parts, self.weight, self.eps)
        if delta is not None:
            x = x + (add_parts(delta) if isinstance(delta, tuple) else delta)
            return x, self(x)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(n: int) -> bool:  # Triton's blocks are powers of two
    return n >= 2 and n & (n - 1) == 0


class MLA(nn.Module):
    """Multi-head latent attention; only c_kv ‖ k_pe is cached."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, qk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.latent_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None  # V3.2: DeepSeek sparse attention
        self._input_weight: torch.Tensor | None = None  # fuse_input_projections' joint weight

    def forward(self, x, *, rope: RotaryTables, cos_sin, cache: LatentCache, layer: int, start_pos: int,
                form: str, index_cache: LatentCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q_first, kv = self._project_input(x)
        q_resid = None if cfg.q_lora_rank is None else self.q_a_layernorm(q_first)
        q = q_first if q_resid is None else self.q_b_proj(q_resid)
        q_nope, q_pe = q.view(B, T, cfg.num_attention_heads, cfg.qk_head_dim).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = cos_sin
        q_pe = rope.apply(q_pe, cos, sin)
        self._store_latent(kv, rope, cos, sin, cache, layer, start_pos)
        # DSA: top-k keys per query; None while the context fits index_topk (dense is then identical)
        indices = None if self.indexer is None else self.indexer(x, q_resid, cos_sin, cache=index_cache, layer=layer,
                                                                  start_pos=start_pos)
        args = dict(v_head_dim=cfg.v_head_dim, scale=cfg.softmax_scale, form=form)
        kv_b_weight = dense_weight(self.kv_b_proj, q_nope.dtype)  # fp8: dequantized per call (DeepSeek's absorb)
        if indices is not None:
            out = dsa_attention(q_nope, q_pe, cache, layer, kv_b_weight, indices, **args)
        else:
            out = mla_attention(q_nope, q_pe, cache, layer, kv_b_weight, **args)
        return self.o_proj(out.reshape(B, T, -1))

    def _project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_proj(x) or q_a_proj(x), kv_a_proj_with_mqa(x)): one GEMM where fuse_input_projections ran."""
        first = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
        joint = self._input_weight
        if joint is None or first.weight.data_ptr() != joint.data_ptr() or first.weight.device != joint.device:
            self._input_weight = None  # the weights were replaced or moved (e.g. module.to()): two GEMMs again
            return first(x), self.kv_a_proj_with_mqa(x)
        return F.linear(x, joint).split([first.out_features, self.cfg.latent_dim], dim=-1)

    def fuse_input_projections(self) -> bool:
        """Make the two projections of the layer's input one GEMM (decode is launch-bound): their
        weights become views of one [q + latent, hidden] tensor, so the checkpoint's names and the
        memory stay as they were. Only for plain linears of one device and dtype (not FP8's blocks);
        returns whether it did."""
        first, kv = (self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj), self.kv_a_proj_with_mqa
        if type(first) is not nn.Linear or type(kv) is not nn.Linear or first.bias is not None or kv.bias is not None:
            return False
        a, b = first.weight, kv.weight
        if a.is_meta or a.device != b.device or a.dtype != b.dtype:
            return False
        if self._input_weight is None:
            joint = torch.cat([a.detach(), b.detach()])
            first.weight = nn.Parameter(joint[:a.shape[0]], requires_grad=False)
            kv.weight = nn.Parameter(joint[a.shape[0]:], requires_grad=False)
            self._input_weight = joint
        return True

    def _store_latent(self, kv, rope: RotaryTables, cos, sin, cache: LatentCache, layer: int, start_pos) -> None:
        """[kv_a_layernorm(c_kv) | rope(k_pe)] into the cache: one kernel on a GPU with a 16/32-bit cache."""
        cfg = self.cfg
        B, T, _ = kv.shape
        norm = self.kv_a_layernorm
        if kv.is_cuda and backend_for(kv.device) == "triton" and _pow2(cfg.kv_lora_rank) and _pow2(cfg.qk_rope_head_dim) \
                and kv.dtype in _FUSED_DTYPES and norm.weight.dtype == kv.dtype:
            target = cache.write_target(layer, start_pos, B, T)
            if target is not None:
                from .fused import store_latent

                store_latent(kv, norm.weight, norm.eps, cos, sin, rope.interleave, target[1], target[0])
                return
        c_kv, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        k_pe = rope.apply(k_pe[:, :, None, :], cos, sin)[:, :, 0]
        cache.write(layer, start_pos, torch.cat([norm(c_kv), k_pe], dim=-1))


class LayerCaches:
    """Latent caches of a model whose attention layers sit on several devices (or use other cache
    options): `parts` lists (cache, model layer indices); layer layers[j] is layer j of its cache."""

    def __init__(self, parts: list[tuple[LatentCache | DSACache, list[int]]]):
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache, _ in self.parts)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, delta=None, **attn_args) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the residual stream, delta: the previous layer's MLP output not yet added to it (None at
        the first layer; MoE.forward_parts' pair at times) -> (h, this layer's MLP output). Each add is
        done by the norm that follows it (one kernel on a GPU). attn_args name the layer's cache and
        its index there."""
        h, x = (h, self.input_layernorm(h)) if delta is None else self.input_layernorm(h, delta)
        h, x = self.post_attention_layernorm(h, self.self_attn(x, **attn_args))
        return h, (self.mlp.forward_parts(x) if isinstance(self.mlp, MoE) else self.mlp(x))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryTables(cfg.rope, cfg.qk_rope_head_dim, interleave=cfg.rope_interleave)
        # per layer {"dtype": "bf16" | "fp8" | ..., "page_size": N}: set by the loader from the plan
        self.cache_options: list[dict] = []

    def new_cache(self, *, batch: int, max_len: int, dtype: torch.dtype | str | None = None,
                  page_size: int | None = None) -> LatentCache | DSACache | LayerCaches:
        """Paged latent cache for `batch` sequences of up to max_len tokens, on the attention's device.
        dtype: the storage ("fp8" = e4m3 with per-128 scales), read back in the attention's dtype;
        dtype and page_size default to `cache_options` (the placement plan's, per layer) or the
        attention's dtype and DEFAULT_PAGE_SIZE. Attention layers on several devices (or with other
        cache options) get one cache per group of layers that share them (`LayerCaches`)."""
        groups: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.model.layers):
            weight = layer.self_attn.kv_a_layernorm.weight  # the latent's dtype (fp8 linears: not theirs)
            options = self.cache_options[i] if i < len(self.cache_options) else {}
            key = (weight.device, weight.dtype, dtype or options.get("dtype") or weight.dtype,
                   page_size or options.get("page_size") or DEFAULT_PAGE_SIZE)
            groups.setdefault(key, []).append(i)
        parts = [(self._cache_for(len(layers), batch, max_len, *key), layers) for key, layers in groups.items()]
        return parts[0][0] if len(parts) == 1 else LayerCaches(parts)

    def _cache_for(self, num_layers, batch, max_len, device, compute_dtype, dtype, page_size):
        args = dict(num_layers=num_layers, batch=batch, max_len=max_len, page_size=page_size, dtype=dtype,
                    compute_dtype=compute_dtype, device=device)
        latent = LatentCache.for_batch(latent_dim=self.cfg.latent_dim, **args)
        if not self.cfg.has_indexer:
            return latent
        # V3.2: the indexer keys in a second paged cache of the same pages and storage dtype
        return DSACache(latent, LatentCache.for_batch(latent_dim=self.cfg.index_head_dim, **args))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, cache: LatentCache | DSACache | LayerCaches,
                start_pos: int | torch.Tensor = 0, form: str = "auto", last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] fp32 ([B, 1, V] if last_only).
        start_pos as a device tensor [1] (int64): a graph-capturable step (runtime.graph)."""
        B, T = input_ids.shape
        parts = cache.parts if isinstance(cache, LayerCaches) else [(cache, range(self.cfg.num_hidden_layers))]
        layer_args = {}
        for part, layers in parts:  # per cache: this step's pages, and the attention arguments on its device
            args = self._attention_args(part, B, T, start_pos, form)
            layer_args.update({layer: dict(args, layer=local) for local, layer in enumerate(layers)})
        h, delta = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            h, delta = layer(h, delta, **layer_args[i])
        if last_only:
            h = h[:, -1:]
            delta = tuple(d[:, -1:] for d in delta) if isinstance(delta, tuple) else delta[:, -1:]
        return self.lm_head(self.model.norm(h, delta)[1]).float()

    def _attention_args(self, cache: LatentCache | DSACache, B: int, T: int, start_pos: int | torch.Tensor,
                        form: str) -> dict:
        index_cache = None
        if isinstance(cache, DSACache):
            cache, index_cache = cache.latent, cache.index_keys
            assert isinstance(start_pos, int), "V3.2 sparse attention takes a host start_pos (no graph steps)"
            index_cache.prepare(start_pos, T, B)
        device = cache.page_table.device  # where the attention of the cache's layers runs
        if isinstance(start_pos, torch.Tensor):  # a graph step (runtime.graph): the start lives on the device
            cache.prepare_at(start_pos, T, B)
            cos_sin = self.rope.cos_sin_at(start_pos, T, cache.max_len)
        else:
            cache.prepare(start_pos, T, B)  # pages and lengths for this step, shared by the cache's layers
            cos_sin = self.rope.cos_sin(start_pos, T, device)
        if form == "auto":  # the crossover measured for the backend the attention runs on
            form = choose_form(T, backend_for(device), self.cfg.num_attention_heads)
        return dict(rope=self.rope, cos_sin=cos_sin, cache=cache, start_pos=start_pos, form=form,
                    index_cache=index_cache)
