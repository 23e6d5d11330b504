"""GGUF-identical weight formats: quantize from fp32 and dequantize to fp32 (numpy, vectorised).

Blocks are byte-for-byte the ggml layouts (`block_q8_0`, `block_q4_0`, `block_q4_K`, `block_q6_K`;
bf16 is ggml's round-to-nearest-even with quiet NaNs), so a GGUF loader can hand its bytes over
unchanged. A quantized matrix [N, K] is a uint8 array [N, K / block_elems * block_bytes].
The k-quant quantizers follow llama.cpp's `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`
step by step in float32 (sequential sums, nearest_int = round-half-even) so the bytes match.
"""
from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class Format:
    name: str
    block_elems: int   # weights per block
    block_bytes: int   # bytes per block

    def row_bytes(self, k: int) -> int:
        assert k % self.block_elems == 0
        return k // self.block_elems * self.block_bytes


FORMATS = {
    "bf16": Format("bf16", 1, 2),
    "q8_0": Format("q8_0", 32, 34),
    "q4_0": Format("q4_0", 32, 18),
    "q4_k": Format("q4_k", QK_K, 144),
    "q6_k": Format("q6_k", QK_K, 210),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _nearest_int(x: np.ndarray) -> np.ndarray:
    # ggml's nearest_int (add 1.5*2^23) rounds half to even, as np.rint does for |x| < 2^22
    return np.rint(x).astype(np.int32)


def _roundf_away(x: np.ndarray) -> np.ndarray:
    # ggml's roundf: half away from zero
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).view(np.uint8).reshape(d.shape[0], 2)


# ---------------------------------------------------------------- bf16

def _quantize_bf16(x):
    n = x.view(np.uint32).astype(np.uint64)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8).reshape(x.shape[0], -1)


def _dequantize_bf16(b):
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- q8_0: d f16, qs int8[32]

def _quantize_q8_0(x):
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    qs = _roundf_away(x * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d[:, 0]), qs], axis=1)


def _dequantize_q8_0(b):
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return b[:, 2:].view(np.int8).astype(np.float32) * d


# ---------------------------------------------------------------- q4_0: d f16, qs[16] (lo = 0..15, hi = 16..31)

def _quantize_q4_0(x):
    imax = np.abs(x).argmax(axis=1)[:, None]
    d = np.take_along_axis(x, imax, axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.float32).astype(np.uint8).clip(0, 15)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([_f16_bytes(d[:, 0]), qs], axis=1)


def _dequantize_q4_0(b):
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


# ---------------------------------------------------------------- q4_k: d, dmin f16, scales[12], qs[128]

def _seq_sum(terms, total=None):
    """total (default 0) + terms[0] + terms[1] + ... in index order, in float32, as ggml's `for`
    loops add (np.sum pairs terms up and rounds differently; np.cumsum is exact but 10x slower)."""
    total = np.zeros_like(terms[0]) if total is None else total
    for t in terms:
        total += t
    return total


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """llama.cpp make_qkx2_quants (use_mad=false) over rows of x [B, n]. Returns scale, -min, L."""
    f = np.float32
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)  # [n, B]: the loops' index first
    mn = np.minimum(x.min(axis=0), f(0))
    mx = x.max(axis=0)
    wx = w * x
    sum_w, sum_x = _seq_sum(w[1:], w[0].copy()), _seq_sum(wx[1:], wx[0].copy())
    flat = mx == mn
    rng = np.where(flat, f(1), mx - mn)
    iscale = f(nmax) / rng
    scale = f(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale * L.astype(f) + mn - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / rng
        La = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        Lf = La.astype(f)
        wl = w * Lf
        sl, sl2, sxl = _seq_sum(wl), _seq_sum(wl * Lf), _seq_sum(wl * x)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Dn = np.where(ok, D, f(1))
        this_scale = (sum_w * sxl - sum_x * sl) / Dn
        this_min = (sl2 * sum_x - sl * sxl) / Dn
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sxl / sl2, this_scale)
        this_min = np.where(pos, f(0), this_min)
        diff = this_scale * Lf + this_min - x
        mad = _seq_sum(w * (diff * diff))
        better = ok & (mad < best) & ~flat
        L = np.where(better, La, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, f(0), scale)
    L = np.where(flat, 0, L)
    return scale.astype(f), (-mn).astype(f), np.ascontiguousarray(L.T)


