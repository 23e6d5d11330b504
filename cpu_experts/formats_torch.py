"""`formats.quantize` in torch, byte-identical, on any torch device (CUDA when present).

Each quantizer mirrors its numpy twin in formats.py function by function (same names, same float32
operations in the same order): sequential sums in index order over the transposed [n, B] layout,
round-half-even, the same divisions, f16 by round-to-nearest-even. Elementwise float32 ops are
IEEE-exact on CPU torch and on CUDA (PyTorch builds without fast-math), so the bytes are numpy's.
Traps avoided, both of which round twice: torch computes `scalar / t` as `reciprocal(t) * scalar`,
and CUDA divides by a CPU scalar as a multiply by its reciprocal; every division here is
tensor / same-device tensor (`_div`). Where numpy's semantics are x86's or its own, they are
written out: float -> int casts (`_x86_int`: NaN and out-of-range -> INT32_MIN, then the low byte),
signed zeros of np.maximum/np.minimum (`_maximum0`), the NaN bits of a NaN scale (`_f16_bytes`),
so pathological blocks match too (cpu_experts/NOTES.md, "Quantizing in torch").

This is a torch adapter: cpu_experts' core stays numpy; experts.py imports it lazily.
"""
import os

import numpy as np
import torch

from .formats import QK_K, get_format
from .formats import quantize as quantize_numpy

_I32_MIN = -2.0 ** 31
f = np.float32  # scalars are computed in numpy float32, exactly as formats.py computes them


def _div(a, b):
    """a / b elementwise with one rounding: any scalar becomes a 0-dim tensor on the other's device."""
    dev = a.device if isinstance(a, torch.Tensor) else b.device
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=torch.float32, device=dev)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b, dtype=torch.float32, device=dev)
    return torch.div(a, b)


def _x86_int(r):
    """Integral float32 values as x86's float -> int32 conversion (numpy's astype on this host) leaves
    them, kept in float32: NaN and values outside int32 become INT32_MIN. CUDA's conversion
    saturates instead, so nothing out of range is ever converted by the device."""
    return torch.where((r > _I32_MIN) & (r < -_I32_MIN), r, _I32_MIN)


def _rint(v):
    """np.rint(v).astype(np.int32), kept in float32: half to even, then _x86_int."""
    return _x86_int(torch.round(v))


def _u8(v):
    """float32 values in int32's range -> uint8 as numpy's int32 -> (u)int8 cast: the low byte."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


_X86_NAN_F16 = -512  # 0xFE00: x86's default NaN (sign set, quiet) in f16, as numpy writes it


def _f16_bytes(d):
    """d: [B] float16 -> [B, 2] little-endian bytes. A NaN scale (q6_k of weights past ~1e19, whose
    squares overflow) is made by arithmetic: x86 makes -qNaN (f16 0xFE00), CUDA +0x7FFF; write x86's.
    On the CPU nothing changes, so a NaN carried in from the weights keeps numpy's bits there."""
    b = d.contiguous().view(torch.int16)
    if d.device.type != "cpu":
        b = torch.where(d.isnan(), torch.tensor(_X86_NAN_F16, dtype=torch.int16, device=d.device), b)
    return b.view(torch.uint8).reshape(d.shape[0], 2)


def _where0(cond, a):
    return torch.where(cond, a, torch.zeros((), dtype=a.dtype, device=a.device))


def _maximum0(a):
    """np.maximum(a, 0): the second operand unless a > 0 or a is NaN, so -0 becomes +0 (torch.clamp keeps -0)."""
    return _where0((a > 0) | a.isnan(), a)


def _minimum0(a):
    """np.minimum(a, 0), signed zeros as numpy: +0 unless a < 0 or a is NaN."""
    return _where0((a < 0) | a.isnan(), a)


# ---------------------------------------------------------------- bf16, q8_0, q4_0

def _quantize_bf16(x):
    n = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF
    return torch.stack([n & 0xFF, n >> 8], dim=-1).to(torch.uint8).reshape(x.shape[0], -1)


