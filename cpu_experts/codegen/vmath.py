"""Vector float math in plain IR (LLVM has no vector exp without a vector libm): exp and SiLU.

exp is Cephes' expf: x = n*ln2 + r with n = round(x*log2(e)) and ln2 split in two parts, a degree-5
polynomial in r, and 2^n put in the exponent bits. x is clamped to [-87.3, 88.3] so that n stays in
[-126, 127] (normal floats, no overflow to inf); relative error ~1e-7, like libm's expf.
"""
from llvmlite import ir

from .irutil import F32, I32, c, fma, intrinsic, splat, vec

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _call(b, name, x, *rest):
    t = x.type
    fn = intrinsic(b.module, f"llvm.{name}.v{t.count}f32", t, [t] * (1 + len(rest)))
    return b.call(fn, [x, *rest])


def exp(b, x):
    """e^x for a <n x float> vector."""
    n = x.type.count
    k = lambda v: splat(F32, n, v)  # noqa: E731
    x = _call(b, "minnum", _call(b, "maxnum", x, k(-87.3)), k(88.3))
    nf = _call(b, "roundeven", b.fmul(x, k(_LOG2E)))
    r = fma(b, nf, k(-_LN2_HI), x)
    r = fma(b, nf, k(-_LN2_LO), r)
    p = k(_POLY[0])
    for coef in _POLY[1:]:
        p = fma(b, p, r, k(coef))
    y = fma(b, p, b.fmul(r, r), b.fadd(r, k(1.0)))
    ni = b.fptosi(nf, vec(I32, n))
    scale = b.bitcast(b.shl(b.add(ni, splat(I32, n, 127)), splat(I32, n, 23)), x.type)
    return b.fmul(y, scale)


def silu(b, g):
    """g * sigmoid(g) = g / (1 + e^-g), elementwise."""
    n = g.type.count
    e = exp(b, b.fsub(splat(F32, n, 0.0), g))
    return b.fdiv(g, b.fadd(splat(F32, n, 1.0), e))


def splat_scalar(b, x, n):
    """<n x T> with every lane = scalar x."""
    v = b.insert_element(ir.Constant(vec(x.type, 1), ir.Undefined), x, c(I32, 0))
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))
