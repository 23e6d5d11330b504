"""Triton kernel for the absorbed MLA form over the paged latent cache (decode, and short prefills).

One KV head of width R + rope (K = [c_kv ‖ k_pe], V = c_kv) serves all query heads, so the
query rows of one sequence are (token, head) pairs, r = t·H + h, and a program takes BLOCK_H of
them: every key read from HBM is used BLOCK_H times. The KV axis is split so that a single
sequence still fills the GPU (FlashDecoding): stage 1 writes, per split, the normalised partial
output and its log-sum-exp; stage 2 merges the splits. With one split stage 1 writes the output.

Keys are found through the page table: when the page size is a multiple of the tile (the
default 64-key pages), once per tile (one page id, then rows at a fixed stride); otherwise key by
key (page = table[b, n // PAGE]). Any page size and page order work. The split count follows the
SM count and context (`choose_splits`), so batch 1 fills the GPU. With v_split 2 two programs
share a head block, each owning half of the 512 value columns (and computing the scores from both
halves); measured slower than one program at 32K-128K, kept as an option. fp8 pages are scaled per
128-value group on load. Scores use exp2 with log2(e) folded into the scale; the lse written
between the stages is in log2 units.

On Hopper, `plan()` sends most bf16 calls to triton_decode_tma's kernels instead (tiles by TMA;
rows- or keys-major by head count and context, from the H200 sweep); this kernel is the fallback
for what they cannot run (fp32 / fp8 pages, pages that do not hold whole tiles, older GPUs) and
128 heads at 1K. `kernel=` forces one. Measurements: gpu_attention/NOTES.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_decode_tma
from .latent_cache import FP8_GROUP, LatentCache
from .triton_rows import split_rows

LOG2E = 1.4426950408889634
KERNELS = ("generic", "tma", "tma_keys")  # triton_decode's pointer-load kernel; triton_decode_tma's two


@triton.jit
def _latent_cols(CACHE, SCALES, base, sbase, cols, ok, FP8: tl.constexpr, GROUP: tl.constexpr):
    """Columns `cols` of a tile of latent rows; fp8 values come back scaled, in fp32."""
    x = tl.load(CACHE + base[:, None] + cols[None, :], mask=ok, other=0.0)
    if FP8:
        x = x.to(tl.float32) * tl.load(SCALES + sbase[:, None] + (cols // GROUP)[None, :], mask=ok, other=0.0)
    return x


@triton.jit
def _absorbed_split_kernel(
        QL, QP, CACHE, SCALES, PAGE_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
        stride_qlb, stride_qlt, stride_qlh, stride_qpb, stride_qpt, stride_qph,
        stride_cp, stride_cn, stride_sp, stride_sn, stride_ptb,
        stride_ob, stride_or, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
        num_heads, num_new, split_len, qk_scale,
        RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
        GROUP: tl.constexpr, DIRECT: tl.constexpr, PAGE_TILES: tl.constexpr, V_SPLIT: tl.constexpr,
        PRECISION: tl.constexpr):
    b = tl.program_id(0)
    hb = tl.program_id(1) // V_SPLIT
    v = tl.program_id(1) % V_SPLIT  # with V_SPLIT 2: which half of the 512 value columns this program owns
    split = tl.program_id(2)
    rows, row_ok, q_pos, lo, hi = split_rows(SEQ_LENS, b, hb, split, num_heads, num_new, split_len, BLOCK_H)

    COLS: tl.constexpr = BLOCK_C // V_SPLIT
    offs_c = v * COLS + tl.arange(0, COLS)  # value columns (and their part of the scores)
    offs_o = (1 - v) * COLS + tl.arange(0, COLS)  # V_SPLIT 2: the other half, for the scores only
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_N)
    c_ok = offs_c < RANK
    r_ok = offs_r < ROPE
    t_idx = rows // num_heads
    h_idx = rows % num_heads
    q_row = QL + b * stride_qlb + t_idx * stride_qlt + h_idx * stride_qlh
    ql = tl.load(q_row[:, None] + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    if V_SPLIT == 2:
        ql_o = tl.load(q_row[:, None] + offs_o[None, :], mask=row_ok[:, None] & (offs_o < RANK)[None, :], other=0.0)
    qp = tl.load(QP + b * stride_qpb + t_idx[:, None] * stride_qpt + h_idx[:, None] * stride_qph + offs_r[None, :],
                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, COLS], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_t
        n_ok = offs_n < hi
        if PAGE_TILES:  # the tile lies inside one page: one page id, then rows at a fixed stride
            page = tl.load(PAGE_TABLE + b * stride_ptb + n0 // PAGE).to(tl.int64)
            in_page = n0 % PAGE + offs_t
        else:  # pages smaller than a tile: one page id per key
            page = tl.load(PAGE_TABLE + b * stride_ptb + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
            in_page = offs_n % PAGE
        base = page * stride_cp + in_page * stride_cn
        sbase = page * stride_sp + in_page * stride_sn
        # the latent tile serves both products: scores over all 576 dims, values over the first 512
        c = _latent_cols(CACHE, SCALES, base, sbase, offs_c, n_ok[:, None] & c_ok[None, :], FP8, GROUP)
        kr = _latent_cols(CACHE, SCALES, base, sbase, RANK + offs_r, n_ok[:, None] & r_ok[None, :], FP8, GROUP)
        if FP8:
            c = c.to(ql.dtype)
            kr = kr.to(ql.dtype)
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(qp, tl.trans(kr), input_precision=PRECISION)
        if V_SPLIT == 2:
            c_o = _latent_cols(CACHE, SCALES, base, sbase, offs_o, n_ok[:, None] & (offs_o < RANK)[None, :], FP8,
                               GROUP)
            s += tl.dot(ql_o, tl.trans(c_o.to(ql.dtype)), input_precision=PRECISION)
        s = s * qk_scale
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if DIRECT:
        tl.store(OUT + b * stride_ob + rows[:, None] * stride_or + offs_c[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])
    else:
        tl.store(O_PART + b * stride_pb + rows[:, None] * stride_pr + split * stride_ps + offs_c[None, :], out,
                 mask=row_ok[:, None] & c_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE_PART + b * stride_lb + rows * stride_lr + split, lse,
                 mask=row_ok & (rows * 0 + v == 0))  # value halves share the lse: one writes it


@triton.jit
def _combine_kernel(O_PART, LSE_PART, OUT, stride_pb, stride_pr, stride_ps, stride_lb, stride_lr,
                    stride_ob, stride_or, num_splits,
                    RANK: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr):
    """One program per (sequence, row, BLOCK_CC columns): weights from all splits' lse, then the
    partial outputs CHUNK_S splits at a time (many loads in flight, not one split per step)."""
    b = tl.program_id(0)
    r = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = LSE_PART + b * stride_lb + r * stride_lr
    lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), 0)  # empty splits weigh 0
    offs_c = tl.program_id(2) * BLOCK_CC + tl.arange(0, BLOCK_CC)
    c_ok = offs_c < RANK
    offs_k = tl.arange(0, CHUNK_S)
    acc = tl.zeros([BLOCK_CC], tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        s_ok = s0 + offs_k < num_splits
        w = tl.exp2(tl.load(lse_row + s0 + offs_k, mask=s_ok, other=float("-inf")) - m)
        o = tl.load(O_PART + b * stride_pb + r * stride_pr + (s0 + offs_k)[:, None] * stride_ps + offs_c[None, :],
                    mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    acc = acc / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * stride_ob + r * stride_or + offs_c, acc.to(OUT.dtype.element_ty), mask=c_ok)


@triton.jit
def _empty_kernel(X):
    """Does nothing: bench-attn times it for the launch floor of a call."""
    pass


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few splits, still exercises the combine


def default_config(num_heads: int, num_new: int, dtype: torch.dtype, max_len: int = 0, *, tma: bool = False) -> dict:
    """Kernel, block shapes and split policy by query rows per sequence and context, from the H100
    sweeps (benchmarks/results/2026-11-21-gpu-machine-h100-attn-decode-*.json) and the H200 sweep of
    the TMA kernels (...-h200-attn-decode-tma-*.json). `tma`: whether the TMA kernels
    (triton_decode_tma) can run this call. `waves`: programs per SM the split count aims at;
    `min_split`: fewest keys per split (each split writes a [rows, 512] fp32 partial); `v_split` 2:
    two programs share a head block, each owning half of the value columns."""
    rows = num_heads * num_new
    if tma and rows <= 128:  # H200: a TMA kernel as fast or faster at every context but 128 heads at 1K
        if rows <= 16:  # 16 heads: keys-major up to 16K (wgmma, N = 16), rows-major in two waves from 32K
            return tma_config(rows, "tma_keys" if max_len < 32768 else "tma")
        if max_len > 16384:  # 128 heads: rows-major, 64-row blocks from 32K; keys-major 32-row blocks at 2-16K
            return tma_config(rows, "tma")
        if max_len > 1024:
            return tma_config(rows, "tma_keys")
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory and registers
        return dict(kernel="generic", block_h=16, block_n=16, num_warps=4, num_stages=1, waves=2, min_split=64)
    if rows <= 16:  # 16 heads, batch 1: one wave of 16x64 programs was fastest at 8K-128K
        return dict(kernel="generic", block_h=16, block_n=64, num_warps=4, num_stages=2, waves=1, min_split=64)
    if rows <= 128:  # 128 heads: many 16-row programs at 8K, one wave of 64-row programs beyond
        if max_len <= 16384:
            return dict(kernel="generic", block_h=16, block_n=64, num_warps=4, num_stages=2, waves=2, min_split=64)
        return dict(kernel="generic", block_h=64, block_n=64, num_warps=8, num_stages=2, waves=1, min_split=64)
    return dict(kernel="generic", block_h=64, block_n=32, num_warps=8, num_stages=2, waves=2, min_split=256)


def tma_config(rows: int, kernel: str = "tma") -> dict:
    """The TMA kernels' blocks. Rows-major ("tma", sm_90a, ptxas: 64 rows x 8 warps x 64-key tiles
    in 2 stages = 226 registers, no spills, 216 KB of shared memory; 16-row blocks run mma.sync).
    Keys-major ("tma_keys": 32 rows x 4 warps x 64-key tiles in 2 stages = 238 registers, 184 KB)."""
    if kernel == "tma_keys":
        return dict(kernel=kernel, block_h=min(32, max(16, triton.next_power_of_2(rows))), block_n=64, num_warps=4,
                    num_stages=2, waves=1, min_split=64)
    if rows <= 16:
        return dict(kernel=kernel, block_h=16, block_n=32, num_warps=4, num_stages=2, waves=2, min_split=64)
    return dict(kernel=kernel, block_h=64, block_n=64, num_warps=8, num_stages=2, waves=1, min_split=64)


def choose_splits(max_len: int, programs_per_split: int, sm_count: int, *, block_n: int, waves: float,
                  min_split: int) -> int:
    """Splits of the KV axis: enough programs for `waves` per SM, no split shorter than min_split
    keys (nor than one tile)."""
    want = triton.cdiv(int(waves * sm_count), programs_per_split)
    return max(1, min(want, triton.cdiv(max_len, max(min_split, block_n))))


def plan(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, *, kernel: str | None = None,
         num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None, waves: float | None = None,
         min_split: int | None = None, v_split: int | None = None) -> dict:
    """The kernel, blocks and splits absorbed_decode runs for this call: the defaults for its shape,
    each overridden by the argument when given."""
    B, T, H, R = q_latent.shape
    max_len = cache.launch_len or max(cache.lens[:B])  # launch_len: fixed while a CUDA graph is captured
    tma_ok = triton_decode_tma.applies(q_latent, cache, rank=R, rope=q_pe.shape[-1], block_n=block_n or 64)
    cfg = default_config(H, T, q_latent.dtype, max_len, tma=tma_ok and kernel != "generic")
    if kernel is not None and kernel != cfg["kernel"]:  # an explicit kernel takes that kernel's defaults
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        if kernel != "generic" and not tma_ok:
            raise ValueError("the TMA kernel needs a CUDA GPU of compute capability 9+, a bf16/fp16 cache in the "
                             "queries' dtype, pages holding whole tiles and a latent of two power-of-two halves "
                             f"plus a power-of-two rope part; got {cache.data.dtype} pages of {cache.page_size}, "
                             f"rank {R}, rope {q_pe.shape[-1]}")
        cfg = tma_config(T * H, kernel)  # (an explicit "generic" never gets here: tma=False above)
    given = dict(block_h=block_h, block_n=block_n, num_warps=num_warps, num_stages=num_stages, waves=waves,
                 min_split=min_split, v_split=v_split)
    cfg = cfg | {k: v for k, v in given.items() if v is not None}
    cfg.setdefault("v_split", 1)
    if cfg["v_split"] not in (1, 2) or (cfg["v_split"] == 2 and (R != triton.next_power_of_2(R)
                                                                 or cfg["kernel"] != "generic")):
        raise ValueError(f"v_split must be 1, or 2 with a power-of-two rank and the generic kernel; got "
                         f"{cfg['v_split']} with rank {R} and the {cfg['kernel']} kernel")
    head_blocks = triton.cdiv(T * H, cfg["block_h"])
    if num_splits is None:
        num_splits = choose_splits(max_len, B * head_blocks * cfg["v_split"],
                                   _sm_count(torch.device(q_latent.device)), block_n=cfg["block_n"],
                                   waves=cfg["waves"], min_split=cfg["min_split"])
    # whole tiles per split: with pages a multiple of the tile, no tile crosses a page
    split_len = triton.cdiv(triton.cdiv(max_len, num_splits), cfg["block_n"]) * cfg["block_n"]
    return cfg | dict(num_splits=triton.cdiv(max_len, split_len), split_len=split_len, head_blocks=head_blocks)


def absorbed_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: LatentCache, layer: int, *, scale: float,
                    **overrides) -> torch.Tensor:
    """q_latent [B, T, H, R], q_pe [B, T, H, rope] (any strides, last dim contiguous) over the
    first B sequences of `cache` -> out_latent [B, T, H, R] in q_latent's dtype. `overrides`: the
    keyword arguments of plan() (kernel, blocks, splits), for tuning and tests."""
    B, T, H, R = q_latent.shape
    assert R + q_pe.shape[-1] == cache.latent_dim and q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert q_latent.dtype == q_pe.dtype and q_latent.dtype in (torch.bfloat16, torch.float16, torch.float32)
    cfg = plan(q_latent, q_pe, cache, **overrides)
    block_h, block_n, num_warps, num_stages = cfg["block_h"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"]
    v_split, num_splits, split_len = cfg["v_split"], cfg["num_splits"], cfg["split_len"]
    rows = T * H
    out = torch.empty(B, rows, R, dtype=q_latent.dtype, device=q_latent.device)
    direct = num_splits == 1
    o_part = out if direct else torch.empty(B, rows, num_splits, R, dtype=torch.float32, device=out.device)
    lse_part = out if direct else torch.empty(B, rows, num_splits, dtype=torch.float32, device=out.device)
    if cfg["kernel"] != "generic":
        triton_decode_tma.launch(q_latent, q_pe, cache, layer, out, o_part, lse_part, qk_scale=scale * LOG2E,
                                 split_len=split_len, num_splits=num_splits, block_h=block_h, block_n=block_n,
                                 num_warps=num_warps, num_stages=num_stages, keys_major=cfg["kernel"] == "tma_keys")
    else:
        _generic_split(q_latent, q_pe, cache, layer, out, o_part, lse_part, scale=scale, split_len=split_len,
                       num_splits=num_splits, head_blocks=cfg["head_blocks"], block_h=block_h, block_n=block_n,
                       num_warps=num_warps, num_stages=num_stages, v_split=v_split)
    if not direct:
        # column blocks small enough for two or more programs per SM (the merge is latency-bound:
        # 16 rows x 128 columns left most SMs idle), each loading [chunk, columns] tiles of 16 KB
        sms = _sm_count(torch.device(q_latent.device))
        block_cc = max(32, min(128, triton.next_power_of_2(triton.cdiv(B * rows * R, 2 * sms)) // 2))
        block_s = max(2, triton.next_power_of_2(num_splits))
        _combine_kernel[(B, rows, triton.cdiv(R, block_cc))](
            o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), num_splits,
            RANK=R, BLOCK_CC=block_cc, BLOCK_S=block_s, CHUNK_S=min(block_s, 4096 // block_cc), num_warps=4)
    return out.view(B, T, H, R)


def _generic_split(q_latent, q_pe, cache: LatentCache, layer: int, out, o_part, lse_part, *, scale: float,
                   split_len: int, num_splits: int, head_blocks: int, block_h: int, block_n: int, num_warps: int,
                   num_stages: int, v_split: int) -> None:
    """Stage 1 with the generic kernel over grid (B, head blocks · v_split, splits)."""
    B, T, H, R = q_latent.shape
    rope = q_pe.shape[-1]
    data = cache.data[layer]
    scales = cache.scales[layer] if cache.fp8 else data
    direct = num_splits == 1
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    block_c = max(16, triton.next_power_of_2(R))
    _absorbed_split_kernel[(B, head_blocks * v_split, num_splits)](
        q_latent, q_pe, data, scales, cache.page_table, cache.seq_lens, out, o_part, lse_part,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        data.stride(0), data.stride(1), scales.stride(0), scales.stride(1), cache.page_table.stride(0),
        out.stride(0), out.stride(1), o_part.stride(0), o_part.stride(1), 0 if direct else o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        H, T, split_len, scale * LOG2E,
        RANK=R, ROPE=rope, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(rope)),
        PAGE=cache.page_size, BLOCK_H=block_h, BLOCK_N=block_n, FP8=cache.fp8, GROUP=FP8_GROUP, DIRECT=direct,
        PAGE_TILES=cache.page_size % block_n == 0, V_SPLIT=v_split, PRECISION=precision, num_warps=num_warps,
        num_stages=num_stages)
