"""CPUExperts: one MoE layer's routed experts on the CPU (the fused op the model calls).

    experts = CPUExperts.from_tensors(gate, up, down, fmt="q4_k", threads=16, numa="interleave")
    experts = CPUExperts.from_blocks(gate, up, down, fmt="q4_k", down_fmt="q6_k", hidden=H, inter=I)
    out = experts.forward(hidden, topk_ids, topk_weights)   # hidden [T, H] -> out [T, H]
    experts.submit(hidden, topk_ids, topk_weights); ...; out = experts.wait()

out[t] = sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, j]. gate/up: [E, I, H],
down: [E, H, I] (the checkpoint's [out, in] orientation). gate and up share one format (`fmt`); down
may have its own (`down_fmt`, default fmt), as llama.cpp's Q4_K_M files do (Q4_K gate/up, Q6_K down).
"""
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import lru_cache

import numpy as np

from . import numa as numa_mod
from .codegen.fields import J, JOB_FIELDS
from .codegen.moe import SLOT_PAD, Tiles, build_ir, down_tasks, phase_amx, supports_amx, supports_i8row
from .formats import get_format, quantize
from .isa import Isa, host_isa
from .jit import Library
from .layout import Geometry, geometry, repack, repacked_bytes_per_weight
from .pool import WorkerPool, aligned_zeros


def default_tiles(isa: Isa, geo: Geometry, amx: bool | None = None, down_geo: Geometry | None = None) -> Tiles:
    """amx: None = use AMX where the host and a format allow it (a phase whose format AMX cannot run
    takes the vector kernels)."""
    down_geo = down_geo or geo
    rows = amx_defaults(geo, down_geo, int8_rows_choice())
    fmt_ok = phase_amx(geo, rows["amx_row"]) or phase_amx(down_geo, rows["amx_row_down"])
    use_amx = isa.amx and fmt_ok if amx is None else amx
    if use_amx and not (isa.amx and fmt_ok):
        raise ValueError(f"AMX needs an AMX host and q8_0, q4_0, q4_k or q6_k weights (host {isa.cpu}, format "
                         f"{_fmt_name(geo, down_geo)})")
    if use_amx and not enable_amx():
        use_amx = False
    # accumulators: one vector of R rows per token; AVX2 has 16 vector registers, AVX-512 32
    tokens = 8 if isa.vector_bytes == 64 else 4
    # the decode kernels' prefetch distance: on the AMX (Sapphire/Emerald Rapids) host, V3 layer, 16 threads,
    # 1 and 8 tokens, 4 KiB beat 2 KiB in 19 of 20 same-process pairs (0.1-3.8%); on the 2-core Skylake CI
    # box (V2-Lite q8_0, 2 threads) 2 KiB beat 4 KiB in 4 of 4 (1.6-4%) (cpu_experts/NOTES.md, session 8)
    # and into L2 (prefetcht1) rather than L1 there: faster in 21 of 24 same-process pairs over three calls
    # (by 0.3-2.7%; q4_k, q4_0, q8_0, bf16, Q4_K_M at 1 and 8 tokens; session 9); on the 2-core Skylake CI box
    # t1 lost at 8 tokens (6%, 2 of 2) and split at 1, so hosts without AMX keep prefetcht0
    pf = 4096 if isa.amx else 2048
    pf_kw = dict(prefetch=pf, prefetch_locality=2 if isa.amx else 3)
    if not use_amx:
        return Tiles(tokens=tokens, amx=False, **pf_kw)
    return Tiles(tokens=tokens, amx=True, **pf_kw, **rows)


INT8_ROWS_ENV = "HMOE_INT8_ROWS"
INT8_ROWS = ("auto", "on", "off")


def int8_rows_choice() -> str:
    """$HMOE_INT8_ROWS: which formats prefill on the i8row kernel (amx_defaults)."""
    value = os.environ.get(INT8_ROWS_ENV, "auto").strip().lower() or "auto"
    if value not in INT8_ROWS:
        raise ValueError(f"{INT8_ROWS_ENV} must be one of {', '.join(INT8_ROWS)}, got '{value}'")
    return value


