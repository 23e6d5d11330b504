"""Measurements behind `hmoe bench-attn`: MLA decode and prefill chunks on the GPU against the HBM
bandwidth and bf16 matmul rate measured in the same run, plus the naive torch reference.

DeepSeek's attention shape throughout (kv_lora_rank 512, rope 64, nope 128, v 128); heads and
context vary. Times are medians of triton.testing.do_bench, which clears the L2 cache before each
call, as the rest of a model step would: a 1K context's 1.2 MB latent would otherwise be read from L2.
"""

from __future__ import annotations

import time

import torch

from . import attention as attn
from .latent_cache import LatentCache
from .mla_torch import mla_absorbed, mla_decompressed

RANK, ROPE, NOPE, VDIM = 512, 64, 128, 128
LATENT = RANK + ROPE
SCALE = (NOPE + ROPE) ** -0.5
KERNEL_NAMES = (
    "_absorbed_split_kernel", "_absorbed_tma_kernel", "_absorbed_tma_keys_kernel", "_combine_kernel")


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm cuBLAS outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def replay_us(fn, replays: int = 50) -> float:
    """Mean µs of one replay of a CUDA graph of fn, replays back to back (no cache flush between):
    what a chain of dependent kernels costs inside a captured decode step."""
    g = capture(fn)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def _bench(fn, rep: int = 100, graph: bool = True) -> float:
    """Median µs of fn on the GPU, L2 cleared before each call. With graph, fn is captured once in a
    CUDA graph and its replays are timed: the GPU time of its kernels without Python's launch
    overhead (which would otherwise dominate a decode call of a few µs)."""
    from triton.testing import do_bench
    if graph:
        g = capture(fn)
        us = do_bench(g.replay, warmup=10, rep=rep, return_mode="median") * 1e3
        del g
        return us
    return do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3


def _flush(kind: str):
    """Evicts the L2 before a timed call. 'write' (do_bench's 256 MB memset) leaves the L2 full of
    dirty lines that the timed kernels then write back to HBM; 'read' (a 256 MB reduction) leaves
    clean lines, as a model step's weight reads would."""
    buf = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    return (lambda: buf.zero_()) if kind == "write" else (lambda: torch.amax(buf))


def _bench_clean_l2(fn, reps: int = 100) -> float:
    """Median µs of fn's CUDA-graph replay after a read flush of the L2."""
    g, flush = capture(fn), _flush("read")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[reps // 2] * 1e3


def kernel_only_us(fn, names: tuple[str, ...], reps: int = 30, flush: str = "write") -> dict:
    """GPU time of the kernels of fn whose names contain one of `names`, per call, from CUPTI
    (torch.profiler), L2 cleared before each call (`_flush`): the kernels' own durations, without
    launch costs or the gaps between them. Returns {name: µs per call} and their sum under 'total'."""
    from torch.profiler import ProfilerActivity, profile
    clear = _flush(flush)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            clear()
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        hit = next((n for n in names if n in e.key), None)
        if hit:
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            per[hit] = per.get(hit, 0.0) + t / reps
    per["total"] = sum(per.values())
    return per


def launch_floor_us() -> dict:
    """The same timer on one and two empty Triton kernels: what a call costs before any work
    (graph launch, kernel start, the do_bench events)."""
    from .triton_decode import _empty_kernel
    x = torch.empty(1, device="cuda")
    one = _bench(lambda: _empty_kernel[(1,)](x))
    two = _bench(lambda: (_empty_kernel[(1,)](x), _empty_kernel[(1,)](x)))
    return dict(one_kernel_us=one, two_kernels_us=two)


def hbm_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (GB/s)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), graph=False)
    del src, dst
    return 2 * n / us / 1e3


def matmul_tflops(device) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    us = _bench(lambda: a @ b, graph=False)
    return 2 * 8192**3 / us / 1e6