def _roundf_away(x):
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _quantize_q8_0(x):
    d = _div(torch.abs(x).amax(dim=1, keepdim=True), f(127))
    inv = torch.where(d == 0, 0.0, _div(f(1), d))
    qs = _u8(_x86_int(_roundf_away(x * inv)))  # astype(int8): the low byte of an int32 conversion
    return torch.cat([_f16_bytes(d[:, 0].to(torch.float16)), qs], dim=1)


def _quantize_q4_0(x):
    imax = torch.abs(x).argmax(dim=1, keepdim=True)
    d = _div(torch.gather(x, 1, imax), f(-8))
    inv = torch.where(d == 0, 0.0, _div(f(1), d))
    q = _u8(_x86_int(torch.trunc(x * inv + 8.5))).clamp(0, 15)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([_f16_bytes(d[:, 0].to(torch.float16)), qs], dim=1)


# ---------------------------------------------------------------- q4_k

def _seq_sum(terms, total=None):
    """total (default 0) + terms[0] + terms[1] + ... in index order (formats._seq_sum)."""
    total = terms[0] + 0.0 if total is None else total + terms[0]  # 0 + t: -0 becomes +0 as in numpy
    for t in terms[1:]:
        total += t
    return total


def _codes(iscale, x, mn, nmax, exact):
    """clip(nearest_int(iscale * (x - mn)), 0, nmax), in place on one temporary."""
    t = torch.sub(x, mn).mul_(iscale)
    t = _rint(t) if exact else t.round_()
    return t.clamp_(0, nmax)


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """formats._make_qkx2_quants over x, w given transposed, [n, B] (the loops' index first) ->
    scale, -min [B], L [n, B] (float32 codes). L is not carried through the search: the winning
    step's (iscale, min) are, and L is recomputed from them at the end with the same operations
    (one pass instead of a `where` per step)."""
    mn = _minimum0(x.amin(dim=0))
    mx = x.amax(dim=0)
    wx = w * x
    sum_w, sum_x = _seq_sum(w[1:], w[0]), _seq_sum(wx[1:], wx[0])
    del wx
    flat = mx == mn
    rng = torch.where(flat, 1.0, mx - mn)
    # x finite and the largest iscale finite (a tiny range overflows it): 0 <= iscale * (x - mn) <=
    # nmax + 1 in every step, no int32 overflow to emulate in the loop
    top = _div(f(rmin) + f(rdelta) * f(nstep) + f(nmax), rng)
    exact = not bool(torch.isfinite(top).all() & torch.isfinite(x).all())
    iscale = _div(f(nmax), rng)
    scale = _div(f(1), iscale)
    best_iscale, best_mn = iscale, mn
    L = _codes(iscale, x, mn, nmax, exact)
    diff = (scale * L).add_(mn).sub_(x)
    best = _seq_sum(diff.mul_(diff).mul_(w))
    for step in range(nstep + 1):
        iscale = _div(f(rmin) + f(rdelta) * f(step) + f(nmax), rng)
        La = _codes(iscale, x, mn, nmax, exact)
        wl = w * La
        t = wl * La
        sl, sl2 = _seq_sum(wl), _seq_sum(t)
        sxl = _seq_sum(torch.mul(wl, x, out=t))
        del wl, t
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Dn = torch.where(ok, D, 1.0)
        this_scale = _div(sum_w * sxl - sum_x * sl, Dn)
        this_min = _div(sl2 * sum_x - sl * sxl, Dn)
        pos = this_min > 0
        this_scale = torch.where(pos, _div(sxl, sl2), this_scale)
        this_min = _where0(~pos, this_min)
        diff = La.mul_(this_scale).add_(this_min).sub_(x)   # this_scale * La + this_min - x
        mad = _seq_sum(diff.mul_(diff).mul_(w))
        del diff, La
        better = ok & (mad < best) & ~flat
        best_iscale = torch.where(better, iscale, best_iscale)
        best_mn = torch.where(better, mn, best_mn)          # the min this step's codes were made with
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = _where0(~flat, _codes(best_iscale, x, best_mn, nmax, exact))
    return _where0(~flat, scale), -mn, L