def amx_defaults(geo: Geometry, down_geo: Geometry, int8_rows: str = "auto") -> dict:
    """The AMX kernels by format. int8_rows "auto": 4-bit phases take the i8row kernel from 8 slots
    per expert (V3 layer, nvidia-h200 host, 2048 tokens: 1.5-1.7x the bf16 kernel's GFLOP/s; output
    error 12.5 -> 12.8% for q4_k, against float64), and so does q6_k, which no exact AMX kernel runs
    (3.3 -> 4.3%); q8_0 keeps exact per-32 scales (int8 tiles with a float epilogue per block below
    24 slots, bf16 tiles above), because with i8row its error would grow from 1.5 to 3.6%
    (cpu_experts/NOTES.md, session 8). "on": i8row wherever it runs (q8_0 too); "off": exact scales
    everywhere (q6_k then prefills on the vector kernels)."""
    def row(g):
        if int8_rows == "off" or not supports_i8row(g):
            return False
        return int8_rows == "on" or g.nibbles or g.fmt == "q6_k"
    up, down = row(geo), row(down_geo)
    return dict(amx_row=up, amx_row_down=down, amx_bf16_min_slots=8 if up and down else 24)


def _geometry(fmt: str, isa: Isa, tiles: Tiles | None) -> Geometry:
    # AMX reads unsigned q8_0 codes (code+128), which the vector kernels read only with VNNI; an
    # emulated-AMX test on a host without VNNI sends every expert to AMX (amx_min_slots=1)
    unsigned = isa.vnni or bool(tiles and tiles.amx and tiles.amx_emulate)
    return geometry(fmt, isa.vector_bytes, unsigned, superblock=tiles is None or tiles.q4k_superblock)


def _fmt_name(geo: Geometry, down_geo: Geometry | None) -> str:
    return geo.fmt if down_geo is None or down_geo.fmt == geo.fmt else f"{geo.fmt} gate/up, {down_geo.fmt} down"


def _check_amx(tiles: Tiles, isa: Isa, geo: Geometry, down_geo: Geometry, hidden: int, inter: int):
    """Real tile instructions need an AMX host, a supported layout (in at least one phase) and the
    kernel's permission."""
    if not tiles.amx:
        return
    for on, name, k, what in ((tiles.amx_row, "amx_row", hidden, "hidden"),
                              (tiles.amx_row_down, "amx_row_down", inter, "inter")):
        if on and (tiles.amx_mode == "int8" or k % 64):
            raise ValueError(f"{name} (the i8row kernel) needs amx_mode bf16 or mixed and {what} divisible by 64, "
                             f"got {tiles.amx_mode} and {k}")
    if not (phase_amx(geo, tiles.amx_row) or phase_amx(down_geo, tiles.amx_row_down)):
        raise ValueError(f"AMX needs q8_0, q4_0 or q4_k weights (or q6_k with the i8row kernel) with 16-row groups, "
                         f"got {_fmt_name(geo, down_geo)} on {isa.name}")
    if phase_amx(down_geo, tiles.amx_row_down) and tiles.rows_down % 32:
        raise ValueError(f"AMX down tasks need rows_down divisible by 32, got {tiles.rows_down}")
    if not tiles.amx_emulate and not (isa.amx and enable_amx()):
        raise ValueError(f"AMX needs an AMX host that grants the tile state (host {isa.cpu})")


def _check_tail(tiles: Tiles, hidden: int):
    t, rt = tiles.tail_rows, tiles.tail_task_rows
    if t and (t > hidden or (hidden - t) % tiles.rows_down or t % rt):
        raise ValueError(f"tail_rows {t} must be at most hidden {hidden}, leave a multiple of rows_down "
                         f"{tiles.rows_down} and divide by tail_task_rows {rt}")


@lru_cache(maxsize=None)
def enable_amx() -> bool:
    """Ask Linux for the AMX tile state (once per process); without it the first tile op kills us."""
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
    return libc.syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


@lru_cache(maxsize=None)
def library(fmt: str, isa: Isa, tiles: Tiles, down_fmt: str | None = None) -> Library:
    down_geo = _geometry(down_fmt, isa, tiles) if down_fmt and down_fmt != fmt else None
    return Library(build_ir(_geometry(fmt, isa, tiles), isa, tiles, down_geo), isa)


_POOLS: dict = {}