class Shape:
    """A cache of `batch` sequences holding `ctx` keys each (room for `capacity`, all of it filled
    with random latents), and random kv_b_proj weights for H heads."""

    def __init__(self, *, heads: int, ctx: int, batch: int, page_size: int, dtype: str, device,
                 capacity: int | None = None):
        gen = torch.Generator(device=device).manual_seed(0)
        self.heads, self.ctx, self.batch, self.device = heads, ctx, batch, device
        capacity = capacity or ctx
        self.cache = LatentCache.for_batch(num_layers=1, latent_dim=LATENT, batch=batch, max_len=capacity,
                                           page_size=page_size, dtype=dtype, compute_dtype=torch.bfloat16, device=device)
        self.cache.set_lengths([capacity] * batch)
        for b in range(batch):  # one sequence at a time: bounded temporary memory
            x = torch.randn(capacity, LATENT, generator=gen, device=device, dtype=torch.bfloat16)
            self.cache.store(0, b, 0, x)
        self.cache.set_lengths([ctx] * batch)
        self.kv_b = (torch.randn(heads * (NOPE + VDIM), RANK, generator=gen, device=device) * RANK**-0.5).bfloat16()

    def queries(self, num_new: int):
        gen = torch.Generator(device=self.device).manual_seed(1)
        q = torch.randn(self.batch, num_new, self.heads, NOPE + ROPE, generator=gen, device=self.device,
                        dtype=torch.bfloat16)
        return q[..., :NOPE], q[..., NOPE:]


def decode_flops(heads, ctx, batch, num_new=1) -> float:
    return 2 * batch * num_new * heads * ctx * (LATENT + RANK)


def decode_row(s: Shape, bw: float, tflops: float, tuned: dict | None = None) -> dict:
    """The kernel with its default blocks (and with `tuned` ones from a sweep), the whole absorbed
    op (q·W_UK and o·W_UV included) and mla_torch on the contiguous latent."""
    from .mla_torch import absorb_weights
    from .triton_decode import absorbed_decode
    q_nope, q_pe = s.queries(1)
    w_uk, _ = absorb_weights(s.kv_b, num_heads=s.heads, qk_nope_head_dim=NOPE, v_head_dim=VDIM)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    kernel_us = _bench(lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE))
    kernel_clean_us = _bench_clean_l2(lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE))
    try:
        cupti = kernel_only_us(lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE), KERNEL_NAMES)
        cupti_clean = kernel_only_us(lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE), KERNEL_NAMES,
                                     flush="read")
    except Exception as e:  # noqa: BLE001 - the profiler is a diagnostic; keep the rest of the row
        cupti = cupti_clean = dict(error=str(e).splitlines()[0][:160])
    op = lambda: attn.mla_attention(q_nope, q_pe, s.cache, 0, s.kv_b, v_head_dim=VDIM, scale=SCALE,  # noqa: E731
                                    form="absorbed", backend="triton")
    op_us = _bench(op)
    op_eager_us = _bench(op, graph=False)  # what an eager model step pays today
    latent = s.cache.prefix(0, s.batch)
    naive_us = _bench(lambda: mla_absorbed(q_nope, q_pe, latent, s.kv_b, kv_lora_rank=RANK, v_head_dim=VDIM,
                                           scale=SCALE))
    nbytes = s.batch * s.ctx * s.cache.nbytes // (s.cache.data.shape[1] * s.cache.page_size)  # bytes per key
    flops = decode_flops(s.heads, s.ctx, s.batch)
    roof = max(nbytes / bw / 1e3, flops / tflops / 1e6)
    extra = {}
    if tuned:
        tuned = dict(kernel="generic") | tuned  # bench-attn --sweep times the generic kernel's blocks
        us = _bench(lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE, **tuned))
        extra = dict(tuned_config=tuned, tuned_us=us, tuned_pct_hbm=100 * nbytes / us / 1e3 / bw,
                     tuned_x_roofline=us / roof)
        try:
            extra["tuned_kernel_only_us"] = kernel_only_us(
                lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE, **tuned), KERNEL_NAMES)
        except Exception:  # noqa: BLE001 - reported once above
            pass
    if "total" in cupti:
        extra |= dict(kernel_only_x_roofline=cupti["total"] / roof,
                      kernel_only_pct_hbm=100 * nbytes / cupti["total"] / 1e3 / bw,
                      kernel_only_clean_x_roofline=cupti_clean["total"] / roof)
    return extra | dict(kind="decode", heads=s.heads, ctx=s.ctx, batch=s.batch, dtype=str(s.cache.dtype).split(".")[-1],
                config=decode_plan(s, q_latent, q_pe), kernel_us=kernel_us, kernel_only_us=cupti,
                kernel_clean_l2_us=kernel_clean_us, kernel_clean_l2_x_roofline=kernel_clean_us / roof,
                kernel_only_clean_l2_us=cupti_clean, op_us=op_us, op_eager_us=op_eager_us, naive_torch_us=naive_us,
                bytes=nbytes, flops=flops,
                gbs=nbytes / kernel_us / 1e3, pct_hbm=100 * nbytes / kernel_us / 1e3 / bw,
                tflops=flops / kernel_us / 1e6, roofline_us=roof, x_roofline=kernel_us / roof,
                naive_x_kernel=naive_us / kernel_us)