def _q4k_scale_min(sb):
    """The 12 scale bytes [B, 12] -> 6-bit sc, m [B, 8] (formats._q4k_scale_min)."""
    d, m, md = sb[:, 0:4], sb[:, 4:8], sb[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _quantize_q4_k(x):
    B = x.shape[0]
    xt = x.reshape(B * 8, 32).t().contiguous()  # [32, B*8]: sub-block index last
    sum_x2 = torch.zeros(B * 8, dtype=torch.float32, device=x.device)
    for i in range(32):
        sum_x2 = sum_x2 + xt[i] * xt[i]
    av_x = torch.sqrt(_div(sum_x2, f(32)))
    w = torch.abs(xt).add_(av_x)     # av_x + |x|
    scales, mins, L = _make_qkx2_quants(xt, w, 15, -1.0, 0.1, 20)
    del xt, w
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.t().reshape(B, 8, 32)
    max_scale = _maximum0(scales.amax(dim=1))
    max_min = _maximum0(mins.amax(dim=1))
    inv_scale = torch.where(max_scale > 0, _div(f(63), max_scale), 0.0)
    inv_min = torch.where(max_min > 0, _div(f(63), max_min), 0.0)
    ls = _u8(torch.clamp(_rint(inv_scale[:, None] * scales), max=63))
    lm = _u8(torch.clamp(_rint(inv_min[:, None] * mins), max=63))
    sb = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                    (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
    d16 = _div(max_scale, f(63)).to(torch.float16)
    dmin16 = _div(max_min, f(63)).to(torch.float16)
    sc, m = _q4k_scale_min(sb)
    d = d16.float()[:, None] * sc.float()
    dm = dmin16.float()[:, None] * m.float()
    Ln = torch.clamp(_rint(_div(x.reshape(B, 8, 32) + dm[..., None], d[..., None])), 0, 15)
    L = _u8(torch.where((d != 0)[..., None], Ln, L)).reshape(B, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(B, 128)
    return torch.cat([_f16_bytes(d16), _f16_bytes(dmin16), sb, qs], dim=1)


# ---------------------------------------------------------------- q6_k

def _make_qx_quants_rmse1(x, nmax):
    """formats._make_qx_quants_rmse1 over rows [B, n]: the scale (the codes are not needed)."""
    ax = torch.abs(x)
    imax = ax.argmax(dim=1, keepdim=True)  # the first maximal |x|, as numpy's argmax
    mx = torch.gather(x, 1, imax)[:, 0]
    zero = ax.amax(dim=1) < f(1e-15)
    del ax
    mxn = torch.where(zero, 1.0, mx)
    xt = x.t().contiguous()  # [n, B]
    w = xt * xt

    exact = not bool(torch.isfinite(x).all())  # finite x: |iscale * x| <= nmax + 1, no int32 overflow

    def sums(iscale):
        lf = iscale * xt
        lf = (_rint(lf) if exact else lf.round_()).clamp_(-nmax, nmax - 1)
        t = (w * xt).mul_(lf)
        slx = _seq_sum(t)
        return slx, _seq_sum(torch.mul(w, lf, out=t).mul_(lf))

    slx, sl2 = sums(_div(f(-nmax), mxn))
    scale = _where0(sl2 != 0, _div(slx, sl2))
    best = scale * slx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = sums(_div(-(f(nmax) + f(0.1) * f(step)), mxn))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, _div(slx, sl2), scale)
        best = torch.where(better, scale * slx, best)
    return _where0(~zero, scale)


def _quantize_q6_k(x):
    B = x.shape[0]
    scales = _make_qx_quants_rmse1(x.reshape(B * 16, 16), 32).reshape(B, 16)
    idx = torch.abs(scales).argmax(dim=1, keepdim=True)
    max_scale = torch.gather(scales, 1, idx)[:, 0]
    zero = torch.abs(max_scale) < f(1e-15)
    iscale = _where0(~zero, _div(f(-128), torch.where(zero, 1.0, max_scale)))
    d16 = _where0(~zero, _div(f(1), torch.where(zero, 1.0, iscale))).to(torch.float16)
    sc = _u8(torch.clamp(_rint(iscale[:, None] * scales), max=127)).view(torch.int8)
    d = d16.float()[:, None] * sc.float()
    l = torch.clamp(_rint(_div(x.reshape(B, 16, 16), d[..., None])), -32, 31) + 32
    # formats.py: ggml keeps make_qx_quants' L where d is 0; any value dequantizes the same; 32 there
    L = torch.where((d != 0)[..., None], l, 32.0).to(torch.uint8).reshape(B, 2, 4, 32)
    lo = L & 0x0F
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).reshape(B, 128)
    h = L >> 4
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(B, 64)
    out = torch.cat([ql, qh, sc.view(torch.uint8), _f16_bytes(d16)], dim=1)
    out[zero] = 0
    return out


_QUANT = {"bf16": _quantize_bf16, "q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0,
          "q4_k": _quantize_q4_k, "q6_k": _quantize_q6_k}


# ---------------------------------------------------------------- chunked driver

# q4_k peaked at 34 bytes per weight of a chunk on CUDA (1.14 GB for 32 M): margin for the allocator
_BYTES_PER_WEIGHT = 48
CPU_CHUNK_WEIGHTS = 1 << 20     # 2-core CI box: 1 M weights per chunk beat 256 K and 4 M (NOTES.md)
CUDA_CHUNK_WEIGHTS = 32 << 20   # H200: as fast as 128 M for q4_k (500 vs 504 M weights/s), faster for q6_k,
                                # q4_0, q8_0 (822 vs 618, 1487 vs 1101, 1598 vs 831); 1.1 GB peak for q4_k


def _chunk_weights(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_CHUNK_WEIGHTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(QK_K, min(CUDA_CHUNK_WEIGHTS, free // 2 // _BYTES_PER_WEIGHT))


def quantize_torch(x, fmt: str, *, device=None, chunk_weights: int | None = None) -> torch.Tensor:
    """x: [..., K] float tensor (or numpy array) -> uint8 [..., K / block_elems * block_bytes] on x's
    device, the bytes of `formats.quantize`; computed on `device` (default x's) in chunks of blocks."""
    spec = get_format(fmt)
    x = torch.as_tensor(x)
    if x.dim() == 0 or x.shape[-1] % spec.block_elems:
        raise ValueError(f"{fmt}: last dimension {tuple(x.shape)[-1:]} is not a multiple of {spec.block_elems}")
    device = torch.device(device) if device is not None else x.device
    rows = x.reshape(-1, spec.block_elems)
    out = torch.empty((rows.shape[0], spec.block_bytes), dtype=torch.uint8, device=x.device)
    per = max(1, (chunk_weights or _chunk_weights(device)) // spec.block_elems)
    with torch.no_grad():
        for i in range(0, rows.shape[0], per):
            xb = rows[i:i + per].to(device=device).to(torch.float32).contiguous()
            out[i:i + per] = _QUANT[fmt](xb).to(out.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU memory to the model's weights
    return out.reshape(*x.shape[:-1], x.shape[-1] // spec.block_elems * spec.block_bytes)


# ---------------------------------------------------------------- where experts are quantized

ENV = "HMOE_QUANT_DEVICE"


def quant_device(fmt: str) -> str:
    """Where `fmt` is quantized: $HMOE_QUANT_DEVICE (auto, numpy, cpu, cuda, cuda:N; default auto);
    auto is CUDA when present, else torch on the CPU: faster than numpy for every format on the 2-core
    CI box (2 threads, weights/s: q4_k 8.6 M vs 7.2 M, q6_k 17.5 vs 16.5, q4_0 216 vs 144, q8_0 350 vs 173)."""
    get_format(fmt)
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want in ("numpy", "cpu"):
        return want
    if want == "cuda" or (want.startswith("cuda:") and want[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"{ENV}={want}: no CUDA device is available here (use auto, cpu or numpy)")
        return want
    raise ValueError(f"{ENV}={want!r}: expected auto, numpy, cpu, cuda or cuda:N")


def quantize(x, fmt: str, where: str | None = None) -> np.ndarray:
    """formats.quantize's bytes (numpy uint8) from a numpy array or a CPU tensor, computed where
    `quant_device(fmt)` says (or `where`)."""
    where = where or quant_device(fmt)
    if where == "numpy":
        if isinstance(x, torch.Tensor):
            x = x.detach().to(torch.float32).numpy()
        return quantize_numpy(x, fmt)
    x = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if x.device.type != "cpu":
        raise ValueError(f"quantize takes CPU weights, got a tensor on {x.device}")
    return quantize_torch(x, fmt, device=where).numpy()
