"""Small decode-step ops in one Triton kernel each on the GPU: RMSNorm (alone or after the residual
add), the RoPE rotation, the latent cache's store (RMSNorm of c_kv, RoPE of k_pe, written into its
page slot), the router's logits (the hidden state's fp32 copy for the CPU experts written on the
way) and its choice (softmax/sigmoid, groups, top-k, renormalisation, scaling).

At one token a decode step is launch-bound: each torch op is a kernel of a few microseconds.
`hmoe bench --breakdown` counted ~250 GPU kernels in a 4-layer V2-Lite step, 104 of them in
RMSNorm's eight-kernel torch form (float copy, square, mean, add, rsqrt, multiply, cast back,
multiply by the weight), 3-4 calls per layer; RoPE is ~8 more per call, two calls per layer.

RMSNorm: the math of `runtime.model.RMSNorm`: the row's mean square in fp32, x * rsqrt(mean + eps)
rounded to x's dtype, then times the weight in their promoted dtype (torch multiplies bf16 in fp32
and rounds once, as here); only the order of the sum differs from torch's reduction.
The residual add rounds h + delta to h's dtype first, as torch's add does, then normalises that.
RoPE (`runtime.rope.RotaryTables.apply`): fp32 math reading x through its strides (q_pe and k_pe
are views into the projections' outputs); the compiler may fuse a product and a sum into one FMA,
so a result can differ from torch's in the last fp32 bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _normed(x, w_ptr, cols, mask, n, eps, X_DTYPE: tl.constexpr):
    """RMSNorm of one row x (fp32, zeros past n): x * rsqrt(mean square + eps) rounded to X_DTYPE,
    times the weight, in fp32 (the caller rounds to its output's dtype)."""
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * r).to(X_DTYPE).to(tl.float32)
    return tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * y


