"""AMX tile registers for the kernels in amx.py / amx_bf16.py / amx_i8row.py: the real instructions, or the same
operations emulated in plain IR over 8 KiB of stack "tile registers" (tests on hosts without AMX).

Tile roles (8 tiles, no renaming in hardware): C00 C01 C10 C11 = weight group {0,1} x slot half
{0,1}; A0 A1 = two 16-slot activation tiles; B0 B1 = one block of weight group 0 and 1.
"""
from llvmlite import ir

from ..layout import BLOCK
from .irutil import F32, I1, I8, I16, I32, I64, PTR, VOID, c, define, for_range, gep, i64, intrinsic, local, prefetch, \
    splat, store, vec

C_TILE = {(m, h): 2 * m + h for m in range(2) for h in range(2)}
A_TILE = (4, 5)
B_TILE = (6, 7)
# tile -> (rows, bytes per row): int8 = tdpbsud over one 32-weight block; bf16 = tdpbf16ps over
# 32 bf16 (A: 16 slots x 32, B: 16 pair rows x 16 columns x 2); i8row = tdpbssd over 64 int8
# (A: 16 slots x 64, B: 16 quad rows x 16 columns x 4)
SHAPES = {
    "int8": {**{t: (16, 64) for t in C_TILE.values()}, **{t: (16, BLOCK) for t in A_TILE},
             **{t: (BLOCK // 4, 64) for t in B_TILE}},
    "bf16": {t: (16, 64) for t in range(8)},
    "i8row": {t: (16, 64) for t in range(8)},
}
_DP = {"int8": "llvm.x86.tdpbsud", "bf16": "llvm.x86.tdpbf16ps", "i8row": "llvm.x86.tdpbssd"}


def make_tiles(b, mode: str, emulate: bool):
    return (_EmuTiles if emulate else _HwTiles)(b, mode)


def chunk_step(b, tiles, bstep, a0, lda, two, chunk):
    """One K step of a 32-slot chunk (amx_bf16.py, amx_i8row.py): B0, B1 from the 2 KiB at bstep
    (mat 0, mat 1), A0 (and A1 when `two`: slots 16-31) from a0 with row stride lda, 4 (or 2)
    products into C; the activation rows' line 8 steps ahead prefetched."""
    for mat in range(2):
        tiles.load(B_TILE[mat], gep(b, bstep, mat * 1024), i64(64))
    p = gep(b, a0, 8 * 64)
    for _ in range(chunk if two else 16):
        prefetch(b, p)
        p = gep(b, p, lda)
    tiles.load(A_TILE[0], a0, lda)
    for mat in range(2):
        tiles.dp(C_TILE[mat, 0], A_TILE[0], B_TILE[mat])
    if two:
        tiles.load(A_TILE[1], gep(b, a0, b.mul(lda, i64(16))), lda)
        for mat in range(2):
            tiles.dp(C_TILE[mat, 1], A_TILE[1], B_TILE[mat])


class _HwTiles:
    def __init__(self, b, mode):
        m = b.module
        self.b, self.shapes = b, SHAPES[mode]
        self._cfg = intrinsic(m, "llvm.x86.ldtilecfg", VOID, [PTR])
        self._release = intrinsic(m, "llvm.x86.tilerelease", VOID, [])
        self._zero = intrinsic(m, "llvm.x86.tilezero", VOID, [I8])
        self._load = intrinsic(m, "llvm.x86.tileloadd64", VOID, [I8, PTR, I64])
        self._store = intrinsic(m, "llvm.x86.tilestored64", VOID, [I8, PTR, I64])
        self._dp = intrinsic(m, _DP[mode], VOID, [I8, I8, I8])

    def configure(self):
        """64-byte palette-1 config: bytes per row at 16 + 2t, rows at 48 + t."""
        b = self.b
        cfg = local(b, ir.ArrayType(I8, 64), name="tilecfg")
        cfg.align = 64
        b.store(ir.Constant(ir.ArrayType(I8, 64), [0] * 64), cfg)
        store(b, c(I8, 1), gep(b, cfg, 0))
        for tile, (rows, colsb) in self.shapes.items():
            store(b, c(I16, colsb), gep(b, cfg, 16 + 2 * tile))
            store(b, c(I8, rows), gep(b, cfg, 48 + tile))
        b.call(self._cfg, [cfg])

    def release(self):
        self.b.call(self._release, [])

    def zero(self, t):
        self.b.call(self._zero, [c(I8, t)])

    def load(self, t, ptr, stride):
        self.b.call(self._load, [c(I8, t), ptr, stride])

    def store(self, t, ptr, stride):
        self.b.call(self._store, [c(I8, t), ptr, stride])

    def dp(self, dst, a, bt):
        self.b.call(self._dp, [c(I8, dst), c(I8, a), c(I8, bt)])


class _EmuTiles:
    """The same operations on stack memory: tile t = 1 KiB at regs + 1024*t, row r at +64*r."""

    def __init__(self, b, mode):
        self.b, self.shapes = b, SHAPES[mode]
        self.regs = local(b, ir.ArrayType(I8, 8 * 1024), name="tmm")
        self.regs.align = 64
        self.memcpy = intrinsic(b.module, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
        self.memset = intrinsic(b.module, "llvm.memset.p0.i64", VOID, [PTR, I8, I64, I1])
        self._dp_fn = _emit_emu_bf16_dp(b.module) if mode == "bf16" else _emit_emu_dp(b.module, mode == "i8row")

    def _reg(self, t):
        return gep(self.b, self.regs, 1024 * t)

    def configure(self):
        self.b.call(self.memset, [self.regs, c(I8, 0), i64(8 * 1024), c(I1, 0)])

    def release(self):
        pass

    def zero(self, t):
        self.b.call(self.memset, [self._reg(t), c(I8, 0), i64(1024), c(I1, 0)])

    def _rows(self, t, ptr, stride, to_tile):
        b = self.b
        rows, colsb = self.shapes[t]
        for r in range(rows):
            mem = gep(b, ptr, b.mul(stride, i64(r)))
            reg = gep(b, self._reg(t), 64 * r)
            dst, src = (reg, mem) if to_tile else (mem, reg)
            b.call(self.memcpy, [dst, src, i64(colsb), c(I1, 0)])

    def load(self, t, ptr, stride):
        self._rows(t, ptr, stride, True)

    def store(self, t, ptr, stride):
        self._rows(t, ptr, stride, False)

    def dp(self, dst, a, bt):
        self.b.call(self._dp_fn, [self._reg(dst), self._reg(a), self._reg(bt)])


def _emit_emu_dp(module, signed_b: bool = False):
    """C[m][n] += sum_{k<8, i<4} s8(A[m][4k+i]) * u8(B[k][4n+i])  (tdpbsud, 16 x 16 x 32), or with
    signed_b sum_{k<16, i<4} s8(A[m][4k+i]) * s8(B[k][4n+i])  (tdpbssd, 16 x 16 x 64)."""
    name = "emu_tdpbssd" if signed_b else "emu_tdpbsud"
    if name in module.globals:
        return module.globals[name]
    fn, b = define(module, name, VOID, [PTR, PTR, PTR], internal=True)
    C, A, B = fn.args
    radd = intrinsic(module, "llvm.vector.reduce.add.v4i32", I32, [vec(I32, 4)])
    with for_range(b, 0, 16, name="m") as m:
        with for_range(b, 0, 16, name="n") as n:
            cp = gep(b, C, b.add(b.mul(m, i64(64)), b.mul(n, i64(4))))
            acc = b.load(cp, typ=I32, align=4)
            for k in range(16 if signed_b else BLOCK // 4):
                a4 = b.load(gep(b, A, b.add(b.mul(m, i64(64)), i64(4 * k))), typ=vec(I8, 4), align=1)
                b4 = b.load(gep(b, B, b.add(i64(64 * k), b.mul(n, i64(4)))), typ=vec(I8, 4), align=1)
                wide = b.sext(b4, vec(I32, 4)) if signed_b else b.zext(b4, vec(I32, 4))
                prod = b.mul(b.sext(a4, vec(I32, 4)), wide)
                acc = b.add(acc, b.call(radd, [prod]))
            b.store(acc, cp, align=4)
    b.ret_void()
    return fn


def _emit_emu_bf16_dp(module):
    """C[m][n] += sum_{k<16} A[m][2k]*B[k][2n] + A[m][2k+1]*B[k][2n+1]  (tdpbf16ps, bf16 -> f32)."""
    name = "emu_tdpbf16ps"
    if name in module.globals:
        return module.globals[name]
    fn, b = define(module, name, VOID, [PTR, PTR, PTR], internal=True)
    C, A, B = fn.args
    v2i, v2f = vec(I32, 2), vec(F32, 2)
    with for_range(b, 0, 16, name="m") as m:
        with for_range(b, 0, 16, name="n") as n:
            cp = gep(b, C, b.add(b.mul(m, i64(64)), b.mul(n, i64(4))))
            acc = b.load(cp, typ=F32, align=4)
            for k in range(16):
                pairs = []
                for base, off in ((A, b.add(b.mul(m, i64(64)), i64(4 * k))), (B, b.add(i64(64 * k), b.mul(n, i64(4))))):
                    h = b.load(gep(b, base, off), typ=vec(I16, 2), align=2)
                    pairs.append(b.bitcast(b.shl(b.zext(h, v2i), splat(I32, 2, 16)), v2f))
                prod = b.fmul(pairs[0], pairs[1])
                acc = b.fadd(acc, b.fadd(b.extract_element(prod, c(I32, 0)), b.extract_element(prod, c(I32, 1))))
            b.store(acc, cp, align=4)
    b.ret_void()
    return fn