def _q4k_scale_min(scales):
    """Unpack the 12 scale bytes [B, 12] into 6-bit sc, m [B, 8] (ggml get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _quantize_q4_k(x):
    f = np.float32
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    sum_x2 = np.zeros(B * 8, f)
    for i in range(32):
        sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
    av_x = np.sqrt(sum_x2 / f(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f(0))
    max_min = np.maximum(mins.max(axis=1), f(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f(63) / max_scale, f(0))
        inv_min = np.where(max_min > 0, f(63) / max_min, f(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    sb = np.zeros((B, 12), np.uint8)
    sb[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sb[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sb[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d16 = (max_scale / f(63)).astype(np.float16)
    dmin16 = (max_min / f(63)).astype(np.float16)
    sc, m = _q4k_scale_min(sb)
    d = d16.astype(f)[:, None] * sc.astype(f)
    dm = dmin16.astype(f)[:, None] * m.astype(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_nearest_int((x.reshape(B, 8, 32) + dm[..., None]) / d[..., None]), 0, 15)
    L = np.where((d != 0)[..., None], Ln, L).astype(np.uint8).reshape(B, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(B, 128)
    return np.concatenate([d16.view(np.uint8).reshape(B, 2), dmin16.view(np.uint8).reshape(B, 2), sb, qs],
                          axis=1)


def _dequantize_q4_k(b):
    B = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = _q4k_scale_min(b[:, 4:16])
    scale = (d * sc.astype(np.float32))[..., None]
    mins = (dmin * m.astype(np.float32))[..., None]
    qs = b[:, 16:].reshape(B, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(B, 8, 32).astype(np.float32)
    return (scale * q - mins).reshape(B, QK_K)


# ---------------------------------------------------------------- q6_k: ql[128], qh[64], scales int8[16], d f16

def _make_qx_quants_rmse1(x, nmax):
    """llama.cpp make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over rows [B, n]: the scale."""
    f = np.float32
    B = x.shape[0]
    ax = np.abs(x)
    imax = np.argmax(ax, axis=1)  # first maximal |x|, as the strict '>' scan
    mx = x[np.arange(B), imax]
    zero = ax.max(axis=1) < f(1e-15)
    mxn = np.where(zero, f(1), mx)
    xt = np.ascontiguousarray(x.T)  # [n, B]: column i is contiguous
    w = xt * xt

    def sums(iscale):
        lf = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1).astype(f)
        return _seq_sum(w * xt * lf), _seq_sum(w * lf * lf)

    slx, sl2 = sums(f(-nmax) / mxn)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sl2 != 0, slx / sl2, f(0))
    best = scale * slx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = sums(-(f(nmax) + f(0.1) * f(step)) / mxn)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = slx / sl2
        scale = np.where(better, new, scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, f(0), scale)
    L = np.clip(_nearest_int((f(-nmax) / mxn)[:, None] * x), -nmax, nmax - 1) + nmax
    # L of the last accepted step is what ggml keeps where the block scale rounds to 0
    return scale.astype(f), L


def _quantize_q6_k(x):
    f = np.float32
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    scales, _ = _make_qx_quants_rmse1(xs, 32)
    scales = scales.reshape(B, 16)
    idx = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(B), idx]
    zero = np.abs(max_scale) < f(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, f(0), f(-128) / np.where(zero, f(1), max_scale))
        d16 = np.where(zero, f(0), f(1) / np.where(zero, f(1), iscale)).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = d16.astype(f)[:, None] * sc.astype(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(_nearest_int(x.reshape(B, 16, 16) / d[..., None]), -32, 31) + 32
    # ggml skips blocks whose d is 0 and keeps make_qx_quants' L there; that L only matters
    # through d = 0, so any value dequantizes identically. Use 32 (zero) as the neutral code.
    L = np.where((d != 0)[..., None], l, 32).astype(np.uint8).reshape(B, 2, 4, 32)
    lo = L & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(B, 128)
    h = L >> 4
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(B, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(B, 2)], axis=1)
    out[zero] = 0
    return out


def q6k_codes(b):
    """q6_k blocks [B, 210] -> (6-bit codes uint8 [B, 256], int8 scales [B, 16], d f32 [B])."""
    B = b.shape[0]
    ql = b[:, :128].reshape(B, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(B, 2, 4, 32)
    qh = b[:, 128:192].reshape(B, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ql | ((qh & 0x03) << 4)
    sc = b[:, 192:208].view(np.int8)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    return q.reshape(B, QK_K), sc, d


def _dequantize_q6_k(b):
    q, sc, d = q6k_codes(b)
    B = b.shape[0]
    scale = (d[:, None] * sc.astype(np.float32))[..., None]
    return (scale * (q.astype(np.int8) - np.int8(32)).reshape(B, 16, 16).astype(np.float32)).reshape(B, QK_K)


def q4k_factors(b):
    """q4_k blocks [B, 144] -> (d f16 [B], dmin f16 [B], 6-bit sc uint8 [B, 8], 6-bit m uint8 [B, 8]):
    sub-block j's weights are d*sc[j] * code - dmin*m[j]."""
    d = b[:, 0:2].copy().view(np.float16).reshape(-1)
    dmin = b[:, 2:4].copy().view(np.float16).reshape(-1)
    sc, m = _q4k_scale_min(b[:, 4:16])
    return d, dmin, sc, m


