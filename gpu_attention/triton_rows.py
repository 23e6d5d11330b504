"""What the absorbed decode kernels (triton_decode's generic one, triton_decode_tma's two) share:
which query rows a program owns and which keys its split reads."""

import triton
import triton.language as tl


@triton.jit
def split_rows(SEQ_LENS, b, hb, split, num_heads, num_new, split_len, BLOCK_H: tl.constexpr):
    """A program's query rows (head block hb of sequence b; row = new token x heads + head), which of
    them exist, the last key position each may see, and its split's key range [lo, hi): shared by
    the generic and the TMA decode kernels."""
    num_rows = num_new * num_heads
    rows = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < num_rows
    kv_len = tl.load(SEQ_LENS + b)
    q_pos = kv_len - num_new + rows // num_heads  # last key position each row may see
    last_row = tl.minimum(hb * BLOCK_H + BLOCK_H, num_rows) - 1
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len - num_new + last_row // num_heads + 1)
    return rows, row_ok, q_pos, lo, hi
