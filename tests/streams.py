"""Synthetic scale and bias streams of one row group in either form of cpu_experts/layout.py, for the
tests that call a kernel alone (dotprof, amxprof)."""
import numpy as np


def scale_streams(geo, nb: int, rng):
    """(scale bytes, bias bytes, scale values, bias values) for nb 32-weight blocks of one row group;
    values as float64 [nb, scales per block, R], so that w = scale * (code - offset) + bias."""
    R, spb = geo.group_rows, geo.scales_per_block
    if geo.superblock:   # per super-block [R] f16 then [8][R] 6-bit bytes: factor = f16 * byte
        def stream(lo, hi):
            f = rng.uniform(lo, hi, (nb // 8, R)).astype(np.float16)
            u = rng.integers(0, 64, (nb // 8, 8, R), dtype=np.uint8)
            raw = np.concatenate([f.view(np.uint8).reshape(nb // 8, -1), u.reshape(nb // 8, -1)], axis=1)
            return raw.reshape(-1), (f.astype(np.float64)[:, None, :] * u).reshape(nb, 1, R)
        (sc, scv), (bias, biasv) = stream(0.0002, 0.0003), stream(-0.002, 0.0)
        return sc, bias, scv, biasv
    sc = rng.uniform(0.01, 0.02, (nb, spb, R)).astype(np.float16)
    bias = rng.uniform(-0.1, 0.1, (nb, spb, R)).astype(np.float16)
    raw = [x.view(np.uint8).reshape(-1) for x in (sc, bias)]
    return raw[0], raw[1], sc.astype(np.float64), bias.astype(np.float64)
