"""Fill the on-disk object cache in parallel: `python -m cpu_experts.precompile [--sweep VARIANTS]`.

A module takes seconds to optimise and compile, one core each; the tests and a sweep need dozens. This
compiles, in one process per core, the libraries they will ask for on this host (every usable ISA x
format with the default tiling, the AMX tilings the tests use, and the named sweep variants); a later
CPUExperts finds them in the cache (jit.py). A library nobody asks for costs only compile time.
"""
import argparse
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor

from .codegen.moe import Tiles, build_ir
from .experts import _geometry, default_tiles
from .formats import FORMATS
from .isa import host_cpu, host_isa, supported
from .jit import object_code


# (gate/up, down) format pairs the per-projection tests use (tests/test_cpu_experts_mixed.py)
MIXED_PAIRS = (("q4_k", "q6_k"), ("q4_0", "q8_0"), ("q8_0", "q6_k"), ("bf16", "q4_k"), ("q6_k", "bf16"))
# their AMX tilings: (gate/up, down, amx_mode, amx_min_slots), emulated on the first AVX-512 ISA
MIXED_EMULATED = (("q4_k", "q6_k", "bf16", 1), ("q4_k", "q6_k", "int8", 5), ("q4_0", "q8_0", "bf16", 1),
                  ("q4_0", "q8_0", "int8", 1), ("q8_0", "q6_k", "bf16", 1), ("q6_k", "q4_k", "bf16", 1),
                  ("bf16", "q4_k", "int8", 1), ("q4_k", "q6_k", "mixed", 1), ("q4_0", "q8_0", "mixed", 1))
MIXED_AMX = (("q4_k", "q6_k"), ("q4_0", "q8_0"), ("q8_0", "q6_k"), ("q6_k", "q4_k"))


def _compile(job):
    fmt, isa_name, tiles, *down = job
    isa = host_isa(isa_name)
    down_geo = _geometry(down[0], isa, tiles) if down else None
    object_code(build_ir(_geometry(fmt, isa, tiles), isa, tiles, down_geo), isa)
    return fmt, isa_name


def mixed_jobs() -> list:
    """The libraries of the per-projection (gate/up vs down format) tests on this host."""
    names = supported(host_cpu()[1])
    out = []
    for isa_name in names:
        isa = host_isa(isa_name)
        for fmt, down in MIXED_PAIRS:
            out.append((fmt, isa_name, default_tiles(isa, _geometry(fmt, isa, None), False,
                                                     _geometry(down, isa, None)), down))
    for isa_name in [n for n in names if n.startswith("avx512")][:1]:
        for fmt, down, mode, mn in MIXED_EMULATED:
            out.append((fmt, isa_name, Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=mn, amx_max_slots=64,
                                             amx_mode=mode), down))
    if host_isa().amx:
        for fmt, down in MIXED_AMX:
            for mode in ("bf16", "int8"):
                out.append((fmt, "avx512vnni", Tiles(tokens=8, amx=True, amx_min_slots=16, amx_mode=mode), down))
    return out


def jobs(sweep: list[str], sweep_fmts=FORMATS) -> list:
    from .sweep import VARIANTS
    out = []
    names = supported(host_cpu()[1])
    best = host_isa()
    for isa_name in names:
        isa = host_isa(isa_name)
        for fmt in FORMATS:
            out.append((fmt, isa_name, default_tiles(isa, _geometry(fmt, isa, None), False)))
    emu = [n for n in names if n.startswith("avx512")][:1]   # tests: emulated AMX on the first AVX-512 ISA
    for isa_name in emu:
        for fmt, mn, mx, mode in (("q8_0", 1, 128, "int8"), ("q4_0", 1, 32, "int8"), ("q4_0", 5, 128, "int8"),
                                  ("q4_k", 1, 64, "int8"), ("q4_k", 40, 128, "int8"), ("q8_0", 1, 64, "bf16"),
                                  ("q4_0", 5, 32, "bf16"), ("q4_k", 1, 128, "bf16"), ("q4_k", 8, 128, "mixed"),
                                  ("q4_0", 8, 128, "mixed")):
            out.append((fmt, isa_name, Tiles(tokens=8, amx=True, amx_emulate=True, amx_min_slots=mn, amx_max_slots=mx,
                                             amx_mode=mode)))
    if best.amx:
        for fmt in ("q8_0", "q4_0", "q4_k"):
            for mn in (1, 8, 16):
                for mode in ("int8", "bf16", "mixed"):
                    out.append((fmt, "avx512vnni", Tiles(tokens=8, amx=True, amx_min_slots=mn, amx_mode=mode)))
    for fmt in sweep_fmts:
        geo = _geometry(fmt, best, None)
        base = default_tiles(best, geo, None)   # what CPUExperts picks on this host
        for name in sweep:
            fields = VARIANTS[name]
            if any(f.startswith("amx") for f in fields) and not base.amx:
                continue
            out.append((fmt, best.name, dataclasses.replace(base, **fields)))
    return list(dict.fromkeys(out + mixed_jobs()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpu_experts.precompile", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default="", help="sweep variant names to compile too (comma-separated)")
    p.add_argument("--sweep-fmts", default=",".join(FORMATS), help="formats of the sweep variants")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    todo = jobs([v for v in a.sweep.split(",") if v], [f for f in a.sweep_fmts.split(",") if f])
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        list(ex.map(_compile, todo))
    print(f"precompiled {len(todo)} libraries in {time.time() - t0:.1f} s with {a.workers} workers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