def shared_pool(lib: Library, threads: int) -> WorkerPool:
    """One pool per (thread count, CPUs), whatever the library: every layer of a model shares its
    workers, also across format pairs (a job names its library's run function, job[RUN]), so no
    second set of workers pinned to the same cores spins while the other set works. `lib` supplies
    the worker loop of a pool started here (the pool keeps a reference to it)."""
    cpus = numa_mod.worker_cpus(threads)
    key = (threads, tuple(cpus))
    if key not in _POOLS or _POOLS[key].closed:
        _POOLS[key] = WorkerPool(lib, threads, cpus=cpus)
    return _POOLS[key]


def default_threads() -> int:
    return len(numa_mod.worker_cpus(None))


class _Matrix:
    """All E experts' repacked [n, k] matrices in policy-placed memory."""

    def __init__(self, geo: Geometry, E: int, n: int, k: int, policy: str, what: str):
        geo.check(n, k, what)
        blk = get_format(geo.fmt).block_elems
        if k % blk:
            raise ValueError(f"{what}: {geo.fmt} needs a row length divisible by {blk}, got {k}")
        self.pay_e = geo.payload_bytes(n, k)
        self.sc_e = geo.scale_bytes(n, k)
        self.has_bias = geo.bias
        self.payload = numa_mod.Buffer(E * self.pay_e, policy)
        self.scale = numa_mod.Buffer(max(E * self.sc_e, 64), policy)
        self.bias = numa_mod.Buffer(max(E * self.sc_e, 64), policy) if self.has_bias else self.scale
        self.rows = n
        # each row's largest possible |w|, kept by the i8row kernel after its first call (0 = not yet)
        self.bounds = numa_mod.Buffer(E * n * 4, policy)
        self.bounds.array(np.float32)[:] = 0.0

    def fill(self, e: int, packed: dict):
        self.bounds.array(np.float32, e * self.rows * 4, self.rows)[:] = 0.0   # new weights: bounds unknown
        self.payload.array(np.uint8, e * self.pay_e, self.pay_e)[:] = packed["payload"].view(np.uint8)
        if self.sc_e:
            self.scale.array(np.uint8, e * self.sc_e, self.sc_e)[:] = packed["scale"].view(np.uint8)
        if self.has_bias:
            self.bias.array(np.uint8, e * self.sc_e, self.sc_e)[:] = packed["bias"].view(np.uint8)

    def close(self):
        for buf in {id(b): b for b in (self.payload, self.scale, self.bias, self.bounds)}.values():
            buf.close()


def _each_expert(E: int, pack) -> None:
    """pack(e) for every expert, on all cores: numpy's quantize/repack release the GIL and each
    expert writes its own slice (a V3 layer is 256 experts; one thread took ~10 s per V2-Lite layer)."""
    with ThreadPoolExecutor(max_workers=min(E, os.cpu_count() or 1)) as pool:
        for _ in pool.map(pack, range(E)):
            pass  # re-raises the first error


def _quant_device(fmt: str) -> str:
    """numpy, cpu (torch) or cuda[:N]: formats_torch.quant_device, or numpy where torch is absent."""
    try:
        from . import formats_torch
    except ImportError:
        return "numpy"
    return formats_torch.quant_device(fmt)


def _as_numpy(x, dtype, name):
    if type(x).__module__.startswith("torch"):
        from . import torch_io
        return torch_io.to_numpy(x, dtype), True
    a = np.asarray(x)
    if a.dtype != dtype:
        if name == "topk_ids" and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got {a.dtype}")
        a = a.astype(dtype)
    return a, False