def q4k_codes(b):
    """q4_k blocks [B, 144] -> (4-bit codes uint8 [B, 256], scale f32 [B, 8], min f32 [B, 8])."""
    B = b.shape[0]
    d, dmin, sc, m = q4k_factors(b)
    qs = b[:, 16:].reshape(B, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return ((qs & 0x0F).reshape(B, QK_K), d.astype(np.float32)[:, None] * sc.astype(np.float32),
            dmin.astype(np.float32)[:, None] * m.astype(np.float32))


_QUANT = {"bf16": _quantize_bf16, "q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0,
          "q4_k": _quantize_q4_k, "q6_k": _quantize_q6_k}
_DEQUANT = {"bf16": _dequantize_bf16, "q8_0": _dequantize_q8_0, "q4_0": _dequantize_q4_0,
            "q4_k": _dequantize_q4_k, "q6_k": _dequantize_q6_k}


_CHUNK = 1024  # blocks per call of a block quantizer


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """x: [..., K] float -> uint8 [..., K / block_elems * block_bytes] in the GGUF block layout."""
    spec = get_format(fmt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % spec.block_elems:
        raise ValueError(f"{fmt}: last dimension {x.shape[-1]} is not a multiple of {spec.block_elems}")
    rows = x.reshape(-1, spec.block_elems)
    # blocks are independent: chunks that stay in L2 make the k-quants' column sweeps ~10x faster
    blocks = np.concatenate([_QUANT[fmt](rows[i:i + _CHUNK]) for i in range(0, len(rows), _CHUNK)]) \
        if len(rows) > _CHUNK else _QUANT[fmt](rows)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // spec.block_elems * spec.block_bytes)


def dequantize(q: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 [..., nbytes] GGUF blocks -> float32 [..., K]."""
    spec = get_format(fmt)
    q = np.ascontiguousarray(q).view(np.uint8)
    if q.shape[-1] % spec.block_bytes:
        raise ValueError(f"{fmt}: last dimension {q.shape[-1]} bytes is not a multiple of {spec.block_bytes}")
    vals = _DEQUANT[fmt](q.reshape(-1, spec.block_bytes))
    return vals.reshape(*q.shape[:-1], q.shape[-1] // spec.block_bytes * spec.block_elems)
