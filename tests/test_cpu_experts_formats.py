"""GGUF block formats: bytes identical to gguf.quants.quantize, values identical to dequantize."""
import numpy as np
import pytest

from cpu_experts import formats, layout

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QTYPE = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K}


def weights(seed=0, rows=48, cols=512):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 4, (rows, 1))).astype(np.float32)
    x[1, :256] = 0.0          # all-zero blocks
    x[2, :256] = 0.75         # constant blocks
    x[3, 5] = 40.0            # an outlier
    x[4, :32] = -1e-20        # tiny values
    return x


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0"])
def test_quantize_bytes_match_gguf(fmt):
    x = weights()
    ours = formats.quantize(x, fmt)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, QTYPE[fmt]))


@pytest.mark.parametrize("fmt", list(QTYPE))
def test_dequantize_values_match_gguf(fmt):
    x = weights(1)
    blocks = formats.quantize(x, fmt)
    np.testing.assert_array_equal(formats.dequantize(blocks, fmt), gguf.quants.dequantize(blocks, QTYPE[fmt]))


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_dequantize_random_blocks_match_gguf(fmt):
    spec = formats.get_format(fmt)
    rng = np.random.default_rng(2)
    b = rng.integers(0, 256, (64, spec.block_bytes), dtype=np.uint8)
    f16 = lambda v: np.array([v], np.float16).view(np.uint8)
    if fmt == "q4_k":
        b[:, 0:2], b[:, 2:4] = f16(0.01), f16(0.02)
    else:
        b[:, 208:210] = f16(0.01)
    np.testing.assert_array_equal(formats.dequantize(b, fmt), gguf.quants.dequantize(b, QTYPE[fmt]))


@pytest.mark.parametrize("fmt,rel_rms", [("q8_0", 0.006), ("q4_0", 0.11), ("q4_k", 0.09), ("q6_k", 0.025)])
def test_k_quant_round_trip_error(fmt, rel_rms):
    # gguf implements no k-quant quantizer; ours follows llama.cpp's *_ref and must at least reach
    # the error a 4/6/8-bit grid gives on Gaussian weights
    x = np.random.default_rng(3).standard_normal((32, 512)).astype(np.float32)
    err = formats.dequantize(formats.quantize(x, fmt), fmt) - x
    assert np.sqrt((err ** 2).mean()) < rel_rms


def test_unknown_format_and_bad_shape_errors():
    with pytest.raises(ValueError, match="unknown weight format 'q5_x'"):
        formats.quantize(np.zeros((1, 32), np.float32), "q5_x")
    with pytest.raises(ValueError, match="not a multiple of 256"):
        formats.quantize(np.zeros((1, 32), np.float32), "q4_k")


@pytest.mark.parametrize("fmt", list(QTYPE) + ["q4_k-f16"])
@pytest.mark.parametrize("vb,vnni", [(32, False), (64, False), (64, True)])
def test_repack_keeps_every_weight(fmt, vb, vnni):
    """Undo the repack in numpy (independently of the kernels) and compare with GGUF dequantization.
    q4_k-f16: q4_k with its factors as f16 per 32 weights (the layout before session 9)."""
    n, k = 16, 512
    x = weights(4, n, k)
    f16_form = fmt.endswith("-f16")
    fmt = fmt.split("-")[0]
    blocks = formats.quantize(x, fmt)
    geo = layout.geometry(fmt, vb, vnni, superblock=not f16_form)
    p = layout.repack(blocks, fmt, n, k, geo)
    R = geo.group_rows
    ref = formats.dequantize(blocks, fmt)
    if fmt == "bf16":
        ce = geo.k_align
        pay = p["payload"].view(np.uint16).reshape(n // R, k // ce, R, ce).transpose(0, 2, 1, 3)
        got = (pay.reshape(n, k).astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got, ref)
        return
    nb = k // 32
    quads = 4 if geo.nibbles else 8
    pay = p["payload"].reshape(n // R, nb, quads, R, 4).transpose(0, 3, 1, 2, 4).reshape(n, nb, quads * 4)
    if geo.nibbles:
        codes = np.concatenate([pay & 0x0F, pay >> 4], axis=2).astype(np.float32)
    elif geo.signed:
        codes = pay.view(np.int8).astype(np.float32)
    else:
        codes = pay.astype(np.float32)
    codes = codes.reshape(n, k) - geo.offset
    spb = geo.scales_per_block

    def unil(a):   # a scale stream -> [n, k / SG] f32
        if geo.superblock:   # [grp][super-block] of [R] f16, then [8][R] u8
            u = a.reshape(n // R, nb // 8, 10 * R)
            f = np.ascontiguousarray(u[..., :2 * R]).view(np.float16).astype(np.float32)      # [grp][sb][R]
            q = u[..., 2 * R:].reshape(n // R, nb // 8, 8, R).astype(np.float32)
            return (f[:, :, None, :] * q).transpose(0, 3, 1, 2).reshape(n, nb)
        return a.reshape(n // R, nb, spb, R).transpose(0, 3, 1, 2).reshape(n, -1).astype(np.float32)
    got = np.repeat(unil(p["scale"]), geo.scale_group, axis=1) * codes
    if geo.bias:
        got += np.repeat(unil(p["bias"]), geo.scale_group, axis=1)
    # q6_k and q4_k's f16 form keep d*sc (and dmin*m) as f16 (relative 2^-11); the others are exact
    tol = 2.0 ** -10 * np.abs(ref).max() if f16_form or fmt == "q6_k" else 0.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    if geo.superblock:
        assert layout.repacked_bytes_per_weight(geo) == 148 / 256   # 0.578: GGUF's 0.5625 + 4 bytes per 256


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "q6_k"])
def test_blocks_do_not_depend_on_the_rows_quantized_with_them(fmt):
    """quantize works through large inputs in chunks of blocks: every block's bytes must be what
    quantizing its own row alone gives (flat, zero and ordinary blocks, chunk edges included)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 256 * 130)).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 256:512] = 1.5
    whole = formats.quantize(x, fmt)
    assert len(x) * x.shape[1] // formats.get_format(fmt).block_elems > formats._CHUNK
    for r in (0, 1, 2, 8):
        np.testing.assert_array_equal(whole[r], formats.quantize(x[r:r + 1], fmt)[0])