class CPUExperts:
    def __init__(self, *, fmt: str, num_experts: int, hidden: int, inter: int, threads: int | None = None,
                 numa: str = "interleave", isa: str | None = None, tiles: Tiles | None = None,
                 amx: bool | None = None, down_fmt: str | None = None):
        get_format(fmt)
        down_fmt = down_fmt or fmt
        get_format(down_fmt)
        self.fmt, self.down_fmt, self.E, self.H, self.I = fmt, down_fmt, num_experts, hidden, inter
        self.isa = host_isa(isa)
        self.geo = _geometry(fmt, self.isa, tiles)
        self.down_geo = _geometry(down_fmt, self.isa, tiles)
        self.threads = threads or default_threads()
        self.tiles = tiles or default_tiles(self.isa, self.geo, amx, self.down_geo)
        if tiles is None and (hidden % 64 or inter % 64):   # the i8row kernel takes K in 64-wide tiles
            self.tiles = replace(self.tiles, amx_row=False, amx_row_down=False, amx_bf16_min_slots=24)
        # 32 rows per down task where 64 need H % 64 != 0, or give under 3 tasks per worker and 32 give
        # at least 3: one V2-Lite layer (H 2048) is 32 tasks of 64 rows for 15-16 workers, 2.1 rounds
        # where 3 run; 32 rows were 3-5% faster there at 1 token (`...-h200-v2lite-cpu-experts-rd32-*.json`)
        few_tasks = hidden // self.tiles.rows_down < 3 * self.threads <= hidden // 32
        if tiles is None and hidden % 32 == 0 and (hidden % self.tiles.rows_down or few_tasks):
            self.tiles = replace(self.tiles, rows_down=32)
        # and there no barrier 1 (down waits per expert) and the last quarter of H in 16-row tasks for
        # jobs of <= 8 tokens: V2-Lite, 15 workers, 1 token, bound native submit/wait over 26 layers:
        # -12 to -18 us per layer (-2.5 to -3.6%) in 4 of 4 comparisons over two device runs (NOTES.md)
        tail = hidden // 4 // 32 * 32
        if tiles is None and few_tasks and tail and self.tiles.rows_down == 32:
            self.tiles = replace(self.tiles, expert_ready=True, tail_rows=tail, tail_task_rows=16)
        _check_amx(self.tiles, self.isa, self.geo, self.down_geo, hidden, inter)
        if inter % self.tiles.rows_up or hidden % self.tiles.rows_down:
            raise ValueError(f"inter {inter} must divide by {self.tiles.rows_up} and hidden {hidden} by "
                             f"{self.tiles.rows_down}")
        _check_tail(self.tiles, hidden)
        self.numa = numa_mod.effective_policy(numa)
        self.gate = _Matrix(self.geo, num_experts, inter, hidden, self.numa, "gate")
        self.up = _Matrix(self.geo, num_experts, inter, hidden, self.numa, "up")
        self.down = _Matrix(self.down_geo, num_experts, hidden, inter, self.numa, "down")
        self.lib = library(fmt, self.isa, self.tiles, down_fmt)
        self.pool = shared_pool(self.lib, self.threads)
        self.job = aligned_zeros(len(JOB_FIELDS), np.int64)
        self._capacity = (0, 0)
        self._pending = None
        self._owner = True
        self._write_static_fields()

    # ------------------------------------------------------------ construction
    def retiled(self, tiles: Tiles) -> "CPUExperts":
        """The same weights (shared memory, same layout) with another tiling: benchmarks compare
        kernel variants on one copy of a layer. Close only the original."""
        if (_geometry(self.fmt, self.isa, tiles), _geometry(self.down_fmt, self.isa, tiles)) != (self.geo, self.down_geo):
            raise ValueError("retiled: that tiling needs another weight layout")
        _check_amx(tiles, self.isa, self.geo, self.down_geo, self.H, self.I)
        _check_tail(tiles, self.H)
        other = object.__new__(CPUExperts)
        other.__dict__.update(self.__dict__)
        other.tiles = tiles
        other.lib = library(self.fmt, self.isa, tiles, self.down_fmt)
        other.pool = shared_pool(other.lib, self.threads)
        other.job = aligned_zeros(len(JOB_FIELDS), np.int64)
        other._capacity, other._pending, other._owner = (0, 0), None, False
        other._write_static_fields()
        return other

    @classmethod
    def from_tensors(cls, gate, up, down, *, fmt: str = "q8_0", threads: int | None = None,
                     numa: str = "interleave", isa: str | None = None, tiles: Tiles | None = None,
                     amx: bool | None = None, down_fmt: str | None = None):
        """gate, up: [E, I, H]; down: [E, H, I]; numpy arrays or CPU torch tensors (fp32/bf16).
        Quantized where `formats_torch.quant_device` says (CUDA when present, $HMOE_QUANT_DEVICE),
        the same bytes wherever; repacked in numpy on all cores."""
        shapes = [tuple(w.shape) for w in (gate, up, down)]
        if len(shapes[0]) != 3 or shapes[0] != shapes[1] or shapes[2] != (shapes[0][0], shapes[0][2], shapes[0][1]):
            raise ValueError(f"expected gate, up [E, I, H] and down [E, H, I]; got {shapes[0]}, {shapes[1]}, "
                             f"{shapes[2]}")
        E, I, H = shapes[0]
        self = cls(fmt=fmt, num_experts=E, hidden=H, inter=I, threads=threads, numa=numa, isa=isa, tiles=tiles,
                   amx=amx, down_fmt=down_fmt)
        where = {f: _quant_device(f) for f in (fmt, self.down_fmt)}
        projections = ((self.gate, gate, fmt, self.geo), (self.up, up, fmt, self.geo),
                       (self.down, down, self.down_fmt, self.down_geo))
        if all(w == "numpy" for w in where.values()):
            # one expert at a time on every core: numpy's quantize releases the GIL
            mats = [(mat, _as_numpy(w, np.float32, "weights")[0], f, geo) for mat, w, f, geo in projections]
            def pack(e):
                for mat, w, f, geo in mats:
                    mat.fill(e, repack(quantize(w[e], f), f, *w[e].shape, geo))
            _each_expert(E, pack)
            return self
        from . import formats_torch  # torch quantizes a whole projection (chunked), numpy repacks
        blocks = [(mat, formats_torch.quantize(w, f, where[f]), f, geo, w.shape[1:]) for mat, w, f, geo in projections]
        def pack_blocks(e):
            for mat, q, f, geo, shape in blocks:
                mat.fill(e, repack(q[e], f, *shape, geo))
        _each_expert(E, pack_blocks)
        return self

    @classmethod
    def from_blocks(cls, gate, up, down, *, fmt: str, hidden: int, inter: int, **kw):
        """GGUF blocks as a loader reads them: gate/up uint8 [E, I, row_bytes(H)] in fmt, down
        [E, H, row_bytes(I)] in down_fmt (keyword; default fmt)."""
        E = gate.shape[0]
        self = cls(fmt=fmt, num_experts=E, hidden=hidden, inter=inter, **kw)
        def pack(e):
            for mat, w, n, k, f, geo in ((self.gate, gate[e], inter, hidden, fmt, self.geo),
                                         (self.up, up[e], inter, hidden, fmt, self.geo),
                                         (self.down, down[e], hidden, inter, self.down_fmt, self.down_geo)):
                mat.fill(e, repack(np.asarray(w, np.uint8), f, n, k, geo))
        _each_expert(E, pack)
        return self

    @classmethod
    def random(cls, *, fmt: str, num_experts: int, hidden: int, inter: int, seed: int = 0, **kw):
        """Random weights written straight into the repacked layout (benchmarks: no quantize pass)."""
        self = cls(fmt=fmt, num_experts=num_experts, hidden=hidden, inter=inter, **kw)
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, 256, 1 << 24, dtype=np.uint8)

        def payload_pool(f):
            if f == "q6_k":
                return raw & 0x3F
            if f == "bf16":  # |w| in [2^-8, 2^0): sign, exponent 119..126, random mantissa
                v = raw.view(np.uint16)
                return (((v & 0x8000) | ((119 + (v & 7)) << 7) | (v >> 9)).astype(np.uint16)).view(np.uint8)
            return raw
        scales = (rng.uniform(0.001, 0.01, 1 << 20)).astype(np.float16).view(np.uint8)
        for mat, f, geo in ((self.gate, fmt, self.geo), (self.up, fmt, self.geo),
                            (self.down, self.down_fmt, self.down_geo)):
            pool = payload_pool(f)
            for buf, src in ((mat.payload, pool), (mat.scale, scales), (mat.bias, scales)):
                dst = buf.array(np.uint8)
                for s in range(0, dst.size, src.size):
                    n = min(src.size, dst.size - s)
                    dst[s:s + n] = src[:n]
                if geo.superblock and buf is not mat.payload:   # q4_k's per-block factors are 6-bit
                    units = dst[:mat.sc_e * self.E].reshape(-1, geo.scale_unit[1])
                    units[:, 2 * geo.group_rows:] &= 0x3F
        return self

    # ------------------------------------------------------------ job plumbing
    def _write_static_fields(self):
        j = self.job
        j[J["TOPK"]] = 0
        j[J["H"]], j[J["I"]], j[J["E"]] = self.H, self.I, self.E
        for prefix, mat in (("G", self.gate), ("U", self.up), ("D", self.down)):
            j[J[prefix + "P"]] = mat.payload.address
            j[J[prefix + "S"]] = mat.scale.address
            j[J[prefix + "B"]] = mat.bias.address
            j[J[prefix + "RB"]] = mat.bounds.address
        j[J["GU_PAY_E"]], j[J["GU_SC_E"]] = self.gate.pay_e, self.gate.sc_e
        j[J["D_PAY_E"]], j[J["D_SC_E"]] = self.down.pay_e, self.down.sc_e
        j[J["N2"]] = down_tasks(self.H, self.tiles, 1)   # _prepare sets it per job's token count
        j[J["POOL"]] = self.pool.control_address
        j[J["RUN"]] = self.lib.address("hmoe_run_job")   # what any pool's workers call for this job

    def _ensure_scratch(self, T: int, k: int):
        if T <= self._capacity[0] and T * k <= self._capacity[1]:
            return
        T, S = max(T, self._capacity[0]), max(T * k, self._capacity[1])
        H, I, E = self.H, self.I, self.E
        P = SLOT_PAD  # AMX reads activation rows in chunks of 32 slots: pad past the last slot
        s = self._scratch = {"HF": aligned_zeros(S * I, np.float32), "CNT": aligned_zeros(E, np.int32),
                             "OFF": aligned_zeros(E + 1, np.int32), "STOK": aligned_zeros(S, np.int32),
                             "SW": aligned_zeros(S, np.float32), "SPOS": aligned_zeros(S, np.int32),
                             "ACT": aligned_zeros(E, np.int32),
                             "READY": aligned_zeros(8 * E, np.int64)}   # a cache line per active expert
        bf16_acts = self.tiles.amx and self.tiles.amx_mode != "int8"   # bf16 or mixed
        for pre, k, f, geo in (("X", H, self.fmt, self.geo), ("H", I, self.down_fmt, self.down_geo)):
            rows = (S + P) if f != "bf16" else 1   # slot-ordered int8 activations, scale, sums per 16, term
            amx_bf16 = bf16_acts and supports_amx(geo)  # bf16 copies only for a phase AMX-BF16 runs
            s.update({pre + "Q": aligned_zeros(rows * k, np.int8), pre + "D": aligned_zeros(rows * k // 32, np.float32),
                      pre + "S": aligned_zeros(rows * k // 16, np.int32),
                      pre + "T": aligned_zeros(rows * k // 32, np.float32),
                      pre + "B": aligned_zeros(rows * k if amx_bf16 else 32, np.uint16)})
        t = self.tiles
        for pre, k, on, geo in (("X", H, t.amx_row, self.geo), ("H", I, t.amx_row_down, self.down_geo)):
            row = bf16_acts and on and supports_i8row(geo)   # the i8row kernel's activations
            s.update({pre + "R": aligned_zeros((S + P) * k if row else 64, np.int8),
                      pre + "RS": aligned_zeros(S + P if row else 16, np.float32)})
        stride = max(H, I) // 32 * 2048 if bf16_acts else 0   # AMX-BF16: a row group's dequantized blocks
        s["AMXB"] = aligned_zeros(max(stride * self.threads, 64), np.uint8)
        self.job[J["AMXB_STRIDE"]] = stride
        for name, arr in s.items():
            self.job[J[name]] = arr.ctypes.data
        self._capacity = (T, S)

    def _prepare(self, hidden, topk_ids, topk_weights, out=None, check_ids=True):
        x, is_torch = _as_numpy(hidden, np.float32, "hidden")
        ids, _ = _as_numpy(topk_ids, np.int64, "topk_ids")
        w, _ = _as_numpy(topk_weights, np.float32, "topk_weights")
        if x.ndim != 2 or x.shape[1] != self.H:
            raise ValueError(f"hidden must be [T, {self.H}], got {list(x.shape)}")
        T = x.shape[0]
        if ids.ndim != 2 or ids.shape[0] != T or w.shape != ids.shape:
            raise ValueError(f"topk_ids and topk_weights must both be [{T}, k], got {list(ids.shape)} and "
                             f"{list(w.shape)}")
        if x.strides[1] != 4 or x.strides[0] % 4:
            x = np.ascontiguousarray(x)
        ids, w = np.ascontiguousarray(ids), np.ascontiguousarray(w)
        if check_ids and ids.size and (ids.min() < 0 or ids.max() >= self.E):
            raise ValueError(f"topk_ids must lie in [0, {self.E}), got values in [{ids.min()}, {ids.max()}]")
        k = ids.shape[1]
        self._ensure_scratch(T, k)
        if out is None:
            out = np.empty((T, self.H), np.float32)
        elif out.shape != (T, self.H) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 [{T}, {self.H}] array")
        j = self.job
        j[J["T"]], j[J["TOPK"]] = T, k
        j[J["X"]], j[J["XSTRIDE"]] = x.ctypes.data, x.strides[0] // 4
        j[J["IDS"]], j[J["W"]] = ids.ctypes.data, w.ctypes.data
        j[J["OUT"]], j[J["OSTRIDE"]] = out.ctypes.data, self.H
        j[J["N2"]] = down_tasks(self.H, self.tiles, T)
        quant_tasks = -(-T // self.tiles.quant_rows) if self.fmt != "bf16" else 0
        j[J["N0"]] = 1 + quant_tasks
        return (x, ids, w, out), is_torch

    # ------------------------------------------------------------ the op
    def submit(self, hidden, topk_ids, topk_weights):
        """Start the layer on the worker pool and return at once; wait() gives the output."""
        if self._pending is not None:
            raise RuntimeError("submit() called twice without wait()")
        keep, is_torch = self._prepare(hidden, topk_ids, topk_weights)
        self._pending = (keep, is_torch)
        if keep[0].shape[0] == 0:
            return
        self.pool.submit(self.job)

    def wait(self):
        if self._pending is None:
            raise RuntimeError("wait() without submit()")
        (x, ids, w, out), is_torch = self._pending
        self._pending = None
        if x.shape[0]:
            self.pool.wait()
        if is_torch:
            from . import torch_io
            return torch_io.from_numpy(out)
        return out

    def bind(self, hidden: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, out: np.ndarray):
        """Fix the job's buffers (e.g. pinned host buffers that a GPU stream fills) for native launches:
        returns (submit, wait, job): `void f(void *job)` addresses and the userData to pass them, e.g.
        cudaLaunchHostFunc(stream, submit, job). The buffers' contents may change between launches;
        their addresses, shapes and dtypes (float32, int64, float32, float32) may not."""
        if self._pending is not None:
            raise RuntimeError("bind() while a submit() is pending")
        if topk_ids.dtype != np.int64 or topk_weights.dtype != np.float32 or hidden.dtype != np.float32:
            raise ValueError("bind needs float32 hidden and topk_weights and int64 topk_ids (no conversion copies)")
        # the buffers' contents are the caller's to fill before each launch: no range check of the ids now
        self._bound = self._prepare(hidden, topk_ids, topk_weights, out, check_ids=False)[0]
        assert all(a is b for a, b in zip(self._bound, (hidden, topk_ids, topk_weights, out))), \
            "bind needs C-contiguous buffers"
        return self.pool.submit_job_address, self.pool.wait_job_address, self.job.ctypes.data

    def forward(self, hidden, topk_ids, topk_weights):
        self.submit(hidden, topk_ids, topk_weights)
        return self.wait()

    __call__ = forward

    # ------------------------------------------------------------ facts
    def bytes_per_expert(self) -> int:
        """Bytes the kernels stream for one expert (gate + up + down, repacked)."""
        gate_up = 2 * self.H * self.I * repacked_bytes_per_weight(self.geo)
        return int(round(gate_up + self.H * self.I * repacked_bytes_per_weight(self.down_geo)))

    def close(self):
        if self._owner:   # a retiled() view shares the weights of its original
            for m in (self.gate, self.up, self.down):
                m.close()