@triton.jit
def _rotated(src, cos_ptr, sin_ptr, t, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    """RoPE of the vector at src for position row t: (lo, hi offsets, rotated lo, rotated hi) in fp32.
    Interleaved pairs (x0, x1), (x2, x3)..., else the two halves."""
    i = tl.arange(0, HALF)
    if INTERLEAVE:
        lo, hi = 2 * i, 2 * i + 1
    else:
        lo, hi = i, i + HALF
    a = tl.load(src + lo).to(tl.float32)
    c = tl.load(src + hi).to(tl.float32)
    cos = tl.load(cos_ptr + t * HALF + i)
    sin = tl.load(sin_ptr + t * HALF + i)
    return lo, hi, a * cos - c * sin, c * cos + a * sin


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_out, BLOCK: tl.constexpr,
                     X_DTYPE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _normed(x, w_ptr, cols, mask, n, eps, X_DTYPE)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] on a GPU, weight [D] -> [..., D] in torch.promote_types(weight, x)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    BLOCK = triton.next_power_of_2(D)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, D, eps, rows.stride(0), out.stride(0), BLOCK=BLOCK,
                                       X_DTYPE=_TL[x.dtype], num_warps=min(16, max(1, BLOCK // 512)))
    return out.view(*x.shape[:-1], D)


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, e_ptr, w_ptr, sum_ptr, out_ptr, n, eps, stride_h, stride_d, stride_e,
                         stride_out, BLOCK: tl.constexpr, TWO: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = sum_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    if TWO:  # (routed fp32, shared): their sum rounded to h's dtype first, as moe.add_parts rounds it
        e = tl.load(e_ptr + row * stride_e + cols, mask=mask, other=0.0).to(tl.float32)
        d = (d + e).to(dtype).to(tl.float32)
    s = (h + d).to(dtype)  # the residual stream, rounded as torch's add rounds it
    tl.store(sum_ptr + row * n + cols, s, mask=mask)
    y = _normed(s.to(tl.float32), w_ptr, cols, mask, n, eps, dtype)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(h: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor,
                 eps: float, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)) in one kernel, h [..., D] on a GPU; deltas: (delta,) of h's
    dtype, or (routed, shared) whose sum (rounded to h's dtype) is the delta."""
    D = h.shape[-1]
    rows = [t.reshape(-1, D) for t in (h, *deltas)]
    rows = [t if t.stride(-1) == 1 else t.contiguous() for t in rows]
    hr, dr, er = rows[0], rows[1], rows[-1]
    total = torch.empty(hr.shape, dtype=h.dtype, device=h.device)
    out = torch.empty(hr.shape, dtype=torch.promote_types(weight.dtype, h.dtype), device=h.device)
    BLOCK = triton.next_power_of_2(D)
    _add_rms_norm_kernel[(hr.shape[0],)](hr, dr, er, weight, total, out, D, eps, hr.stride(0), dr.stride(0),
                                         er.stride(0), out.stride(0), BLOCK=BLOCK, TWO=len(deltas) == 2,
                                         num_warps=num_warps or min(16, max(1, BLOCK // 512)))
    return total.view(h.shape), out.view(*h.shape[:-1], D)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, sxb, sxt, sxh, HALF: tl.constexpr,
                 INTERLEAVE: tl.constexpr):
    pid = tl.program_id(0)  # one (b, t, head) vector per program
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    lo, hi, a, c = _rotated(x_ptr + b * sxb + t * sxt + h * sxh, cos_ptr, sin_ptr, t, HALF, INTERLEAVE)
    dst = out_ptr + pid * (2 * HALF)
    tl.store(dst + lo, a.to(out_ptr.dtype.element_ty))
    tl.store(dst + hi, c.to(out_ptr.dtype.element_ty))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, T, heads, dim] on a GPU (any strides, the last one 1), cos/sin [T, dim/2] fp32 ->
    rotated, contiguous, in x's dtype."""
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    _rope_kernel[(B * T * H,)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), HALF=D // 2,
                               INTERLEAVE=interleave, num_warps=1)
    return out


@triton.jit
def _store_latent_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, dst_ptr, T, eps, stride_kv, stride_dst,
                         RANK: tl.constexpr, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    row = tl.program_id(0)  # one token (b, t) per program: rows are b * T + t
    t = row % T
    src = kv_ptr + row * stride_kv
    dst = dst_ptr + tl.load(slot_ptr + row) * stride_dst
    dtype = kv_ptr.dtype.element_ty
    cols = tl.arange(0, RANK)  # c_kv: RMSNorm as _rms_norm_kernel does it
    y = _normed(tl.load(src + cols).to(tl.float32), w_ptr, cols, cols < RANK, RANK, eps, dtype)
    tl.store(dst + cols, y.to(w_ptr.dtype.element_ty).to(dst_ptr.dtype.element_ty))
    lo, hi, a, c = _rotated(src + RANK, cos_ptr, sin_ptr, t, HALF, INTERLEAVE)  # k_pe: RoPE as _rope_kernel
    tl.store(dst + RANK + lo, a.to(dtype).to(dst_ptr.dtype.element_ty))
    tl.store(dst + RANK + hi, c.to(dtype).to(dst_ptr.dtype.element_ty))


def store_latent(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 interleave: bool, slots: torch.Tensor, dest: torch.Tensor) -> None:
    """The latent cache's write of one step in one kernel: kv [B, T, rank + rope] (kv_a_proj's output)
    -> dest[slots[b * T + t]] = [rms_norm(c_kv) | rope(k_pe)], each rounded to kv's dtype as the
    unfused ops round them, then to dest's. dest [slots, rank + rope] (the cache's flat view)."""
    B, T, D = kv.shape
    rank, rope_dim = norm_weight.shape[0], D - norm_weight.shape[0]
    rows = kv.reshape(B * T, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    _store_latent_kernel[(B * T,)](rows, norm_weight, cos.contiguous(), sin.contiguous(), slots.reshape(-1), dest, T,
                                   eps, rows.stride(0), dest.stride(0), RANK=rank, HALF=rope_dim // 2,
                                   INTERLEAVE=interleave, num_warps=1)


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, logits_ptr, x_out_ptr, E, H, stride_x, stride_w, BLOCK_E: tl.constexpr,
                          BLOCK_H: tl.constexpr, WRITE_X: tl.constexpr):
    block, row = tl.program_id(0), tl.program_id(1)  # BLOCK_E experts of one token
    es = block * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = es < E
    acc = tl.zeros([BLOCK_E, BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
        if WRITE_X:  # the first block also hands the fp32 hidden state on
            if block == 0:
                tl.store(x_out_ptr + row * H + cols, x, mask=cmask)
        w = tl.load(w_ptr + es[:, None] * stride_w + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(logits_ptr + row * E + es, tl.sum(acc, axis=1), mask=emask)


def router_logits(x: torch.Tensor, weight: torch.Tensor, x_out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [T, E] = x [T, H] . weight [E, H]^T in fp32 (either operand bf16 or fp32, converted on
    load: no fp32 copy of a large router weight), for a few tokens (a GEMV per token: one kernel instead
    of cuBLAS's and a conversion's); x as fp32 into x_out [T, H] (contiguous) when given."""
    T, H = x.shape
    E = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    BLOCK_E = 2  # many small programs: a GEMV this size is latency-bound (4 experts per program: 4.1 us, V2-Lite)
    _router_logits_kernel[(triton.cdiv(E, BLOCK_E), T)](x, weight, logits, x_out if x_out is not None else logits, E, H,
                                                       x.stride(0), weight.stride(0), BLOCK_E=BLOCK_E, BLOCK_H=1024,
                                                       WRITE_X=x_out is not None, num_warps=4)
    return logits


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, w_ptr, id_ptr, E, stride_l, stride_w, stride_id, scaling,
                  E_P2: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, N_GROUP: tl.constexpr,
                  G_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  METHOD: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr):
    row = tl.program_id(0)
    e = tl.arange(0, E_P2)
    valid = e < E
    NEG = float("-inf")
    logits = tl.load(logits_ptr + row * stride_l + e, mask=valid, other=NEG)
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(logits), 0.0)
    else:
        p = tl.exp(logits - tl.max(logits, axis=0))
        scores = p / tl.sum(p, axis=0)
    choice = tl.where(valid, scores, NEG)
    if METHOD == 2:  # noaux_tc: the correction bias only chooses
        choice = choice + tl.load(bias_ptr + e, mask=valid, other=0.0)
    if METHOD != 0:  # keep the best TOPK_GROUP groups of E // N_GROUP experts
        group = e // (E // N_GROUP)
        g = tl.arange(0, G_P2)
        gscore = tl.full([G_P2], NEG, tl.float32)
        for j in tl.static_range(N_GROUP):
            member = (group == j) & valid
            c = tl.where(member, choice, NEG)
            best = tl.max(c, axis=0)
            if METHOD == 2:  # a group's score is the sum of its two best
                first = tl.min(tl.where(c == best, e, E_P2), axis=0)
                best = best + tl.max(tl.where(e == first, NEG, c), axis=0)
            gscore = tl.where(g == j, best, gscore)
        keep = tl.zeros([E_P2], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(gscore, axis=0)
            pick = tl.min(tl.where(gscore == top, g, G_P2), axis=0)
            keep = keep | (group == pick)
            gscore = tl.where(g == pick, NEG, gscore)
        choice = tl.where(keep & valid, choice, NEG)
    kk = tl.arange(0, K_P2)
    w = tl.zeros([K_P2], tl.float32)
    ids = tl.zeros([K_P2], tl.int64)
    for k in tl.static_range(K):  # the K best, best first
        top = tl.max(choice, axis=0)
        pick = tl.min(tl.where(choice == top, e, E_P2), axis=0)
        w = tl.where(kk == k, tl.sum(tl.where(e == pick, scores, 0.0), axis=0), w)
        ids = tl.where(kk == k, pick.to(tl.int64), ids)
        choice = tl.where(e == pick, NEG, choice)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    tl.store(w_ptr + row * stride_w + kk, w * scaling, mask=kk < K)
    tl.store(id_ptr + row * stride_id + kk, ids, mask=kk < K)


def route(logits: torch.Tensor, *, top_k: int, method: str, sigmoid: bool, n_group: int, topk_group: int,
          norm: bool, scaling: float, bias: torch.Tensor | None = None,
          out: tuple[torch.Tensor, torch.Tensor] | None = None,
          num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """runtime.moe.Router's choice from fp32 logits [T, E] on a GPU, in one kernel: (weights [T, k] fp32,
    ids [T, k] int64), best first; into `out` (weights, ids) when given (e.g. the host copy's buffers).
    One warp per token up to 512 experts: the choice is k rounds of reductions over the experts, which
    cross warps through shared memory with more (H200, one token, `benchmarks/small_kernels.py`: 64
    experts 1.9 vs 3.1 us with 4 warps, 256 experts 4.3 vs 7.3 us)."""
    T, E = logits.shape
    if out is None:
        out = (torch.empty(T, top_k, dtype=torch.float32, device=logits.device),
               torch.empty(T, top_k, dtype=torch.int64, device=logits.device))
    weights, ids = out
    kind = ROUTE_METHODS[method]
    num_warps = num_warps or max(1, triton.next_power_of_2(E) // 512)
    _route_kernel[(T,)](logits, bias if bias is not None else logits, weights, ids, E, logits.stride(0),
                        weights.stride(0), ids.stride(0), float(scaling), E_P2=triton.next_power_of_2(E), K=top_k,
                        K_P2=triton.next_power_of_2(top_k), N_GROUP=n_group if kind else 1,
                        G_P2=triton.next_power_of_2(n_group if kind else 1), TOPK_GROUP=topk_group if kind else 1,
                        METHOD=kind,
                        SIGMOID=sigmoid, NORM=norm, num_warps=num_warps)
    return weights, ids
