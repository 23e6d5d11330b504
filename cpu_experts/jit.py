"""Compile LLVM IR for an ISA, cache the object on disk, load it and hand out function addresses.

The only module that touches llvmlite.binding for compilation. Cache key: LLVM version, target CPU,
feature string and the IR text. Location: $HMOE_CACHE_DIR or ~/.cache/hmoe/jit.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import llvmlite.binding as llvm

from .isa import Isa, _init_llvm

_ENGINES = []  # loaded engines must outlive every function pointer taken from them


def cache_dir() -> Path:
    root = os.environ.get("HMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hmoe")
    return Path(root) / "jit"


def _target_machine(isa: Isa):
    target = llvm.Target.from_default_triple()
    # a fresh machine each time: an MCJIT engine takes ownership of the one it gets
    return target.create_target_machine(cpu=isa.cpu, features=isa.features, opt=3, codemodel="jitdefault")


def _optimized(ir_text: str, isa: Isa):
    mod = llvm.parse_assembly(ir_text)
    mod.triple = llvm.get_default_triple()
    mod.verify()
    tm = _target_machine(isa)
    mod.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod, tm


def cache_key(ir_text: str, isa: Isa) -> str:
    ver = ".".join(map(str, llvm.llvm_version_info))
    h = hashlib.sha256("\0".join([ver, isa.cpu, isa.features, ir_text]).encode())
    return h.hexdigest()[:32]


def emit_assembly(ir_text: str, isa: Isa) -> str:
    """Assembly of the optimised module (for inspection; safe for any target CPU)."""
    _init_llvm()
    mod, tm = _optimized(ir_text, isa)
    return tm.emit_assembly(mod)


def object_code(ir_text: str, isa: Isa) -> bytes:
    _init_llvm()
    path = cache_dir() / f"{cache_key(ir_text, isa)}.o"
    if path.exists():
        return path.read_bytes()
    mod, tm = _optimized(ir_text, isa)
    data = tm.emit_object(mod)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    return data


class Library:
    """Functions of one compiled module, loaded into this process."""

    def __init__(self, ir_text: str, isa: Isa):
        _init_llvm()
        data = object_code(ir_text, isa)
        # an engine is needed to link the object; its own module stays empty
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _target_machine(isa))
        engine.add_object_file(llvm.ObjectFileRef.from_data(data))
        engine.finalize_object()
        _ENGINES.append(engine)
        self._engine = engine

    def address(self, name: str) -> int:
        addr = self._engine.get_function_address(name)
        assert addr, f"function {name} missing from the compiled module"
        return addr
