"""The fused MoE job as native code: routing, activation quantization, gate/up+SiLU, down+weighted sum
(the worker loop and submit/wait come from sched.py). `build_ir(geo, isa, tiles)` is a pure function
-> IR text.

A job runs in three phases of tasks, claimed in order from one atomic counter:
  0: task 0 groups the T*k (token, expert) slots by expert (counting sort); tasks 1.. quantize x rows
  1: (active expert, block of ROWS_UP rows of I): h = silu(gate.x) * (up.x) for the expert's slots,
     then those h columns quantized to int8 blocks (ROWS_UP is a multiple of 32)
  2: block of ROWS_DOWN rows of H: out[t, rows] = sum over slots of w * (down_e . h_slot)[rows];
     one task owns its output rows for every token, so no atomics on the output
A task of phase p waits (spinning) until every task of phase p-1 is done; tasks are claimed in order,
so the earlier tasks are already running and this cannot deadlock.
"""
from dataclasses import dataclass

from llvmlite import ir

from ..isa import Isa
from ..layout import BLOCK, Geometry
from . import amx, dot, sched
from .fields import J
from .irutil import F32, I8, I32, I64, PTR, VOID, c, define, field, for_range, gep, i64, intrinsic, load, local, \
    shuffle, store, vec


@dataclass(frozen=True)
class Tiles:
    rows_up: int = 32     # rows of I per phase-1 task (multiple of 32 and of G)
    rows_down: int = 32   # rows of H per phase-2 task (multiple of G)
    tokens: int = 2       # activation rows per microkernel call (register blocking)
    quant_rows: int = 8   # x rows quantized per phase-0 task
    prefetch: int = 2048  # software prefetch distance (bytes) along a row group's payload stream
    amx: bool = False     # AMX tiles for experts with at least amx_min_slots slots
    amx_min_slots: int = 16  # measured on the GPU machine (NOTES.md): 16 best at 2048 tokens