def decode_plan(s: Shape, q_latent, q_pe) -> dict:
    """The kernel, blocks and split count absorbed_decode picks for this shape."""
    from .triton_decode import plan
    return plan(q_latent, q_pe, s.cache)


def prefill_flops(heads, ctx, num_new, batch, form) -> float:
    pairs = num_new * (ctx - num_new) + num_new * (num_new + 1) // 2
    if form == "absorbed":  # scores over 576, values over 512, plus q·W_UK and o·W_UV
        return batch * (2 * pairs * heads * (LATENT + RANK) + 2 * num_new * heads * RANK * (NOPE + VDIM))
    return batch * (2 * pairs * heads * (NOPE + ROPE + VDIM) + 2 * ctx * RANK * heads * (NOPE + VDIM))


def prefill_row(s: Shape, num_new: int, tflops: float, naive_limit: int = 8 << 30) -> dict:
    q_nope, q_pe = s.queries(num_new)
    row = dict(kind="prefill", heads=s.heads, ctx=s.ctx, new_tokens=num_new, batch=s.batch)
    for form in ("decompressed", "absorbed"):
        us = _bench(lambda: attn.mla_attention(q_nope, q_pe, s.cache, 0, s.kv_b, v_head_dim=VDIM, scale=SCALE,
                                               form=form, backend="triton"), rep=50)
        flops = prefill_flops(s.heads, s.ctx, num_new, s.batch, form)
        row[f"{form}_us"] = us
        row[f"{form}_tflops"] = flops / us / 1e6
        row[f"{form}_pct_matmul"] = 100 * flops / us / 1e6 / tflops
    # the naive form materialises [B, H, T, S] fp32 scores: only where that fits comfortably
    if s.batch * s.heads * num_new * s.ctx * 4 * 3 <= naive_limit:
        latent = s.cache.prefix(0, s.batch)
        row["naive_torch_decompressed_us"] = _bench(lambda: mla_decompressed(
            q_nope, q_pe, latent, s.kv_b, kv_lora_rank=RANK, v_head_dim=VDIM, scale=SCALE), rep=50)
    return row


def crossover(s: Shape, new_tokens: list[int], backend: str) -> dict:
    """Time both forms at each new-token count on top of s.ctx cached keys; the crossover is the
    smallest count from which decompressed stays faster."""
    timer = _bench if backend == "triton" else _cpu_time
    rows = []
    base = s.ctx
    for t in new_tokens:
        s.cache.set_lengths([base + t] * s.batch)
        q_nope, q_pe = s.queries(t)
        times = {form: timer(lambda: attn.mla_attention(q_nope, q_pe, s.cache, 0, s.kv_b, v_head_dim=VDIM,
                                                         scale=SCALE, form=form, backend=backend))
                 for form in ("absorbed", "decompressed")}
        rows.append(dict(new_tokens=t, absorbed_us=times["absorbed"], decompressed_us=times["decompressed"]))
    s.cache.set_lengths([base] * s.batch)
    cross = None
    for i, r in enumerate(rows):
        if all(x["decompressed_us"] <= x["absorbed_us"] for x in rows[i:]):
            cross = r["new_tokens"]
            break
    return dict(kind="crossover", backend=backend, heads=s.heads, cached=base, batch=s.batch, rows=rows,
                crossover_new_tokens=cross)


