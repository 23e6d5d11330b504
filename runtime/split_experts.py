"""SplitExperts: one MoE layer's routed experts in two parts that run at the same time, a few
(`gpu_experts`: the most used) stacked in torch on a fast device, the rest in the CPU kernels.

The router's [T, k] choice is split without leaving the device it is on (no host sync, so a
decode step stays capturable): each slot belongs to one side; the other side sees that slot with
weight 0. On the fast side a zero-weight slot points at its expert 0; on the CPU side it points
at one of the token's own CPU experts (the kernels read that expert for the token anyway, so the
slot costs one activation row, not an expert's bytes), or at CPU expert 0 when all the token's
slots are on the fast side. The outputs are summed.

Order (MoE.forward calls start, runs the shared experts, calls finish): the CPU part is started
first (HybridExperts: copies and the native submit on the GPU stream; JIT experts on CPU inputs:
the worker pool), the fast part is enqueued behind it, so both compute at once; finish joins.

The fast part picks its method by the work (all sync-free for decode):
  dense   every fast expert on every token, weights from a [T, N] matrix: reads N experts
  gather  each slot's expert weights gathered, batched matmuls: reads and writes T*k experts
          (up to GATHER_SLOTS slots: a gathered projection is a temporary of slots x I x H)
  grouped otherwise: only the fast slots, grouped by expert (syncs the host)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import TorchExperts

DECODE_TOKENS = 16  # up to this many tokens the fast part runs sync-free (dense or gather) ...
GATHER_SLOTS = 16  # ... unless gathering would copy more experts than this (V3: 470 MB a projection)


class SplitExperts(nn.Module):
    moves_its_own_data = True  # inputs on any device; output on the inputs' device (no assembly hooks)

    def __init__(self, fast: TorchExperts, slow: nn.Module, fast_ids, num_experts: int):
        super().__init__()
        fast_ids = [int(e) for e in fast_ids]
        if len(set(fast_ids)) != len(fast_ids) or not all(0 <= e < num_experts for e in fast_ids) or \
                not 0 < len(fast_ids) < num_experts or fast.gate_proj.shape[0] != len(fast_ids):
            raise ValueError(f"fast_ids must be {fast.gate_proj.shape[0]} distinct experts of 0..{num_experts - 1}, "
                             f"fewer than all, got {fast_ids}")
        self.fast, self.slow = fast, slow
        self.fast_ids, self.num_experts = tuple(fast_ids), num_experts
        # expert -> its index in the slow part (>= 0), or -1 - its index in the fast part
        table = torch.empty(num_experts, dtype=torch.int64)
        slow_ids = [e for e in range(num_experts) if e not in set(fast_ids)]
        table[slow_ids] = torch.arange(len(slow_ids))
        table[fast_ids] = -1 - torch.arange(len(fast_ids))
        self._tables = {torch.device("cpu"): table}  # per device; plain attributes, not weights
        self._table(fast.gate_proj.device)  # made now, not first inside a CUDA graph capture
        self._pending = None

    @property
    def fast_device(self) -> torch.device:
        return self.fast.gate_proj.device

    def _table(self, device: torch.device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._tables[torch.device("cpu")].to(device)
        return table

    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """(fast ids, fast weights, slow ids, slow weights), each [T, k] on the inputs' device."""
        local = self._table(topk_ids.device)[topk_ids]
        on_fast = local < 0
        slow_w = topk_weights.masked_fill(on_fast, 0)
        fast_w = topk_weights - slow_w  # exactly w on fast slots, 0 elsewhere
        fast_ids = (~local).clamp_min(0)  # ~x = -1 - x: the fast index; slow slots go to 0
        own = local.clamp_min(0).amax(dim=1, keepdim=True)  # one of the token's slow experts (0 if none)
        slow_ids = torch.where(on_fast, own, local)
        return fast_ids, fast_w, slow_ids, slow_w

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.start(hidden, topk_ids, topk_weights)
        return self.finish()

    def start(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        assert self._pending is None, "start() twice without finish()"
        fast_ids, fast_w, slow_ids, slow_w = self.split(topk_ids, topk_weights)
        slow_started = None
        if hasattr(self.slow, "start"):  # HybridExperts: stream-ordered, any input device
            self.slow.start(hidden, slow_ids, slow_w)
            slow_started = "start"
        elif hasattr(self.slow, "engine") and hidden.device.type == "cpu":  # JIT experts: the worker pool
            args = (hidden.float().contiguous(), slow_ids.contiguous(), slow_w.float().contiguous())
            self.slow.engine.submit(*args)
            slow_started = ("engine", args)  # the engine reads these until wait()
        dev = self.fast_device
        copy = dict(non_blocking=dev.type != "cpu")  # a GPU -> CPU copy must be complete when read
        try:
            fast_out = fast_forward(self.fast, hidden.to(dev, **copy), fast_ids.to(dev, **copy),
                                    fast_w.to(dev, **copy))
        except BaseException:  # join the CPU part before the error goes on, so this module stays usable
            if slow_started == "start":
                self.slow.finish()
            elif slow_started is not None:
                self.slow.engine.wait()
            raise
        self._pending = (hidden, slow_ids, slow_w, slow_started, fast_out)

    def finish(self) -> torch.Tensor:
        assert self._pending is not None, "finish() without start()"
        hidden, slow_ids, slow_w, started, fast_out = self._pending
        self._pending = None
        if started == "start":
            slow_out = self.slow.finish()
        elif started is not None:
            slow_out = self.slow.engine.wait().to(hidden.dtype)
        else:  # a module without a way to start: run it now, on the CPU if it is a CPU module
            cpu = hasattr(self.slow, "engine")
            slow_out = self.slow(*(t.cpu() if cpu else t for t in (hidden, slow_ids, slow_w))).to(hidden.device)
        return slow_out + fast_out.to(hidden.device, dtype=slow_out.dtype, non_blocking=True)

    def nbytes_by_device(self) -> dict[str, int]:
        """The slow part's packed buffers (its torch tensors and the fast part are counted as tensors)."""
        engine = getattr(self.slow, "engine", None)
        if engine is None or hasattr(self.slow, "nbytes_by_device"):
            return {}  # counted on the module itself
        from cpu_experts.packed_cache import nbytes

        return {"cpu": nbytes(engine)}


def fast_forward(experts: TorchExperts, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t]) over the stacked experts; zero-weight slots
    add nothing. Computed in the experts' dtype, returned in the hidden's."""
    T, k = ids.shape
    N = experts.gate_proj.shape[0]
    x = hidden.to(experts.gate_proj.dtype)
    if T <= DECODE_TOKENS and N <= 2 * T * k:
        out = _dense(experts, x, ids, weights)
    elif T <= DECODE_TOKENS and T * k <= GATHER_SLOTS:
        out = _gather(experts, x, ids, weights)
    else:
        out = _grouped(experts, x, ids, weights)
    return out.to(hidden.dtype)


def _dense(experts, x, ids, weights):
    coef = torch.zeros(x.shape[0], experts.gate_proj.shape[0], dtype=torch.float32, device=x.device)
    coef.scatter_add_(1, ids, weights.float())  # [T, N]
    g = torch.matmul(x, experts.gate_proj.transpose(1, 2))  # [N, T, I]
    u = torch.matmul(x, experts.up_proj.transpose(1, 2))
    y = torch.matmul(F.silu(g) * u, experts.down_proj.transpose(1, 2))  # [N, T, H]
    return (y * coef.T.to(y.dtype)[..., None]).sum(0)


def _gather(experts, x, ids, weights):
    return experts.gathered(x, ids, weights)  # TorchExperts' sync-free gather, as its decode path


def _grouped(experts, x, ids, weights):
    """Only the slots with a weight, grouped by expert: a prompt's many tokens share each expert."""
    k = ids.shape[1]
    slots = (weights != 0).flatten().nonzero().squeeze(1)  # syncs: fine for a prompt
    token_of, expert_of, weight_of = slots // k, ids.flatten()[slots], weights.flatten()[slots]
    order = expert_of.argsort(stable=True)
    token_of, weight_of = token_of[order], weight_of[order]
    counts = torch.bincount(expert_of, minlength=experts.gate_proj.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = token_of[start:start + count]
            xe = x[rows]
            h = F.silu(xe @ experts.gate_proj[e].T) * (xe @ experts.up_proj[e].T)
            out.index_add_(0, rows, (h @ experts.down_proj[e].T) * weight_of[start:start + count, None].to(x.dtype))
            start += count
    return out
