"""Which vector ISA the kernels use: chosen from the host CPU's name and LLVM feature string.

Every intrinsic the generator emits is gated on an `Isa` built here, so a kernel never contains
an instruction the target lacks (LLVM aborts the whole process on "Cannot select").
"""
from dataclasses import dataclass
from functools import lru_cache

import llvmlite.binding as llvm


@dataclass(frozen=True)
class Isa:
    name: str          # avx2 | avxvnni | avx512 | avx512vnni
    vector_bytes: int  # 32 (ymm) or 64 (zmm)
    vnni: bool         # vpdpbusd (u8 x s8 -> i32) instead of vpmaddubsw + vpmaddwd
    amx: bool          # AMX int8 tiles present (prefill kernels use them for q8_0, q4_0, q4_k)
    cpu: str           # LLVM CPU name to compile for
    features: str      # LLVM feature string to compile for ('' = implied by cpu)

    @property
    def lanes(self) -> int:
        """f32 / i32 lanes per vector."""
        return self.vector_bytes // 4


# what each ISA needs, in LLVM feature names
_NEEDS = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "fma", "f16c"),
    "avxvnni": ("avx2", "fma", "f16c", "avxvnni"),
    "avx2": ("avx2", "fma", "f16c"),
}
ISA_ORDER = tuple(_NEEDS)  # best first


def _init_llvm():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()


@lru_cache(maxsize=None)
def host_cpu() -> tuple[str, str]:
    """(cpu name, feature string) of this machine as LLVM sees it."""
    _init_llvm()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def enabled_features(features: str) -> set[str]:
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def supported(features: str) -> list[str]:
    """ISA names usable with this feature string, best first."""
    have = enabled_features(features)
    return [name for name in ISA_ORDER if all(f in have for f in _NEEDS[name])]


def make_isa(name: str, cpu: str, features: str) -> Isa:
    if name not in _NEEDS:
        raise ValueError(f"unknown ISA {name!r}; expected one of {', '.join(ISA_ORDER)}")
    have = enabled_features(features) if features else set(_NEEDS[name])
    missing = [f for f in _NEEDS[name] if f not in have]
    if missing:
        raise ValueError(f"ISA {name} needs CPU features {', '.join(missing)} that {cpu} lacks")
    return Isa(name=name, vector_bytes=64 if name.startswith("avx512") else 32,
               vnni=name.endswith("vnni"), amx="amx-int8" in have, cpu=cpu, features=features)


def host_isa(name: str | None = None) -> Isa:
    """The best ISA of this host, or the named one if the host has it."""
    cpu, features = host_cpu()
    usable = supported(features)
    if not usable:
        raise RuntimeError(f"CPU {cpu} lacks AVX2+FMA+F16C, which the cpu_experts kernels need")
    return make_isa(name or usable[0], cpu, features)


def cross_isa(name: str, cpu: str, amx: bool = False) -> Isa:
    """An ISA for another CPU (compile and inspect only; never run it here)."""
    isa = make_isa(name, cpu, "")
    return Isa(**{**isa.__dict__, "amx": amx})
