"""One MoE layer's decode step with HybridExperts against its CPU experts alone (the issue's "per MoE
layer ≤ 1.15 × the CPU experts alone").

The block is runtime.moe.MoE at a preset's shape (router and shared experts on the GPU in bf16,
random weights) whose routed experts are a given cpu_experts engine behind HybridExperts. Timed:
the engine alone on host inputs, the block eagerly, and the block replayed from a CUDA graph; each
step gets new hidden states (so new routing).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .hybrid import HostStaging, HybridExperts


def build_block(engine, preset: str, device: str = "cuda", seed: int = 0):
    from runtime.config import config_from_dict
    from runtime.make_model import preset_config
    from runtime.moe import MoE

    cfg = config_from_dict(preset_config(preset))
    with torch.device("meta"):
        block = MoE(cfg)
    block.experts = HybridExperts(engine, HostStaging(max_tokens=16, hidden=cfg.hidden_size,
                                                      top_k=cfg.num_experts_per_tok))
    block.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    block.to(torch.bfloat16)
    if hasattr(block.gate, "e_score_correction_bias"):  # router math stays fp32
        block.gate.e_score_correction_bias = torch.zeros(cfg.n_routed_experts, device=device)
    return block, cfg


@torch.inference_mode()
def decode_layer(engine, preset: str, *, steps: int = 100, seed: int = 0) -> dict:
    """Mean wall time per 1-token step (ms) of the engine alone, the block eagerly and the block in a graph."""
    block, cfg = build_block(engine, preset, seed=seed)
    H, k, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    xs = torch.randn(steps, 1, 1, H, device="cuda", dtype=torch.bfloat16, generator=gen)

    # the CPU experts alone, with the routing the block's router gives these inputs
    routed = [block.gate(x.reshape(1, H)) for x in xs]
    host = [(x.reshape(1, H).float().cpu().numpy(), ids.cpu().numpy(), w.float().cpu().numpy())
            for x, (w, ids) in zip(xs, routed)]
    engine.forward(*host[0])
    t0 = time.perf_counter()
    for args in host:
        engine.forward(*args)
    alone = (time.perf_counter() - t0) / steps

    for x in xs[:3]:  # warm: binds the 1-token job, cuBLAS handles
        block(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in xs:
        block(x)
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / steps

    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        block(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = block(static_x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in xs:
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    graphed = (time.perf_counter() - t0) / steps
    check = block(xs[-1])
    max_diff = float((check - static_out).abs().max())

    shared_ms = _gpu_ms(lambda: block.shared_experts(xs[0].reshape(1, H)), steps)
    touched = float(np.mean([len(np.unique(h[1])) for h in host]))
    return {"preset": preset, "fmt": engine.fmt, "threads": engine.threads, "steps": steps, "top_k": k,
            "num_experts": E, "cpu_experts_alone_ms": alone * 1e3, "hybrid_eager_ms": eager * 1e3,
            "hybrid_graph_ms": graphed * 1e3, "ratio_eager": eager / alone, "ratio_graph": graphed / alone,
            "shared_experts_gpu_ms": shared_ms, "experts_touched": touched,
            "graph_vs_eager_max_abs_diff_last_step": max_diff}


def _gpu_ms(fn, steps: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps
