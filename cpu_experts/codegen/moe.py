"""The fused MoE job as native code: routing, activation quantization, gate/up+SiLU, down+weighted sum
(the worker loop and submit/wait come from sched.py). `build_ir(geo, isa, tiles)` is a pure function
-> IR text.

A job runs in three phases of tasks, claimed in order from one atomic counter:
  0: task 0 groups the T*k (token, expert) slots by expert (counting sort) and raises ROUTED; tasks
     1.. wait for ROUTED, quantize x rows and write each row to its k slots (slot order: an expert's
     activation rows are consecutive)
  1: (active expert, block of ROWS_UP rows of I): h = silu(gate.x) * (up.x) for the expert's slots,
     then those h columns quantized to int8 blocks (ROWS_UP is a multiple of 32)
  2: block of ROWS_DOWN rows of H: out[t, rows] = sum over slots of w * (down_e . h_slot)[rows];
     one task owns its output rows for every token, so no atomics on the output
A task of phase p waits (spinning) until every task of phase p-1 is done; tasks are claimed in order,
so the earlier tasks are already running and this cannot deadlock.

Experts with at least `amx_min_slots` slots use an AMX kernel (every slot of the expert against two
16-row weight groups per call): int8 tiles with a float epilogue per 32-weight block (amx.py), bf16
tiles (amx_bf16.py) or int8 tiles with one scale per weight row and per activation row (amx_i8row.py)
as `amx_mode`, `amx_bf16_min_slots` and `amx_row`/`amx_row_down` choose; the others the vector
kernels (dot.py, `tokens` slots per call). With `amx_row_down`, the gate/up task that finishes an
i8row expert's h quantizes its rows (one scale each) and counts once more on the expert's READY
counter, which the down tasks wait for.
"""
from contextlib import contextmanager
from dataclasses import dataclass

from llvmlite import ir

from ..isa import Isa
from ..layout import BLOCK, Geometry
from . import amx, amx_bf16, amx_i8row, dot, sched, vmath
from .fields import J, POOL_FIELDS
from .irutil import F32, I1, I8, I16, I32, I64, PTR, VOID, c, define, field, fma, for_range, gep, i64, intrinsic, load, \
    local, prefetch, shuffle, splat, store, vec
from .scales import scale_pos

SLOT_PAD = amx.CHUNK  # activation rows past the last slot that AMX may read (results discarded)


@dataclass(frozen=True)
class Tiles:
    rows_up: int = 32     # rows of I per phase-1 task (multiple of 32 and of G)
    rows_down: int = 64   # rows of H per phase-2 task (multiple of G; of 32 with AMX)
    tokens: int = 2       # activation rows per vector microkernel call (register blocking)
    quant_rows: int = 8   # x rows quantized per phase-0 task
    prefetch: int = 2048  # vector kernels' software prefetch distance (bytes) along a row group's payload
    #                       stream (experts.default_tiles: 4096 on AMX hosts)
    amx_prefetch: int = 2048  # the AMX kernels' (4096 was 1-4% slower at prefill in 3 of 4 pairs, session 8)
    prefetch_all: bool = True  # prefetch every line of every weight stream (else one per block)
    prefetch_next: bool = True  # prefetch the head of the next vector call's weights before each call
    prefetch_locality: int = 3  # weight prefetches: 3 = prefetcht0, 2 = prefetcht1 (L2), 0 = prefetchnta
    amx: bool = False     # AMX tiles for experts with at least amx_min_slots slots
    amx_min_slots: int = 8   # tuned on the GPU machine with the modes below (NOTES.md, session 3)
    amx_max_slots: int = 128  # slots per AMX call (accumulators: 2 x 128 x 64 bytes on the stack)
    amx_emulate: bool = False  # tests: the AMX kernel with tile instructions emulated in plain IR
    amx_mode: str = "mixed"  # "int8": tdpbsud per 32-weight block + float epilogue; "bf16": blocks
    #                          dequantized to bf16 once per call, tdpbf16ps accumulates over all K;
    #                          "mixed": bf16 for experts with >= amx_bf16_min_slots slots, int8 below
    amx_bf16_min_slots: int = 24
    amx_row: bool = False   # gate/up of experts with >= amx_bf16_min_slots slots on the int8 kernel with one
    #                         scale per weight row and per token (amx_i8row.py) instead of bf16 ("bf16"/"mixed")
    amx_row_down: bool = False  # the same for down: the last gate/up task of such an expert quantizes its h rows
    amx_row_warm: bool = True   # i8row calls prefetch their payload's head and scale streams (session 8 A/B)
    amx_row_bounds: bool = True  # i8row keeps each row's bound after its first call (job GRB/URB/DRB), instead
    #                              of a pass over the row's scale streams on every call (session 9)
    profile: bool = False   # per-worker rdtsc counters of task and barrier time (sched.py, WorkerPool.profile)
    expert_ready: bool = False  # no barrier 1: a down task waits only for the gate/up tasks of the expert it reads
    tail_rows: int = 0      # the last tail_rows rows of H in down tasks of tail_task_rows rows (a finer end)
    tail_task_rows: int = 16  # multiple of the down format's row group; < 32 runs AMX experts on vector kernels
    tail_max_tokens: int = 8  # the tail only in jobs of at most this many tokens (larger: AMX row pairs)
    prefetch_first: bool = False  # a worker that claims a phase-1 task before phase 0 is done prefetches
    #                               that task's weights into L2 while it waits (routing known, x not yet)
    q4k_superblock: bool = True  # q4_k's weight layout (layout.py); False: its factors as f16 per 32 weights,
    #                              the form before session 9, kept for A/B runs (another layout: own weights)


def down_tasks(hidden: int, tiles: Tiles, tokens: int) -> int:
    """Phase-2 task count (job[N2]) of a job of `tokens` tokens: (H - tail_rows) / rows_down tasks, then
    tail_rows / tail_task_rows (jobs above tail_max_tokens: H / rows_down)."""
    if tokens > tiles.tail_max_tokens:
        return hidden // tiles.rows_down
    return (hidden - tiles.tail_rows) // tiles.rows_down + tiles.tail_rows // tiles.tail_task_rows


@dataclass
class _Side:
    """One phase's weights: gate/up (activations x) or down (activations h), each with its own format."""
    geo: Geometry
    quant: bool
    amx: bool            # experts with >= amx_min_slots slots take the AMX kernel in this phase
    dots: list = None    # vector microkernels, dots[nt - 1] for nt activation rows
    qblock: object = None  # quantizer of this phase's activations (its term follows geo.offset)
    amx_bf: object = None  # AMX kernels by activation type (Tiles.amx_mode says which exist)
    amx_i8: object = None
    amx_row: object = None  # the i8row kernel (gate/up with Tiles.amx_row)

    @property
    def R(self) -> int:
        return self.geo.group_rows


class _Builder:
    """Emits one module for one (gate/up format, down format, ISA, tiles)."""

    def __init__(self, geo: Geometry, isa: Isa, tiles: Tiles, down_geo: Geometry | None = None):
        down_geo = down_geo or geo
        assert geo.vector_bytes == down_geo.vector_bytes
        assert tiles.rows_up % 32 == 0 and tiles.rows_up % geo.group_rows == 0
        assert tiles.rows_down % down_geo.group_rows == 0
        assert tiles.tail_rows % tiles.tail_task_rows == 0 and tiles.tail_task_rows % down_geo.group_rows == 0, tiles
        self.geo, self.isa, self.tiles = geo, isa, tiles
        name = geo.fmt if down_geo.fmt == geo.fmt else f"{geo.fmt}_{down_geo.fmt}"
        self.m = ir.Module(name=f"hmoe_{name}_{isa.name}")
        self.gu = self._side(geo, tiles.amx_row)
        self.dn = self._side(down_geo, tiles.amx_row_down)
        self.amx_on = self.gu.amx or self.dn.amx
        if tiles.amx:
            assert self.amx_on, "AMX tiles need q8_0, q4_0 or q4_k weights in at least one phase"
            assert tiles.amx_max_slots % amx.CHUNK == 0 and tiles.amx_mode in ("int8", "bf16", "mixed"), tiles
            assert isa.amx or tiles.amx_emulate
        if self.dn.amx:
            assert tiles.rows_down % 32 == 0
        self.bf16_acts = self.amx_on and tiles.amx_mode != "int8"   # bf16 or mixed
        # x as int8 rows with one scale per token (the i8row kernel) instead of bf16 rows
        self.x_row = self.bf16_acts and self.gu.amx and tiles.amx_row
        self.x_bf16 = self.bf16_acts and self.gu.amx and not self.x_row
        self.h_row = self.bf16_acts and self.dn.amx and tiles.amx_row_down   # likewise h
        self.h_bf16 = self.bf16_acts and self.dn.amx and not self.h_row
        # gate/up tasks count up per expert: for expert_ready's down tasks, and for h_row's last one
        self.count_ready = tiles.expert_ready or self.h_row
        if self.bf16_acts:
            self.to_bf16 = self._emit_to_bf16()
        if self.x_row or self.h_row:
            self.quant_row = amx_i8row.emit_quant_row(self.m)
        for side, on in ((self.gu, self.x_row), (self.dn, self.h_row)):
            if on:
                shared = side is self.dn and self.gu.amx_row is not None and self.gu.geo == side.geo
                side.amx_row = self.gu.amx_row if shared else amx_i8row.emit_amx_i8row_mm(
                    self.m, side.geo, tiles.amx_prefetch, emulate=tiles.amx_emulate, warm=tiles.amx_row_warm,
                    keep_bounds=tiles.amx_row_bounds)
        if self.gu.quant or self.dn.quant:
            self.memcpy = intrinsic(self.m, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
        # x's term follows the gate/up offset, h's the down offset: one quantizer per distinct term
        qblocks = {}
        for side in (self.gu, self.dn):
            if side.quant:
                off = side.geo.offset
                if off not in qblocks:
                    qblocks[off] = self._emit_quant_block(off, f"quant_block_{len(qblocks)}")
                side.qblock = qblocks[off]

    def _side(self, geo: Geometry, row: bool) -> _Side:
        tiles, isa = self.tiles, self.isa
        quant = geo.fmt != "bf16"
        side = _Side(geo, quant, tiles.amx and phase_amx(geo, row))
        pf, pfa, loc = tiles.prefetch, tiles.prefetch_all, tiles.prefetch_locality
        emit = dot.emit_quant_dot if quant else dot.emit_bf16_dot
        existing = getattr(self, "gu", None)
        if existing is not None and existing.geo == geo:   # one format for both phases: share the code
            side.dots = existing.dots
            side.amx_bf, side.amx_i8 = existing.amx_bf, existing.amx_i8
            return side
        side.dots = [emit(self.m, geo, isa, nt, pf, pfa, loc) for nt in range(1, tiles.tokens + 1)]
        if side.amx and supports_amx(geo):   # else i8row only (q6_k), emitted in __init__
            assert isa.vnni or geo.fmt != "q8_0" or tiles.amx_min_slots <= 1, \
                "unsigned q8_0 codes need VNNI dots for experts below amx_min_slots"
            if tiles.amx_mode != "int8":
                side.amx_bf = amx_bf16.emit_amx_bf16_mm(self.m, geo, tiles.amx_prefetch, emulate=tiles.amx_emulate)
            if tiles.amx_mode != "bf16":
                side.amx_i8 = amx.emit_amx_mm(self.m, geo, tiles.amx_prefetch, emulate=tiles.amx_emulate)
        return side

    # ------------------------------------------------------------ activation quantization
    def _emit_quant_block(self, offset: int, name: str):
        """void quant_block(src f32[32], q i8[32], d f32[1], s i32[2], t f32[1]): int8 codes with scale
        amax/127, the sum of the codes of each half (q6_k) and the activation term (dot.py, amx.py) for
        weights with integer offset `offset`."""
        fn, b = define(self.m, name, VOID, [PTR] * 5, internal=True)
        src, q, dptr, sptr, tptr = fn.args
        v32 = vec(F32, 32)
        v = load(b, src, v32, align=4)
        fabs = intrinsic(self.m, "llvm.fabs.v32f32", v32, [v32])
        fmax = intrinsic(self.m, "llvm.vector.reduce.fmax.v32f32", F32, [v32])
        amax = b.call(fmax, [b.call(fabs, [v])])
        d = b.fdiv(amax, c(F32, 127.0))
        pos = b.fcmp_ordered(">", amax, c(F32, 0.0))
        inv = b.select(pos, b.fdiv(c(F32, 127.0), b.select(pos, amax, c(F32, 1.0))), c(F32, 0.0))
        inv_v = shuffle(b, b.insert_element(ir.Constant(vec(F32, 1), ir.Undefined), inv, c(I32, 0)), [0] * 32)
        rounded = b.call(intrinsic(self.m, "llvm.roundeven.v32f32", v32, [v32]), [b.fmul(v, inv_v)])
        qi = b.fptosi(rounded, vec(I32, 32))
        store(b, b.trunc(qi, vec(I8, 32)), q)
        store(b, d, dptr, align=4)
        radd = intrinsic(self.m, "llvm.vector.reduce.add.v16i32", I32, [vec(I32, 16)])
        halves = [b.call(radd, [shuffle(b, qi, list(range(16 * h, 16 * h + 16)))]) for h in range(2)]
        for h, sh in enumerate(halves):
            store(b, sh, sptr, h, align=4)
        # the activation term: -offset*d*sum (offset formats) or d*sum (q4_k's bias)
        term = b.fmul(d, b.sitofp(b.add(*halves), F32))
        if offset:
            term = b.fmul(term, c(F32, -float(offset)))
        store(b, term, tptr, align=4)
        b.ret_void()
        return fn

    def _emit_to_bf16(self):
        """void to_bf16(src f32[32], dst bf16[32]) (AMX-BF16 activations)."""
        fn, b = define(self.m, "to_bf16", VOID, [PTR, PTR], internal=True)
        v = load(b, fn.args[0], vec(F32, 32), align=4)
        bits = b.lshr(amx_bf16.round_bf16_bits(b, v), splat(I32, 32, 16))
        store(b, b.trunc(bits, vec(I16, 32)), fn.args[1], align=2)
        b.ret_void()
        return fn

    # ------------------------------------------------------------ phase 0
    def _emit_route(self):
        """Counting sort of slots by expert: OFF[E+1], STOK/SW in expert order, SPOS, ACT list, N1; then
        ROUTED = 1 (the quantization tasks wait for it)."""
        fn, b = define(self.m, "task_route", VOID, [PTR, PTR], internal=True)
        job, pool = fn.args   # the pool running the job (its submit reset ROUTED), not job[POOL]
        T, K, E, I = (field(b, job, J[n]) for n in ("T", "TOPK", "E", "I"))
        ids, w = field(b, job, J["IDS"], True), field(b, job, J["W"], True)
        cnt, off = field(b, job, J["CNT"], True), field(b, job, J["OFF"], True)
        stok, sw, spos, act = (field(b, job, J[n], True) for n in ("STOK", "SW", "SPOS", "ACT"))
        nslots = b.mul(T, K)
        with for_range(b, 0, E, name="z") as e:
            store(b, c(I32, 0), cnt, e, align=4)
        with for_range(b, 0, nslots, name="s") as s:
            e = load(b, ids, I64, s, align=8)
            p = gep(b, cnt, e, I32)
            b.store(b.add(b.load(p, typ=I32, align=4), c(I32, 1)), p, align=4)
        nact = local(b, I64, i64(0))
        store(b, c(I32, 0), off, 0, align=4)
        with for_range(b, 0, E, name="e") as e:
            n = load(b, cnt, I32, e, align=4)
            start = load(b, off, I32, e, align=4)
            store(b, b.add(start, n), off, b.add(e, i64(1)), align=4)
            store(b, start, cnt, e, align=4)   # cnt becomes the fill cursor
            with b.if_then(b.icmp_signed(">", n, c(I32, 0))):
                a = b.load(nact, typ=I64)
                store(b, b.trunc(e, I32), act, a, align=4)
                if self.count_ready:   # its gate/up tasks count up here (published by ROUTED below)
                    store(b, i64(0), field(b, job, J["READY"], True), b.mul(a, i64(8)), align=8)
                b.store(b.add(a, i64(1)), nact)
        with for_range(b, 0, nslots, name="f") as s:
            e = load(b, ids, I64, s, align=8)
            p = gep(b, cnt, e, I32)
            pos = b.load(p, typ=I32, align=4)
            b.store(b.add(pos, c(I32, 1)), p, align=4)
            store(b, b.trunc(b.udiv(s, K), I32), stok, pos, align=4)
            store(b, load(b, w, F32, s, align=4), sw, pos, align=4)
            store(b, pos, spos, s, align=4)
        na = b.load(nact, typ=I64)
        store(b, na, job, J["NACT"], align=8)
        store(b, b.mul(na, b.udiv(I, i64(self.tiles.rows_up))), job, J["N1"], align=8)
        sched.astore(b, pool, POOL_FIELDS["ROUTED"], 1)
        b.ret_void()
        return fn

    def _emit_quant_rows(self):
        """Quantize x rows [r0, r1) into the slot-ordered XQ/XD/XS/XT rows of their k slots."""
        fn, b = define(self.m, "task_quant_x", VOID, [PTR, I64, PTR], internal=True)
        job, idx, pool = fn.args
        T, K, H, xstride = (field(b, job, J[n]) for n in ("T", "TOPK", "H", "XSTRIDE"))
        x, xq, xd, xs, xt, xb, spos = (field(b, job, J[n], True) for n in ("X", "XQ", "XD", "XS", "XT", "XB", "SPOS"))
        xr, xrs = field(b, job, J["XR"], True), field(b, job, J["XRS"], True)
        sched.spin_until_equal(b, pool, POOL_FIELDS["ROUTED"], i64(1), "routed")
        r0 = b.mul(idx, i64(self.tiles.quant_rows))
        r1 = b.add(r0, i64(self.tiles.quant_rows))
        r1 = b.select(b.icmp_signed("<", r1, T), r1, T)
        nblk = b.udiv(H, i64(32))
        with for_range(b, r0, r1, name="t") as t:
            p0 = b.sext(load(b, spos, I32, b.mul(t, K), align=4), I64)
            with for_range(b, 0, nblk, name="blk") as k:
                src = gep(b, x, b.add(b.mul(t, xstride), b.mul(k, i64(32))), F32)
                row_blk = b.add(b.mul(p0, nblk), k)
                b.call(self.gu.qblock, [src, gep(b, xq, b.mul(row_blk, i64(32))), gep(b, xd, row_blk, F32),
                                        gep(b, xs, b.mul(row_blk, i64(2)), I32), gep(b, xt, row_blk, F32)])
                if self.x_bf16:
                    b.call(self.to_bf16, [src, gep(b, xb, b.mul(row_blk, i64(32)), I16)])
            if self.x_row:
                b.call(self.quant_row, [gep(b, x, b.mul(t, xstride), F32), H, gep(b, xr, b.mul(p0, H)),
                                        gep(b, xrs, p0, F32)])
            with for_range(b, 1, K, name="j") as j:   # the other k-1 slots of token t: copies
                p = b.sext(load(b, spos, I32, b.add(b.mul(t, K), j), align=4), I64)
                rows = [(xq, H), (xd, b.mul(nblk, i64(4))), (xs, b.mul(nblk, i64(8))), (xt, b.mul(nblk, i64(4)))]
                if self.x_bf16:
                    rows.append((xb, b.mul(H, i64(2))))
                if self.x_row:
                    rows += [(xr, H), (xrs, i64(4))]
                for base, per_row in rows:
                    b.call(self.memcpy, [gep(b, base, b.mul(p, per_row)), gep(b, base, b.mul(p0, per_row)),
                                         per_row, c(I1, 0)])
        b.ret_void()
        return fn

    # ------------------------------------------------------------ vector microkernel calls
    def _dot_args(self, side, nt, acts, w, outbuf):
        pay, sc, bias, nch = w
        if side.quant:
            return [pay, sc, bias, nch] + [a[i] for i in range(4) for a in acts] + [outbuf]
        return [pay, nch] + acts + [outbuf]

    def _prefetch_head(self, b, side, w):
        """The first `prefetch` bytes of a vector call's weight streams (its software prefetch only
        reaches that far ahead of the first block)."""
        pay, sc, bias, _ = w
        loc = self.tiles.prefetch_locality
        for off in range(0, self.tiles.prefetch, 64):
            prefetch(b, gep(b, pay, i64(off)), loc)
        if side.quant:
            for off in range(0, max(self.tiles.prefetch // 8, 64), 64):
                prefetch(b, gep(b, sc, i64(off)), loc)
                if side.geo.bias:
                    prefetch(b, gep(b, bias, i64(off)), loc)

    def _vec_calls(self, b, side, s, s_end, slot_act, mats, bufs, epilogue):
        """For slot chunks [s, s_end) of `tokens` slots: for each weight group in mats, dot_n{m} into
        its buf (f32[m][R]); then epilogue(b, s0, m)."""
        NT = self.tiles.tokens
        with for_range(b, s, s_end, step=NT, name="sc") as s0:
            rem = b.sub(s_end, s0)
            m = b.select(b.icmp_signed("<", rem, i64(NT)), rem, i64(NT))
            end = b.append_basic_block("dots.end")
            sw = b.switch(m, end)
            for nt in range(1, NT + 1):
                blk = b.append_basic_block(f"dots.n{nt}")
                sw.add_case(i64(nt), blk)
                b.position_at_end(blk)
                acts = [slot_act(b, b.add(s0, i64(n))) for n in range(nt)]
                for w, buf in zip(mats, bufs):
                    b.call(side.dots[nt - 1], self._dot_args(side, nt, acts, w, b.bitcast(buf, PTR)))
                b.branch(end)
            b.position_at_end(end)
            epilogue(b, s0, m)

    def _weights(self, b, job, prefix, e, grp, k):
        """Pointers of row group grp of expert e's matrix (prefix 'G', 'U' or 'D'), and its chunk count."""
        side = self.dn if prefix == "D" else self.gu
        geo, R = side.geo, side.R
        pe = field(b, job, J["D_PAY_E" if prefix == "D" else "GU_PAY_E"])
        se = field(b, job, J["D_SC_E" if prefix == "D" else "GU_SC_E"])
        if side.quant:  # nchunks counts 32-weight blocks
            nchunks = b.udiv(k, i64(BLOCK))
            grp_pay = b.mul(nchunks, i64(geo.block_payload_bytes))
        else:
            nchunks = b.udiv(k, i64(geo.k_align))
            grp_pay = b.mul(nchunks, i64(R * geo.vector_bytes))
        pay = gep(b, field(b, job, J[prefix + "P"], True), b.add(b.mul(e, pe), b.mul(grp, grp_pay)))
        if not side.quant:
            return pay, None, None, nchunks
        soff = b.add(b.mul(e, se), b.mul(grp, scale_pos(b, geo, nchunks)))
        sc = gep(b, field(b, job, J[prefix + "S"], True), soff)
        bias = gep(b, field(b, job, J[prefix + "B"], True), soff)
        return pay, sc, bias, nchunks

    def _row_bounds(self, b, job, prefix, e, grp, n):
        """Where the i8row kernel keeps row group grp's row bounds for expert e's matrix `prefix` (n rows)."""
        R = (self.dn if prefix == "D" else self.gu).R
        return gep(b, field(b, job, J[prefix + "RB"], True), b.add(b.mul(e, n), b.mul(grp, i64(R))), F32)

    def _act_rows(self, b, job, which):
        """slot -> activation pointers of 'x' or 'h' (quantized: q, d, sums, term rows in slot order;
        bf16: the f32 row of x by the slot's token, or of h by slot)."""
        if not (self.gu if which == "x" else self.dn).quant:
            stok = field(b, job, J["STOK"], True)
            x, xstride = field(b, job, J["X"], True), field(b, job, J["XSTRIDE"])
            hf, I = field(b, job, J["HF"], True), field(b, job, J["I"])

            def rows_f32(b, slot):
                if which == "x":
                    return gep(b, x, b.mul(b.sext(load(b, stok, I32, slot, align=4), I64), xstride), F32)
                return gep(b, hf, b.mul(slot, I), F32)
            return rows_f32
        k = field(b, job, J["H" if which == "x" else "I"])
        q, d, s, t = (field(b, job, J[("X" if which == "x" else "H") + n], True) for n in "QDST")

        def rows(b, slot):
            nb = b.udiv(k, i64(32))
            return (gep(b, q, b.mul(slot, k)), gep(b, d, b.mul(slot, nb), F32),
                    gep(b, s, b.mul(slot, b.mul(nb, i64(2))), I32), gep(b, t, b.mul(slot, nb), F32))
        return rows

    # ------------------------------------------------------------ phase 1
    def _emit_prefetch_gateup(self):
        """task_prefetch_gateup(job, j): every line of phase-1 task j's gate and up rows (payload, scales,
        bias) into L2, in the order the task reads them (needs ROUTED: ACT and N1 are written)."""
        fn, b = define(self.m, "task_prefetch_gateup", VOID, [PTR, I64], internal=True)
        job, j = fn.args
        H, side = field(b, job, J["H"]), self.gu
        RU, R, geo = self.tiles.rows_up, side.R, side.geo
        nrb = b.udiv(field(b, job, J["I"]), i64(RU))
        a, rb = b.udiv(j, nrb), b.urem(j, nrb)
        e = b.sext(load(b, field(b, job, J["ACT"], True), I32, a, align=4), I64)
        for gi in range(RU // R):
            grp = b.add(b.mul(rb, i64(RU // R)), i64(gi))
            for prefix in "GU":
                pay, sc, bias, nch = self._weights(b, job, prefix, e, grp, H)
                per_chunk = geo.block_payload_bytes if side.quant else R * geo.vector_bytes
                streams = [(pay, b.mul(nch, i64(per_chunk)))]
                if side.quant:
                    sc_bytes = scale_pos(b, geo, nch)
                    streams += [(sc, sc_bytes)] + ([(bias, sc_bytes)] if geo.bias else [])
                for base, nbytes in streams:
                    with for_range(b, 0, nbytes, step=64, name="pf") as off:
                        prefetch(b, gep(b, base, off), 2)
        b.ret_void()
        return fn

    def _emit_gateup(self):
        fn, b = define(self.m, "task_gateup", VOID, [PTR, I64, I64], internal=True)
        job, j, tid = fn.args
        I = field(b, job, J["I"])
        RU = self.tiles.rows_up
        nrb = b.udiv(I, i64(RU))
        a, rb = b.udiv(j, nrb), b.urem(j, nrb)
        e = b.sext(load(b, field(b, job, J["ACT"], True), I32, a, align=4), I64)
        off = field(b, job, J["OFF"], True)
        s_beg = b.sext(load(b, off, I32, e, align=4), I64)
        s_end = b.sext(load(b, off, I32, b.add(e, i64(1)), align=4), I64)
        if self.gu.amx:
            use_amx = b.icmp_signed(">=", b.sub(s_end, s_beg), i64(self.tiles.amx_min_slots))
            with b.if_else(use_amx) as (then, otherwise):
                with then:
                    self._gateup_amx(b, job, tid, e, rb, s_beg, s_end)
                with otherwise:
                    self._gateup_vec(b, job, e, rb, s_beg, s_end)
        else:
            self._gateup_vec(b, job, e, rb, s_beg, s_end)
        self._quantize_h(b, job, rb, s_beg, s_end)
        if self.count_ready:   # release: this task's h rows before the count a down task acquires
            ctr = gep(b, field(b, job, J["READY"], True), b.mul(a, i64(8)), I64)
            if not self.h_row:
                b.atomic_rmw("add", ctr, i64(1), "release")
            else:
                row = self._row_down_expert(b, b.sub(s_end, s_beg))
                # after barrier 1 only i8row experts are waited for: the others (every expert of a decode
                # step) skip the shared counter
                counted = row if not self.tiles.expert_ready else c(I1, 1)
                with b.if_then(counted):
                    old = b.atomic_rmw("add", ctr, i64(1), "acq_rel")
                    # the expert's last gate/up task: every h column is there (acquired)
                    with b.if_then(b.and_(row, b.icmp_signed("==", b.add(old, i64(1)), nrb))):
                        self._quantize_h_rows(b, job, s_beg, s_end)
                        b.atomic_rmw("add", ctr, i64(1), "release")
        b.ret_void()
        return fn

    def _row_down_expert(self, b, nslots):
        """i1: down runs this expert's slots on the i8row kernel (the choice _down and _amx_call make)."""
        t = self.tiles
        big = b.icmp_signed(">=", nslots, i64(t.amx_min_slots))
        if t.amx_mode == "mixed" and supports_amx(self.dn.geo):
            big = b.and_(big, b.icmp_signed(">=", nslots, i64(t.amx_bf16_min_slots)))
        return big

    def _quantize_h_rows(self, b, job, s_beg, s_end):
        """h rows of slots [s_beg, s_end) as int8 with one scale each (HR, HRS: the i8row kernel's)."""
        I, hf = field(b, job, J["I"]), field(b, job, J["HF"], True)
        hr, hrs = field(b, job, J["HR"], True), field(b, job, J["HRS"], True)
        with for_range(b, s_beg, s_end, name="hrow") as s:
            b.call(self.quant_row, [gep(b, hf, b.mul(s, I), F32), I, gep(b, hr, b.mul(s, I)), gep(b, hrs, s, F32)])

    def _store_h(self, b, job, g, u, slot, row0):
        """h[slot, row0 : row0 + n] = silu(g) * u  (g, u: <n x float>)."""
        I, hf = field(b, job, J["I"]), field(b, job, J["HF"], True)
        store(b, b.fmul(vmath.silu(b, g), u), hf, b.add(b.mul(slot, I), row0), align=4)

    def _gateup_amx(self, b, job, tid, e, rb, s_beg, s_end):
        """Up to amx_max_slots slots per call: for each 16-row group of the task, gate and up of every
        slot in one AMX call, then h = silu(gate) * up from the accumulators."""
        H = field(b, job, J["H"])
        MS, R = self.tiles.amx_max_slots, self.gu.R
        vf = vec(F32, R)
        with self._amx_slot_chunks(b, job, tid, self.gu, s_beg, s_end, H, "X", "amx_acc") as (s0, m, accbuf, call):
            with for_range(b, 0, self.tiles.rows_up // R, name="gi") as gi:
                row0 = b.add(b.mul(rb, i64(self.tiles.rows_up)), b.mul(gi, i64(R)))
                grp = b.udiv(row0, i64(R))
                gp, gs, gb, _ = self._weights(b, job, "G", e, grp, H)
                up, us, ub, _ = self._weights(b, job, "U", e, grp, H)
                I = field(b, job, J["I"])
                call([gp, gs, gb, up, us, ub], [self._row_bounds(b, job, p, e, grp, I) for p in "GU"])
                with for_range(b, 0, m, name="h") as n:
                    g = load(b, accbuf, vf, b.mul(n, i64(R)), align=64)
                    u = load(b, accbuf, vf, b.add(b.mul(n, i64(R)), i64(MS * R)), align=64)
                    self._store_h(b, job, g, u, b.add(s0, n), row0)

    def _gateup_vec(self, b, job, e, rb, s_beg, s_end):
        H = field(b, job, J["H"])
        R, RU, NT = self.gu.R, self.tiles.rows_up, self.tiles.tokens
        rows = self._act_rows(b, job, "x")
        gbuf = local(b, ir.ArrayType(F32, R * NT))
        ubuf = local(b, ir.ArrayType(F32, R * NT))
        vf = vec(F32, R)
        with for_range(b, 0, RU // R, name="gi") as gi:
            row0 = b.add(b.mul(rb, i64(RU)), b.mul(gi, i64(R)))
            grp = b.udiv(row0, i64(R))
            gw = self._weights(b, job, "G", e, grp, H)
            uw = self._weights(b, job, "U", e, grp, H)
            if self.tiles.prefetch_next:   # gate of the next group follows this one; up's head now
                self._prefetch_head(b, self.gu, uw)

            def epilogue(b, s0, m):
                with for_range(b, 0, m, name="ep") as n:
                    g = load(b, gbuf, vf, b.mul(n, i64(R)), align=4)
                    u = load(b, ubuf, vf, b.mul(n, i64(R)), align=4)
                    self._store_h(b, job, g, u, b.add(s0, n), row0)
            self._vec_calls(b, self.gu, s_beg, s_end, rows, (gw, uw), (gbuf, ubuf), epilogue)

    def _quantize_h(self, b, job, rb, s_beg, s_end):
        """The task's ROWS_UP columns of h, for each of its slots, to int8 blocks (the down format's
        activations: its offset term; bf16 too when down runs on AMX-BF16)."""
        if self.dn.quant:
            I, hf, RU = field(b, job, J["I"]), field(b, job, J["HF"], True), self.tiles.rows_up
            hq, hd, hs, ht, hb = (field(b, job, J[n], True) for n in ("HQ", "HD", "HS", "HT", "HB"))
            nblk_row = b.udiv(I, i64(32))
            with for_range(b, s_beg, s_end, name="qs") as s:
                with for_range(b, 0, RU // 32, name="qb") as qb:
                    col = b.add(b.mul(rb, i64(RU)), b.mul(qb, i64(32)))
                    blk = b.add(b.mul(s, nblk_row), b.udiv(col, i64(32)))
                    src = gep(b, hf, b.add(b.mul(s, I), col), F32)
                    b.call(self.dn.qblock, [src, gep(b, hq, b.mul(blk, i64(32))), gep(b, hd, blk, F32),
                                            gep(b, hs, b.mul(blk, i64(2)), I32), gep(b, ht, blk, F32)])
                    if self.h_bf16:
                        b.call(self.to_bf16, [src, gep(b, hb, b.mul(blk, i64(32)), I16)])

    # ------------------------------------------------------------ phase 2
    def _down_rows(self, b, job, j):
        """Task j's first row of H and row count: rows_down-row tasks, then tail_task_rows-row ones (the
        tail only for jobs of <= tail_max_tokens tokens; down_tasks() gives the matching count)."""
        RD, tail, RT = self.tiles.rows_down, self.tiles.tail_rows, self.tiles.tail_task_rows
        if not tail:
            return b.mul(j, i64(RD)), i64(RD), None
        H = field(b, job, J["H"])
        tail_on = b.icmp_signed("<=", field(b, job, J["T"]), i64(self.tiles.tail_max_tokens))
        main_rows = b.select(tail_on, b.sub(H, i64(tail)), H)
        nmain = b.udiv(main_rows, i64(RD))
        is_main = b.icmp_signed("<", j, nmain)
        r0 = b.select(is_main, b.mul(j, i64(RD)), b.add(main_rows, b.mul(b.sub(j, nmain), i64(RT))))
        return r0, b.select(is_main, i64(RD), i64(RT)), is_main

    def _emit_down(self):
        ready = self.tiles.expert_ready
        fn, b = define(self.m, "task_down", VOID, [PTR, I64, I64] + ([PTR] if ready else []), internal=True)
        job, j, tid = fn.args[:3]
        T, I, ostride = field(b, job, J["T"]), field(b, job, J["I"]), field(b, job, J["OSTRIDE"])
        out = field(b, job, J["OUT"], True)
        stok, sw_, act, off = (field(b, job, J[n], True) for n in ("STOK", "SW", "ACT", "OFF"))
        nact = field(b, job, J["NACT"])
        R, NT = self.dn.R, self.tiles.tokens
        r0, nrows, is_main = self._down_rows(b, job, j)
        groups = b.udiv(nrows, i64(R))
        if ready:
            prof = sched._Profile(b, fn.args[3], tid, self.tiles.profile)
        if self.count_ready:
            ready_ctr = field(b, job, J["READY"], True)
            n_gateup = b.udiv(I, i64(self.tiles.rows_up))   # gate/up tasks per expert
        with for_range(b, 0, T, name="zt") as t:
            with for_range(b, 0, nrows, name="zr") as r:
                store(b, c(F32, 0.0), out, b.add(b.mul(t, ostride), b.add(r0, r)), align=4)
        buf = local(b, ir.ArrayType(F32, R * NT))
        rows = self._act_rows(b, job, "h")
        vf = vec(F32, R)

        def add_out(b, slot, row0, v):
            """out[token(slot), row0 : row0 + R] += w(slot) * v."""
            t = b.sext(load(b, stok, I32, slot, align=4), I64)
            dst = gep(b, out, b.add(b.mul(t, ostride), row0), F32)
            w = vmath.splat_scalar(b, load(b, sw_, F32, slot, align=4), R)
            b.store(fma(b, w, v, b.load(dst, typ=vf, align=4)), dst, align=4)

        with for_range(b, 0, nact, name="a") as a:
            e = b.sext(load(b, act, I32, a, align=4), I64)
            s_beg = b.sext(load(b, off, I32, e, align=4), I64)
            s_end = b.sext(load(b, off, I32, b.add(e, i64(1)), align=4), I64)
            if self.count_ready:   # the expert's h rows: all its gate/up tasks counted (acquire), and its int8
                #                    h rows when down takes the i8row kernel; timed only if not yet
                idx = b.mul(a, i64(8))
                want = n_gateup
                if self.h_row:
                    want = b.add(want, b.zext(self._row_down_expert(b, b.sub(s_end, s_beg)), I64))
                if ready:
                    with b.if_then(b.icmp_signed("!=", sched.aload(b, ready_ctr, idx), want)):
                        with prof(b, "bar1"):
                            sched.spin_until_equal(b, ready_ctr, idx, want, "ready")
                else:   # after barrier 1 only an i8row expert's quantizing task can still be at work
                    with b.if_then(self._row_down_expert(b, b.sub(s_end, s_beg))):
                        sched.spin_until_equal(b, ready_ctr, idx, want, "ready")

            def vec_path(b):
                with for_range(b, 0, groups, name="gi") as gi:
                    row0 = b.add(r0, b.mul(gi, i64(R)))
                    w = self._weights(b, job, "D", e, b.udiv(row0, i64(R)), I)
                    if self.tiles.prefetch_next:
                        self._prefetch_next_down(b, job, a, nact, gi, groups, r0, I)

                    def epilogue(b, s0, m):
                        with for_range(b, 0, m, name="ep") as n:
                            add_out(b, b.add(s0, n), row0, load(b, buf, vf, b.mul(n, i64(R)), align=4))
                    self._vec_calls(b, self.dn, s_beg, s_end, rows, (w,), (buf,), epilogue)

            if self.dn.amx:
                use_amx = b.icmp_signed(">=", b.sub(s_end, s_beg), i64(self.tiles.amx_min_slots))
                if is_main is not None and self.tiles.tail_task_rows % 32:   # AMX runs row pairs of 16
                    use_amx = b.and_(use_amx, is_main)
                with b.if_else(use_amx) as (then, otherwise):
                    with then:
                        self._down_amx(b, job, tid, e, s_beg, s_end, r0, nrows, add_out)
                    with otherwise:
                        vec_path(b)
            else:
                vec_path(b)
        b.ret_void()
        return fn

    @contextmanager
    def _amx_slot_chunks(self, b, job, tid, side, s_beg, s_end, k, pre, acc_name):
        """One phase's AMX frame: activations `pre` (X: x, k = H; H: h, k = I), the worker's bf16
        weight buffer and an accumulator. Per chunk of up to amx_max_slots slots of [s_beg, s_end)
        yields (s0, m, accbuf, call): call(weights, bounds) runs the phase's AMX kernel on those m slots
        (bounds: the two row groups' kept row bounds, which only the i8row kernel reads)."""
        nb = b.udiv(k, i64(32))
        q, d, t, bf = (field(b, job, J[pre + n], True) for n in "QDTB")
        bbuf = gep(b, field(b, job, J["AMXB"], True), b.mul(tid, field(b, job, J["AMXB_STRIDE"])))
        MS, R = self.tiles.amx_max_slots, side.R
        accbuf = local(b, ir.ArrayType(F32, 2 * MS * R), name=acc_name)
        accbuf.align = 64
        with for_range(b, s_beg, s_end, step=MS, name="amxs") as s0:
            m = b.sub(s_end, s0)
            m = b.select(b.icmp_signed("<", m, i64(MS)), m, i64(MS))

            def call(weights, bounds):
                acc = [b.bitcast(accbuf, PTR), i64(MS * R * 4)]
                row_args = None
                if side.amx_row is not None:
                    xr, xrs = field(b, job, J[pre + "R"], True), field(b, job, J[pre + "RS"], True)
                    row_args = lambda: [nb, m, gep(b, xr, b.mul(s0, k)), k, gep(b, xrs, s0, F32), *weights, *acc, bbuf,
                                        *bounds]
                self._amx_call(b, side, b.sub(s_end, s_beg),
                               lambda: [nb, m, gep(b, bf, b.mul(s0, k), I16), b.mul(k, i64(2)), *weights, *acc, bbuf],
                               lambda: [nb, m, gep(b, q, b.mul(s0, k)), k, gep(b, d, b.mul(s0, nb), F32),
                                        gep(b, t, b.mul(s0, nb), F32), nb, *weights, *acc], row_args)
            yield s0, m, accbuf, call

    def _amx_call(self, b, side, nslots, bf16_args, int8_args, row_args=None):
        """The AMX kernel of the mode; "mixed": bf16 (or i8row, row_args given) for experts with >=
        amx_bf16_min_slots slots (dequantization amortized over enough slots), int8 below."""
        mode = self.tiles.amx_mode
        big_fn, big_args = (side.amx_row, row_args) if row_args else (side.amx_bf, bf16_args)
        if not supports_amx(side.geo):   # only i8row runs this format: every AMX expert
            b.call(big_fn, big_args())
            return
        if mode != "mixed":
            b.call(big_fn if mode == "bf16" else side.amx_i8, big_args() if mode == "bf16" else int8_args())
            return
        with b.if_else(b.icmp_signed(">=", nslots, i64(self.tiles.amx_bf16_min_slots))) as (big, small):
            with big:
                b.call(big_fn, big_args())
            with small:
                b.call(side.amx_i8, int8_args())

    def _prefetch_next_down(self, b, job, a, nact, gi, groups, r0, I):
        """Head of the weights the next vector call of this down task reads: the next row group of
        this expert, or the first of the next active expert."""
        R = self.dn.R
        last = b.icmp_signed("==", gi, b.sub(groups, i64(1)))
        with b.if_else(last) as (then, otherwise):
            with then:
                with b.if_then(b.icmp_signed("<", b.add(a, i64(1)), nact)):
                    e2 = b.sext(load(b, field(b, job, J["ACT"], True), I32, b.add(a, i64(1)), align=4), I64)
                    self._prefetch_head(b, self.dn, self._weights(b, job, "D", e2, b.udiv(r0, i64(R)), I))
            with otherwise:
                e = b.sext(load(b, field(b, job, J["ACT"], True), I32, a, align=4), I64)
                grp = b.add(b.udiv(r0, i64(R)), b.add(gi, i64(1)))
                self._prefetch_head(b, self.dn, self._weights(b, job, "D", e, grp, I))

    def _down_amx(self, b, job, tid, e, s_beg, s_end, r0, nrows, add_out):
        """Every slot of expert e against pairs of 16-row groups of down (rows r0 .. r0 + nrows)."""
        I = field(b, job, J["I"])
        MS, R = self.tiles.amx_max_slots, self.dn.R
        vf = vec(F32, R)
        with self._amx_slot_chunks(b, job, tid, self.dn, s_beg, s_end, I, "H", "amx_acc_d") as (s0, m, accbuf, call):
            with for_range(b, 0, b.udiv(nrows, i64(32)), name="pair") as p:
                row0 = b.add(r0, b.mul(p, i64(32)))
                grp = b.udiv(row0, i64(R))
                w0 = self._weights(b, job, "D", e, grp, I)[:3]
                w1 = self._weights(b, job, "D", e, b.add(grp, i64(1)), I)[:3]
                H = field(b, job, J["H"])
                call([*w0, *w1], [self._row_bounds(b, job, "D", e, g, H) for g in (grp, b.add(grp, i64(1)))])
                with for_range(b, 0, m, name="dep") as n:
                    for half in range(2):
                        v = load(b, accbuf, vf, b.add(b.mul(n, i64(R)), i64(half * MS * R)), align=64)
                        add_out(b, b.add(s0, n), b.add(row0, i64(half * R)), v)

    # ------------------------------------------------------------ pool

    def build(self) -> str:
        route = self._emit_route()
        quant_x = self._emit_quant_rows() if self.gu.quant else None
        early = self._emit_prefetch_gateup() if self.tiles.prefetch_first else None
        sched.emit_run_job(self.m, route, quant_x, self._emit_gateup(), self._emit_down(), self.tiles.profile,
                           self.tiles.expert_ready, early)
        sched.emit_worker(self.m)
        sched.emit_submit_wait(self.m)
        return str(self.m)


def supports_amx(geo: Geometry) -> bool:
    """The exact AMX kernels (amx.py, amx_bf16.py): 16-row groups, one scale per 32 weights, unsigned
    payload (VNNI q8_0, q4_0, q4_k)."""
    return geo.fmt != "bf16" and geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed


def supports_i8row(geo: Geometry) -> bool:
    """The i8row kernel: those formats and q6_k (a scale per 16 weights)."""
    return geo.fmt != "bf16" and geo.group_rows == 16 and geo.scale_group in (16, 32) and not geo.signed


def phase_amx(geo: Geometry, row: bool) -> bool:
    """A phase in this format runs AMX tiles (given Tiles.amx): an exact kernel, or i8row if asked for."""
    return supports_amx(geo) or (row and supports_i8row(geo))


def build_ir(geo: Geometry, isa: Isa, tiles: Tiles, down_geo: Geometry | None = None) -> str:
    """Pure: the whole native MoE library for one ISA and tiling, gate/up in geo's format and down in
    down_geo's (default: the same), as LLVM IR text."""
    return _Builder(geo, isa, tiles, down_geo).build()
