"""Storage formats a rule can ask for, and how many bytes a weight takes in each.

Block formats are ggml's (`block_q8_0` 34 bytes per 32 weights, `block_q4_0` 18/32, `block_q4_K`
144/256, `block_q6_K` 210/256), taken from `cpu_experts.formats`, the kernels' own table; a
block never spans two rows, so a row's length must be a multiple of the block. fp8 is DeepSeek's
e4m3 with one fp32 scale per 128x128 block (`weight_scale_inv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpu_experts.formats import FORMATS as BLOCK_FORMATS

FP8_BLOCK = 128


@dataclass(frozen=True)
class Format:
    name: str
    block_elems: int  # weights per block (1 for plain dtypes)
    block_bytes: int  # bytes per block
    is_float: bool  # a plain torch dtype that also holds vectors (norms, biases)

    def matrix_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a weight [..., N, K] (rows of K); K must be a multiple of block_elems."""
        *lead, n, k = shape
        assert k % self.block_elems == 0, (self.name, shape)
        count = math.prod(lead)
        data = count * n * (k // self.block_elems) * self.block_bytes
        if self.name == "fp8":
            data += count * math.ceil(n / FP8_BLOCK) * math.ceil(k / FP8_BLOCK) * 4
        return data


FORMATS = {
    "fp32": Format("fp32", 1, 4, True),
    "bf16": Format("bf16", 1, 2, True),
    "fp16": Format("fp16", 1, 2, True),
    "fp8": Format("fp8", 1, 1, False),
    # the block formats' sizes come from the kernels' own table
    **{name: Format(name, f.block_elems, f.block_bytes, False) for name, f in BLOCK_FORMATS.items() if name != "bf16"},
}

# llama.cpp's rule for k-quant rows that do not fill 256-weight blocks: another format for that
# tensor (its Q4_K -> Q5_0, Q6_K -> Q8_0). Only DeepSeek-V2-Lite's routed down_proj (rows of 1408)
# meets it; we have no q5_0 kernels, so q4_k falls back to q4_0 (same 4.5 bits per weight).
K_QUANT_FALLBACK = {"q4_k": "q4_0", "q6_k": "q8_0"}


def row_fallback(fmt: str, row: int) -> str | None:
    """The format a `fmt` tensor with rows of `row` weights is stored in instead, or None."""
    fallback = K_QUANT_FALLBACK.get(fmt)
    return fallback if fallback and row % FORMATS[fmt].block_elems and fits_rows(fallback, row) else None


# Cache dtypes for the latent cache: bytes per value (fp8 adds one fp32 scale per 128 values).
CACHE_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def cache_bytes_per_token(cfg, dtype: str) -> int:
    """Bytes one token takes in one attention layer's caches, as gpu_attention stores them: the
    latent (576 values for DeepSeek; fp8 with its scales) and, for V3.2, the indexer keys."""
    from gpu_attention.latent_cache import bytes_per_token

    n = bytes_per_token(cfg.latent_dim, dtype)
    return n + (bytes_per_token(cfg.index_head_dim, dtype) if cfg.has_indexer else 0)

# config.json's torch_dtype -> our name; what `dtype: auto` means (FP8 checkpoints load as bf16).
CHECKPOINT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Most to least precise: the order tune tries for routed experts on the CPU.
PRECISION_ORDER = ("bf16", "q8_0", "q6_k", "q4_k", "q4_0")


def auto_format(torch_dtype: str) -> str:
    return CHECKPOINT_DTYPES.get(torch_dtype, "bf16")


def jit_bytes_per_weight(fmt: str) -> float:
    """Bytes per weight in cpu_experts' repacked layout (what the `jit` op allocates): GGUF's for
    bf16/q8_0/q4_0, more for q4_k (f16 scale and min per 32) and q6_k (one code per byte)."""
    from cpu_experts.layout import geometry, repacked_bytes_per_weight

    return repacked_bytes_per_weight(geometry(fmt, 64))  # the same on every ISA


def fits_rows(fmt: str, k: int) -> bool:
    return k % FORMATS[fmt].block_elems == 0