def _cpu_time(fn, min_s: float = 0.3) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def sweep_decode(s: Shape, configs: list[dict], deadline: float, rep: int = 40, cupti: bool = False) -> list[dict]:
    """Time the decode kernel at each configuration (configs that fail to compile are noted); a
    config without `kernel` runs the generic kernel (the blocks swept before the TMA kernels existed),
    kernel None the defaults. With cupti, also the kernels' own time (kernel_only_us)."""
    from .triton_decode import absorbed_decode, plan
    from .mla_torch import absorb_weights
    q_nope, q_pe = s.queries(1)
    w_uk, _ = absorb_weights(s.kv_b, num_heads=s.heads, qk_nope_head_dim=NOPE, v_head_dim=VDIM)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    ref = absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE).float()
    out = []
    for cfg in configs:
        if time.monotonic() > deadline:
            break
        cfg = dict(kernel="generic") | cfg
        call = lambda: absorbed_decode(q_latent, q_pe, s.cache, 0, scale=SCALE, **cfg)  # noqa: E731
        try:
            got = call().float()
            us = _bench(call, rep=rep)
            extra = dict(kernel_only_us=kernel_only_us(call, KERNEL_NAMES, reps=20)["total"]) if cupti else {}
        except Exception as e:  # noqa: BLE001 - out of shared memory or registers: record and go on
            out.append(dict(heads=s.heads, ctx=s.ctx, batch=s.batch, **cfg, error=str(e).splitlines()[0][:120]))
            continue
        err = float((got - ref).norm() / ref.norm())  # every configuration computes the same function
        out.append(dict(heads=s.heads, ctx=s.ctx, batch=s.batch, **cfg, us=us, rel_err_vs_default=err, **extra,
                        resolved=plan(q_latent, q_pe, s.cache, **cfg)))
    return out


def sweep_prefill(s: Shape, num_new: int, configs: list[dict], deadline: float) -> list[dict]:
    from .triton_prefill import prefill_chunk
    q_nope, q_pe = s.queries(num_new)
    latent = s.cache.prefix(0, s.batch)
    kv = (latent[..., :RANK] @ s.kv_b.T).view(s.batch, s.ctx, s.heads, NOPE + VDIM)
    k_nope, v = kv.split([NOPE, VDIM], dim=-1)
    k_pe = latent[..., RANK:]
    out = []
    for cfg in configs:
        if time.monotonic() > deadline:
            break
        try:
            us = _bench(lambda: prefill_chunk(q_nope, q_pe, k_nope, v, k_pe, s.cache.seq_lens, kv_begin=0,
                                              scale=SCALE, **cfg), rep=40)
        except Exception as e:  # noqa: BLE001
            out.append(dict(heads=s.heads, ctx=s.ctx, new_tokens=num_new, **cfg, error=str(e).splitlines()[0][:120]))
            continue
        flops = prefill_flops(s.heads, s.ctx, num_new, s.batch, "decompressed") - \
            2 * s.batch * s.ctx * RANK * s.heads * (NOPE + VDIM)  # the kernel alone: no decompression
        out.append(dict(heads=s.heads, ctx=s.ctx, new_tokens=num_new, **cfg, us=us, tflops=flops / us / 1e6))
    return out


def e2e_decode(ctxs: list[int], *, layers: int | None, device, steps: int = 20) -> list[dict]:
    """V2-Lite shape, random bf16 weights, decode one token after ctx cached tokens (the cache is
    filled with random latents: their values do not change the time)."""
    from runtime.config import config_from_dict
    from runtime.make_model import preset_config
    from runtime.model import DeepseekForCausalLM
    cfg = config_from_dict(preset_config("v2-lite", layers=layers))
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)  # no fp32 copy of 31 GB
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    rows = []
    for ctx in ctxs:
        cache = model.new_cache(batch=1, max_len=ctx + steps + 1)
        cache.data.normal_(generator=gen)
        x = torch.tensor([[5]], device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        model(x, cache=cache, start_pos=ctx)  # warm-up (kernel compiles)
        sync()
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            model(x, cache=cache, start_pos=ctx + i)
            sync()
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
        rows.append(dict(kind="e2e_decode", shape="v2-lite", layers=cfg.num_hidden_layers, ctx=ctx, ms_per_token=ms,
                         cache_gib=cache.nbytes / 2**30))
        del cache
    base = rows[0]["ms_per_token"]
    for r in rows:
        r["speed_vs_first"] = base / r["ms_per_token"]
    return rows
