"""Feed-forward blocks: the dense MLP, the DeepSeek router, routed experts, and the MoE block.

Routed experts sit behind one small interface, `forward(hidden[T, H], topk_ids[T, k],
topk_weights[T, k]) -> out[T, H]`, so the CPU JIT kernels (cpu_experts) can replace the torch
reference without the model knowing. Experts that run elsewhere may also offer `start(hidden,
topk_ids, topk_weights)` / `finish() -> out`: the MoE block then starts them before its shared
experts and joins after, so both run at once.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


# Up to this many tokens, torch experts on a GPU gather the chosen experts' weights (graph-capturable
# decode steps); above it they group tokens by expert (fewer bytes moved, one host sync).
GATHER_MAX_TOKENS = 4


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


ROUTER_F32_CACHE_MAX = 1 << 20  # weight elements up to which the router keeps an fp32 copy (4 MiB)
ROUTE_KERNEL_MAX_EXPERTS = 1024  # runtime.fused.route holds a token's scores in one program's registers
ROUTER_GEMV_MAX_TOKENS = 16  # up to this many tokens the router's logits are a Triton GEMV per token


class Router(nn.Module):
    """Top-k expert choice. V2: softmax, greedy or group-limited greedy (best expert per group).
    V3 (noaux_tc): sigmoid, a correction bias used only to choose, groups ranked by their top-2
    sum, weights taken from the unbiased scores. Then optional renormalisation, then scaling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32))
        self._weight_f32: tuple[tuple, torch.Tensor] | None = None

    def weight_f32(self) -> torch.Tensor:
        """The weight in fp32 (logits are computed in fp32), converted once rather than every call: on a
        GPU each decode step would otherwise spend a kernel per layer on it. Redone if the weight moves or
        changes (its storage or version). Only small weights keep a copy (V2-Lite's 0.5 MB, V2's 3.3 MB
        per layer); V3's 7.3 MB x 58 layers would take 425 MB of VRAM, so it converts per call."""
        w = self.weight
        if w.dtype == torch.float32 or w.numel() > ROUTER_F32_CACHE_MAX:
            return w.float()
        key = (w.device, w.data_ptr(), w._version)
        if self._weight_f32 is None or self._weight_f32[0] != key:
            self._weight_f32 = (key, w.detach().float())
        return self._weight_f32[1]

    def forward(self, x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                x_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] fp32, topk_ids [T, k] int64 (written into `out` when given:
        e.g. the buffers a host copy reads; x as fp32 into `x_out` when given, for the CPU experts).
        On a GPU two kernels: the logits (for decode-sized T; cuBLAS above), then the choice."""
        fused = x.is_cuda and self._fused(x.device)
        if fused and x.shape[0] <= ROUTER_GEMV_MAX_TOKENS:
            from .fused import router_logits

            logits = router_logits(x, self.weight, x_out)  # reads the weight as stored (bf16: half the bytes)
        else:
            if x_out is not None:
                x = x_out.copy_(x)
            logits = F.linear(x.float(), self.weight_f32())
        if fused:
            from .fused import route

            bias = self.e_score_correction_bias if self.method == "noaux_tc" else None
            return route(logits, top_k=self.top_k, method=self.method, sigmoid=self.scoring == "sigmoid",
                         n_group=self.n_group, topk_group=self.topk_group, norm=self.norm_topk_prob,
                         scaling=self.scaling, bias=bias, out=out)
        weights, ids = self._choose(logits)
        if out is None:
            return weights, ids
        out[0].copy_(weights)
        out[1].copy_(ids)
        return out

    def _fused(self, device: torch.device) -> bool:
        from gpu_attention.attention import backend_for

        E = self.weight.shape[0]
        return backend_for(device) == "triton" and E <= ROUTE_KERNEL_MAX_EXPERTS and (
            self.method == "greedy" or (self.method in ("group_limited_greedy", "noaux_tc") and E % self.n_group == 0))

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        else:
            choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
            grouped = choice.view(logits.shape[0], self.n_group, -1)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling if self.scaling != 1.0 else weights), ids


class RoutedExperts(Protocol):
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...


class TorchExperts(nn.Module):
    """Reference routed experts: weights stacked per expert, tokens grouped by expert.
    gate_proj/up_proj [E, I, H], down_proj [E, H, I]; the checkpoint names them
    `experts.{e}.{gate,up,down}_proj.weight`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda and hidden.shape[0] <= GATHER_MAX_TOKENS:
            return self.gathered(hidden, topk_ids, topk_weights)
        out = torch.zeros_like(hidden)
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // topk_ids.shape[1]
        weight_of = topk_weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            x = hidden[rows]
            h = F.silu(x @ self.gate_proj[expert].T) * (x @ self.up_proj[expert].T)
            y = (h @ self.down_proj[expert].T) * weight_of[start:start + count, None].to(hidden.dtype)
            out.index_add_(0, rows, y)
            start += count
        return out

    def gathered(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Decode on a GPU: the chosen experts' weights gathered per (token, slot), one batched matmul
        each; no counts read back to the host, so a CUDA graph can capture it."""
        T, k = topk_ids.shape
        flat = topk_ids.flatten()
        x = hidden.repeat_interleave(k, dim=0)[:, None, :]  # [T*k, 1, H]
        h = F.silu(x @ self.gate_proj[flat].transpose(1, 2)) * (x @ self.up_proj[flat].transpose(1, 2))
        y = (h @ self.down_proj[flat].transpose(1, 2)).view(T, k, -1)
        return (y * topk_weights[..., None].to(hidden.dtype)).sum(dim=1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts: nn.Module = TorchExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_parts(x)
        return add_parts(out) if isinstance(out, tuple) else out

    def forward_parts(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """forward(x), or (routed fp32, shared) left for the caller to add where the routed experts
        return fp32 (the CPU's) on a GPU: the next residual add + RMSNorm kernel adds them for free
        (runtime.model.RMSNorm), where torch would spend a mixed-dtype kernel (~3.5 us) per layer."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if hasattr(self.experts, "start"):  # routed experts elsewhere (the CPU): start them, run the shared
            # experts here meanwhile, then join (orchestrator.hybrid). Where both the router and the
            # experts take fp32 (the CPU's), one conversion serves the two
            inputs = self.experts.inputs(x) if hasattr(self.experts, "inputs") else None
            if inputs is not None:  # its own buffers (e.g. what one host copy reads): fill them in place
                x_in, ids, weights = inputs
                self.gate(x, out=(weights, ids), x_out=x_in)
            else:
                x_in = x.float() if getattr(self.experts, "takes_fp32", False) else x
                weights, ids = self.gate(x_in)
            self.experts.start(x_in, ids, weights)
            try:
                shared = self.shared_experts(x) if self.shared_experts is not None else None
            except BaseException:  # (Ctrl-C, a failed capture) join the started work: the experts stay usable
                self.experts.finish()
                raise
            out = self.experts.finish()
            if shared is None:
                return out.to(x.dtype).view(shape)
            return (out.view(shape), shared.view(shape)) if out.is_cuda else add_parts((out, shared)).view(shape)
        weights, ids = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


def add_parts(parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """MoE.forward_parts' (routed fp32, shared) summed into the shared experts' dtype: one add in
    fp32, rounded once."""
    routed, shared = parts
    return shared.add_(routed)
