"""One Triton kernel that unpacks cpu_experts' repacked block formats (q8_0, q4_0, q4_k, q6_k) on the GPU.

The torch version (gpu_dequant.py) makes ~8 passes over fp32 temporaries: 240 ms per V3 q4_k layer
on an H100, twice the layer's PCIe copy. Here each output weight is computed once from its
payload byte and its block's factors (f16 scale and bias; q4_k: an f16 per super-block times a byte
per block, read once per block): reads ~0.6 B and writes 2 B per weight. Same math and layout as
gpu_dequant.dequantize_packed (the reference in tests); one program per BLOCK_SIZE output weights
as [BLOCK_SIZE/32 blocks, 32], in output order (coalesced writes; the reads gather within a block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpu_experts.layout import BLOCK, Geometry

BLOCK_SIZE = 1024


@triton.jit
def _dequant_kernel(pay_ptr, sc_ptr, bias_ptr, out_ptr, total, n, k, pay_e, sc_e,
                    R: tl.constexpr, NIBBLES: tl.constexpr, SIGNED: tl.constexpr, OFFSET: tl.constexpr,
                    SG: tl.constexpr, HAS_BIAS: tl.constexpr, SUPERBLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # [BLOCKS, 32]: BLOCKS whole 32-weight blocks of the output (k is a multiple of 32), in output order
    BLOCKS: tl.constexpr = BLOCK_SIZE // 32
    bidx = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)   # block of the flat [E, n, k]
    w = tl.arange(0, 32)[None, :]                                          # weight within its block
    idx = bidx[:, None] * 32 + w
    bmask = bidx < total // 32
    mask = bmask[:, None]
    nb = k // 32
    blk = bidx % nb
    t = bidx // nb
    row = t % n
    e = t // n
    g = row // R
    r = row % R
    group = (g * nb + blk)[:, None]  # [grp][blk] of this weight's row group and 32-weight block
    r2, e2 = r[:, None], e[:, None]
    if NIBBLES:  # [quad 0..3][R][4]: low nibble weight 4q+j, high nibble 16+4q+j
        low = w % 16
        off = e2 * pay_e + (group * 4 + low // 4) * (R * 4) + r2 * 4 + low % 4
        p = tl.load(pay_ptr + off, mask=mask, other=0).to(tl.int32)
        code = (p >> ((w // 16) * 4)) & 15
    else:  # [quad 0..7][R][4]: byte j of quad q is weight 4q+j
        off = e2 * pay_e + (group * 8 + w // 4) * (R * 4) + r2 * 4 + w % 4
        p = tl.load(pay_ptr + off, mask=mask, other=0)
        if SIGNED:
            code = p.to(tl.int8, bitcast=True).to(tl.int32)
        else:
            code = p.to(tl.int32)
    if SUPERBLOCK:  # bytes: [grp][blk/8] of [R] f16, then [8][R] u8; one factor pair per block
        unit = e * sc_e + (g * (nb // 8) + blk // 8) * (10 * R)
        f16 = unit + 2 * r
        u8 = unit + 2 * R + (blk % 8) * R + r
        scale = _f16_at(sc_ptr, f16, bmask) * tl.load(sc_ptr + u8, mask=bmask, other=0).to(tl.float32)
        value = scale[:, None] * code.to(tl.float32)
        if HAS_BIAS:
            shift = _f16_at(bias_ptr, f16, bmask) * tl.load(bias_ptr + u8, mask=bmask, other=0).to(tl.float32)
            value += shift[:, None]
    else:
        sidx = e2 * sc_e + (group * (32 // SG) + w // SG) * R + r2  # [grp][blk][spb][R] f16
        sc16 = sc_ptr.to(tl.pointer_type(tl.float16))
        value = tl.load(sc16 + sidx, mask=mask, other=0.0).to(tl.float32) * (code - OFFSET).to(tl.float32)
        if HAS_BIAS:
            value += tl.load(bias_ptr.to(tl.pointer_type(tl.float16)) + sidx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _f16_at(ptr, byte, mask):
    """The f16 at byte offset `byte` (even) of a uint8 tensor, as fp32."""
    return tl.load((ptr + byte).to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


def dequantize_packed(payload: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *, geo: Geometry,
                      n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """As gpu_dequant.dequantize_packed, for the block formats, on CUDA tensors."""
    assert geo.fmt != "bf16" and k % BLOCK == 0
    E = payload.shape[0]
    out = torch.empty(E, n, k, dtype=dtype, device=payload.device)
    scales = scale.reshape(E, -1)   # bytes: the kernel reads f16 (and q4_k's u8) through typed pointers
    biases = bias.reshape(E, -1) if bias is not None else scales
    total = E * n * k
    # sc_e counts the unit the kernel indexes: bytes for q4_k's super-blocks, f16 elements otherwise
    sc_e = scales.shape[1] if geo.superblock else scales.shape[1] // 2
    _dequant_kernel[(triton.cdiv(total, BLOCK_SIZE),)](
        payload, scales, biases, out, total, n, k, payload.shape[1], sc_e,
        R=geo.group_rows, NIBBLES=geo.nibbles, SIGNED=geo.signed, OFFSET=geo.offset, SG=geo.scale_group,
        HAS_BIAS=bias is not None, SUPERBLOCK=geo.superblock, BLOCK_SIZE=BLOCK_SIZE)
    return out