class _Builder:
    """Emits one module for one (format, ISA, tiles)."""

    def __init__(self, geo: Geometry, isa: Isa, tiles: Tiles):
        self.R = R = geo.group_rows
        assert tiles.rows_up % 32 == 0 and tiles.rows_up % R == 0 and tiles.rows_down % R == 0
        self.geo, self.isa, self.tiles = geo, isa, tiles
        self.quant = geo.fmt != "bf16"
        self.amx_on = tiles.amx
        self.m = ir.Module(name=f"hmoe_{geo.fmt}_{isa.name}")
        if self.quant:
            self.dots = [dot.emit_quant_dot(self.m, geo, isa, nt, tiles.prefetch) for nt in range(1, tiles.tokens + 1)]
            self.qblock = self._emit_quant_block()
            self.amx_dot = {n: amx.emit_amx_dot(self.m, geo, tiles.prefetch, n) for n in (1, 2)} if tiles.amx else None
            if tiles.amx:
                assert isa.amx and supports_amx(geo)
                self.memcpy = intrinsic(self.m, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, ir.IntType(1)])
        else:
            self.dots = [dot.emit_bf16_dot(self.m, geo, isa, nt, tiles.prefetch) for nt in range(1, tiles.tokens + 1)]

    # ------------------------------------------------------------ activation quantization
    def _emit_quant_block(self):
        """void quant_block(src f32[32], q i8[32], d f32[1], s i32[2], t f32[1]): int8 codes with scale
        amax/127, the sum of the codes of each half (vector kernels) and the AMX term (see amx.py)."""
        fn, b = define(self.m, "quant_block", VOID, [PTR] * 5, internal=True)
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
        # the AMX epilogue's activation term: -offset*d*sum (offset formats) or d*sum (q4_k's bias)
        term = b.fmul(d, b.sitofp(b.add(*halves), F32))
        if self.geo.offset:
            term = b.fmul(term, c(F32, -float(self.geo.offset)))
        store(b, term, tptr, align=4)
        b.ret_void()
        return fn

    # ------------------------------------------------------------ phase 0
    def _emit_route(self):
        """Counting sort of slots by expert: OFF[E+1], STOK/SW in expert order, ACT list, N1."""
        fn, b = define(self.m, "task_route", VOID, [PTR], internal=True)
        job = fn.args[0]
        T, K, E, I = (field(b, job, J[n]) for n in ("T", "TOPK", "E", "I"))
        ids, w = field(b, job, J["IDS"], True), field(b, job, J["W"], True)
        cnt, off = field(b, job, J["CNT"], True), field(b, job, J["OFF"], True)
        stok, sw, act = (field(b, job, J[n], True) for n in ("STOK", "SW", "ACT"))
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
                b.store(b.add(a, i64(1)), nact)
        with for_range(b, 0, nslots, name="f") as s:
            e = load(b, ids, I64, s, align=8)
            p = gep(b, cnt, e, I32)
            pos = b.load(p, typ=I32, align=4)
            b.store(b.add(pos, c(I32, 1)), p, align=4)
            store(b, b.trunc(b.udiv(s, K), I32), stok, pos, align=4)
            store(b, load(b, w, F32, s, align=4), sw, pos, align=4)
        na = b.load(nact, typ=I64)
        store(b, na, job, J["NACT"], align=8)
        store(b, b.mul(na, b.udiv(I, i64(self.tiles.rows_up))), job, J["N1"], align=8)
        b.ret_void()
        return fn

    def _emit_quant_rows(self):
        """Quantize x rows [r0, r1) into XQ/XD/XS."""
        fn, b = define(self.m, "task_quant_x", VOID, [PTR, I64], internal=True)
        job, idx = fn.args
        T, H, xstride = (field(b, job, J[n]) for n in ("T", "H", "XSTRIDE"))
        x, xq, xd, xs, xt = (field(b, job, J[n], True) for n in ("X", "XQ", "XD", "XS", "XT"))
        r0 = b.mul(idx, i64(self.tiles.quant_rows))
        r1 = b.add(r0, i64(self.tiles.quant_rows))
        r1 = b.select(b.icmp_signed("<", r1, T), r1, T)
        nblk = b.udiv(H, i64(32))
        with for_range(b, r0, r1, name="t") as t:
            with for_range(b, 0, nblk, name="blk") as k:
                src = gep(b, x, b.add(b.mul(t, xstride), b.mul(k, i64(32))), F32)
                row_blk = b.add(b.mul(t, nblk), k)
                b.call(self.qblock, [src, gep(b, xq, b.mul(row_blk, i64(32))), gep(b, xd, row_blk, F32),
                                     gep(b, xs, b.mul(row_blk, i64(2)), I32), gep(b, xt, row_blk, F32)])
        b.ret_void()
        return fn

    # ------------------------------------------------------------ microkernel calls
    def _call_dots(self, b, s, s_end, slot_act, pay, sc, bias, nchunks, outbuf, epilogue, amx_rows=None):
        """For slot chunks [s, s_end): dot_n{m} into outbuf (f32[G*m]) then epilogue(b, slot, g, value)."""
        NT = self.tiles.tokens
        if amx_rows is not None:
            use_amx = b.icmp_signed(">=", b.sub(s_end, s), i64(self.tiles.amx_min_slots))
            with b.if_else(use_amx) as (then, otherwise):
                with then:
                    with for_range(b, s, s_end, step=amx.TOKENS, name="amx") as s0:
                        m = b.sub(s_end, s0)
                        m = b.select(b.icmp_signed("<", m, i64(amx.TOKENS)), m, i64(amx.TOKENS))
                        A, lda, D, Tm, ldd = amx_rows(b, s0)
                        b.call(self.amx_dot[1], [nchunks, A, lda, D, Tm, ldd, pay, sc, bias, outbuf])
                        with for_range(b, 0, m, name="amx_ep") as n:
                            for g in range(self.R):
                                v = load(b, outbuf, F32, b.add(b.mul(n, i64(self.R)), i64(g)), align=4)
                                epilogue(b, b.add(s0, n), g, v)
                with otherwise:
                    self._call_dots(b, s, s_end, slot_act, pay, sc, bias, nchunks, outbuf, epilogue)
            return
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
                if self.quant:
                    args = [pay, sc, bias, nchunks] + [a[0] for a in acts] + [a[1] for a in acts] + \
                           [a[2] for a in acts] + [outbuf]
                else:
                    args = [pay, nchunks] + acts + [outbuf]
                b.call(self.dots[nt - 1], args)
                b.branch(end)
            b.position_at_end(end)
            with for_range(b, 0, m, name="ep_n") as n:
                for g in range(self.R):
                    v = load(b, outbuf, F32, b.add(b.mul(n, i64(self.R)), i64(g)), align=4)
                    epilogue(b, b.add(s0, n), g, v)

    def _weights(self, b, job, prefix, e, grp, k):
        """Pointers of row group grp of expert e's matrix (prefix 'G', 'U' or 'D'), and its chunk count."""
        geo = self.geo
        pe = field(b, job, J["D_PAY_E" if prefix == "D" else "GU_PAY_E"])
        se = field(b, job, J["D_SC_E" if prefix == "D" else "GU_SC_E"])
        if self.quant:  # nchunks counts 32-weight blocks
            nchunks = b.udiv(k, i64(BLOCK))
            grp_pay = b.mul(nchunks, i64(geo.block_payload_bytes))
        else:
            nchunks = b.udiv(k, i64(geo.k_align))
            grp_pay = b.mul(nchunks, i64(self.R * geo.vector_bytes))
        pay = gep(b, field(b, job, J[prefix + "P"], True), b.add(b.mul(e, pe), b.mul(grp, grp_pay)))
        if not self.quant:
            return pay, None, None, nchunks
        grp_sc = b.mul(nchunks, i64(self.R * geo.scales_per_block * 2))
        soff = b.add(b.mul(e, se), b.mul(grp, grp_sc))
        sc = gep(b, field(b, job, J[prefix + "S"], True), soff)
        bias = gep(b, field(b, job, J[prefix + "B"], True), soff)
        return pay, sc, bias, nchunks

    def _act_rows(self, b, job, which):
        """slot -> activation pointers: 'x' (by token of the slot) or 'h' (by slot)."""
        stok = field(b, job, J["STOK"], True)
        if which == "x":
            k, names = field(b, job, J["H"]), ("XQ", "XD", "XS")
        else:
            k, names = field(b, job, J["I"]), ("HQ", "HD", "HS")
        bases = [field(b, job, J[n], True) for n in names]
        x, xstride, hf = field(b, job, J["X"], True), field(b, job, J["XSTRIDE"]), field(b, job, J["HF"], True)

        def rows(b, slot):
            r = b.sext(load(b, stok, I32, slot, align=4), I64) if which == "x" else slot
            if not self.quant:
                return gep(b, x, b.mul(r, xstride), F32) if which == "x" else gep(b, hf, b.mul(r, k), F32)
            return (gep(b, bases[0], b.mul(r, k)), gep(b, bases[1], b.mul(r, b.udiv(k, i64(32))), F32),
                    gep(b, bases[2], b.mul(r, b.udiv(k, i64(16))), I32))
        return rows

    # ------------------------------------------------------------ phase 1
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
        gbuf = local(b, ir.ArrayType(F32, self.R * self.tiles.tokens))
        ubuf = local(b, ir.ArrayType(F32, self.R * self.tiles.tokens))
        rows = self._act_rows(b, job, "x")
        expf = intrinsic(self.m, "llvm.exp.f32", F32, [F32])
        if self.amx_on:
            use_amx = b.icmp_signed(">=", b.sub(s_end, s_beg), i64(self.tiles.amx_min_slots))
            with b.if_else(use_amx) as (then, otherwise):
                with then:
                    self._gateup_amx(b, job, tid, e, rb, s_beg, s_end, expf)
                with otherwise:
                    self._gateup_vec(b, job, e, rb, s_beg, s_end, rows, gbuf, ubuf, expf)
        else:
            self._gateup_vec(b, job, e, rb, s_beg, s_end, rows, gbuf, ubuf, expf)
        self._quantize_h(b, job, rb, s_beg, s_end)
        b.ret_void()
        return fn

    def _store_h(self, b, job, gbuf, ubuf, expf, s0, m, row0):
        """h[s0 + n, row0 + g] = silu(gate) * up for n < m, g < R (buffers [n][R])."""
        I, hf = field(b, job, J["I"]), field(b, job, J["HF"], True)
        with for_range(b, 0, m, name="ep") as n:
            for g in range(self.R):
                idx = b.add(b.mul(n, i64(self.R)), i64(g))
                gv = load(b, gbuf, F32, idx, align=4)
                uv = load(b, ubuf, F32, idx, align=4)
                silu = b.fdiv(gv, b.fadd(c(F32, 1.0), b.call(expf, [b.fsub(c(F32, 0.0), gv)])))
                dst = b.add(b.mul(b.add(s0, n), I), b.add(row0, i64(g)))
                store(b, b.fmul(silu, uv), hf, dst, align=4)

    def _gateup_amx(self, b, job, tid, e, rb, s_beg, s_end, expf):
        """16 slots at a time: gather their x rows (int8, scales, sums) into this worker's scratch, then
        AMX gate and up products for each row group of the task."""
        H = field(b, job, J["H"])
        T16 = amx.TOKENS
        scratch = gep(b, field(b, job, J["GATHER"], True), b.mul(tid, field(b, job, J["GATHER_STRIDE"])))
        nb32 = b.udiv(H, i64(32))
        A = scratch
        D = gep(b, A, b.mul(H, i64(T16)))
        Tm = gep(b, D, b.mul(nb32, i64(4 * T16)))
        stok = field(b, job, J["STOK"], True)
        xq, xd, xt = (field(b, job, J[n], True) for n in ("XQ", "XD", "XT"))
        gbuf = local(b, ir.ArrayType(F32, self.R * T16))
        ubuf = local(b, ir.ArrayType(F32, self.R * T16))
        RU = self.tiles.rows_up
        with for_range(b, s_beg, s_end, step=T16, name="amx") as s0:
            m = b.sub(s_end, s0)
            m = b.select(b.icmp_signed("<", m, i64(T16)), m, i64(T16))
            with for_range(b, 0, m, name="gather") as n:
                t = b.sext(load(b, stok, I32, b.add(s0, n), align=4), I64)
                for dst, src, nbytes in ((gep(b, A, b.mul(n, H)), gep(b, xq, b.mul(t, H)), H),
                                         (gep(b, D, b.mul(n, b.mul(nb32, i64(4)))), gep(b, xd, b.mul(t, b.mul(nb32, i64(4)))),
                                          b.mul(nb32, i64(4))),
                                         (gep(b, Tm, b.mul(n, b.mul(nb32, i64(4)))), gep(b, xt, b.mul(t, b.mul(nb32, i64(4)))),
                                          b.mul(nb32, i64(4)))):
                    b.call(self.memcpy, [dst, src, nbytes, ir.Constant(ir.IntType(1), 0)])
            with for_range(b, 0, RU // self.R, name="gi") as gi:
                row0 = b.add(b.mul(rb, i64(RU)), b.mul(gi, i64(self.R)))
                grp = b.udiv(row0, i64(self.R))
                gp, gs, gb, nch = self._weights(b, job, "G", e, grp, H)
                up, us, ub, _ = self._weights(b, job, "U", e, grp, H)
                b.call(self.amx_dot[2], [nch, A, H, D, Tm, nb32, gp, gs, gb, gbuf, up, us, ub, ubuf])
                self._store_h(b, job, gbuf, ubuf, expf, s0, m, row0)

    def _gateup_vec(self, b, job, e, rb, s_beg, s_end, rows, gbuf, ubuf, expf):
        H = field(b, job, J["H"])
        RU, NT = self.tiles.rows_up, self.tiles.tokens
        with for_range(b, 0, RU // self.R, name="gi") as gi:
            row0 = b.add(b.mul(rb, i64(RU)), b.mul(gi, i64(self.R)))
            grp = b.udiv(row0, i64(self.R))
            gw = self._weights(b, job, "G", e, grp, H)
            uw = self._weights(b, job, "U", e, grp, H)

            # gate and up for the same slot chunk, then h = silu(g) * u
            with for_range(b, s_beg, s_end, step=NT, name="sc") as s0:
                rem = b.sub(s_end, s0)
                m = b.select(b.icmp_signed("<", rem, i64(NT)), rem, i64(NT))
                end = b.append_basic_block("gu.end")
                sw = b.switch(m, end)
                for nt in range(1, NT + 1):
                    blk = b.append_basic_block(f"gu.n{nt}")
                    sw.add_case(i64(nt), blk)
                    b.position_at_end(blk)
                    acts = [rows(b, b.add(s0, i64(n))) for n in range(nt)]
                    for (pay, sc, bias, nch), buf in ((gw, gbuf), (uw, ubuf)):
                        if self.quant:
                            args = [pay, sc, bias, nch] + [x[0] for x in acts] + [x[1] for x in acts] + \
                                   [x[2] for x in acts] + [b.bitcast(buf, PTR)]
                        else:
                            args = [pay, nch] + acts + [b.bitcast(buf, PTR)]
                        b.call(self.dots[nt - 1], args)
                    b.branch(end)
                b.position_at_end(end)
                self._store_h(b, job, gbuf, ubuf, expf, s0, m, row0)

    def _quantize_h(self, b, job, rb, s_beg, s_end):
        """The task's ROWS_UP columns of h, for each of its slots, to int8 blocks."""
        if self.quant:
            I, hf, RU = field(b, job, J["I"]), field(b, job, J["HF"], True), self.tiles.rows_up
            hq, hd, hs, ht = (field(b, job, J[n], True) for n in ("HQ", "HD", "HS", "HT"))
            nblk_row = b.udiv(I, i64(32))
            with for_range(b, s_beg, s_end, name="qs") as s:
                with for_range(b, 0, RU // 32, name="qb") as qb:
                    col = b.add(b.mul(rb, i64(RU)), b.mul(qb, i64(32)))
                    blk = b.add(b.mul(s, nblk_row), b.udiv(col, i64(32)))
                    b.call(self.qblock, [gep(b, hf, b.add(b.mul(s, I), col), F32), gep(b, hq, b.mul(blk, i64(32))),
                                         gep(b, hd, blk, F32), gep(b, hs, b.mul(blk, i64(2)), I32),
                                         gep(b, ht, blk, F32)])

    # ------------------------------------------------------------ phase 2
    def _emit_down(self):
        fn, b = define(self.m, "task_down", VOID, [PTR, I64], internal=True)
        job, j = fn.args
        T, I, ostride = field(b, job, J["T"]), field(b, job, J["I"]), field(b, job, J["OSTRIDE"])
        out = field(b, job, J["OUT"], True)
        stok, sw_, act, off = (field(b, job, J[n], True) for n in ("STOK", "SW", "ACT", "OFF"))
        nact = field(b, job, J["NACT"])
        RD = self.tiles.rows_down
        r0 = b.mul(j, i64(RD))
        with for_range(b, 0, T, name="zt") as t:
            with for_range(b, 0, RD, name="zr") as r:
                store(b, c(F32, 0.0), out, b.add(b.mul(t, ostride), b.add(r0, r)), align=4)
        NT = self.tiles.tokens
        buf = local(b, ir.ArrayType(F32, self.R * max(NT, amx.TOKENS if self.amx_on else 0)))
        rows = self._act_rows(b, job, "h")
        amx_rows = None
        if self.amx_on:
            hq, hd, ht = (field(b, job, J[n], True) for n in ("HQ", "HD", "HT"))

            def amx_rows(b, s0):  # slots are consecutive rows of HQ/HD/HT (padded by 16 rows)
                nb = b.udiv(I, i64(32))
                return (gep(b, hq, b.mul(s0, I)), I, gep(b, hd, b.mul(s0, nb), F32), gep(b, ht, b.mul(s0, nb), F32), nb)
        with for_range(b, 0, nact, name="a") as a:
            e = b.sext(load(b, act, I32, a, align=4), I64)
            s_beg = b.sext(load(b, off, I32, e, align=4), I64)
            s_end = b.sext(load(b, off, I32, b.add(e, i64(1)), align=4), I64)
            with for_range(b, 0, RD // self.R, name="gi") as gi:
                row0 = b.add(r0, b.mul(gi, i64(self.R)))
                pay, sc, bias, nch = self._weights(b, job, "D", e, b.udiv(row0, i64(self.R)), I)

                def epilogue(b, slot, g, v):
                    t = b.sext(load(b, stok, I32, slot, align=4), I64)
                    dst = gep(b, out, b.add(b.mul(t, ostride), b.add(row0, i64(g))), F32)
                    b.store(b.fadd(b.load(dst, typ=F32, align=4), b.fmul(load(b, sw_, F32, slot, align=4), v)),
                            dst, align=4)
                self._call_dots(b, s_beg, s_end, rows, pay, sc, bias, nch, buf, epilogue, amx_rows)
        b.ret_void()
        return fn

    # ------------------------------------------------------------ pool

    def build(self) -> str:
        route = self._emit_route()
        quant_x = self._emit_quant_rows() if self.quant else None
        run_job = sched.emit_run_job(self.m, route, quant_x, self._emit_gateup(), self._emit_down())
        sched.emit_worker(self.m, run_job)
        sched.emit_submit_wait(self.m)
        return str(self.m)


def supports_amx(geo: Geometry) -> bool:
    """AMX path: 16-row groups, one scale per 32 weights, unsigned payload (VNNI q8_0, q4_0, q4_k)."""
    return geo.fmt != "bf16" and geo.group_rows == 16 and geo.scale_group == 32 and not geo.signed


def build_ir(geo: Geometry, isa: Isa, tiles: Tiles) -> str:
    """Pure: the whole native MoE library for one format, ISA and tiling, as LLVM IR text."""
    return _Builder(geo, isa, tiles).build()
