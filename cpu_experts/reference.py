"""Plain numpy MoE (fp32, dequantized weights): what the native op must reproduce."""
import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def moe_reference(x, ids, weights, gate, up, down):
    """x: [T, H], ids/weights: [T, k], gate/up: [E, I, H], down: [E, H, I] -> [T, H] (float64 math)."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        xe = x[t]
        h = silu(xe @ gate[e].T.astype(np.float64)) * (xe @ up[e].T.astype(np.float64))
        np.add.at(out, t, weights[t, j][:, None] * (h @ down[e].T.astype(np.float64)))
    return out
