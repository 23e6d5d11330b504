"""cudaLaunchHostFunc through ctypes: enqueue a native `void f(void *)` on a CUDA stream.

torch does not expose it, so we call the CUDA runtime library that torch itself loaded (found in
/proc/self/maps, so both use one runtime); where torch links the runtime statically we fall back
to the driver's equivalent, cuLaunchHostFunc in libcuda.so.1 (a CUstream is a cudaStream_t).
The function runs on a CUDA-owned thread once all earlier work on the stream is done, and later
work waits for it; it must not call CUDA. Captured in a CUDA graph it becomes a host node.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from functools import lru_cache


@lru_cache(maxsize=None)
def _launcher():
    """(ctypes function, library path) for (stream, fn, userData) -> error code."""
    import torch

    torch.cuda.init()
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if re.search(r"/libcudart[^/]*\.so", line)]
    except OSError:
        pass
    candidates = [(p, "cudaLaunchHostFunc") for p in dict.fromkeys(paths)]
    found = ctypes.util.find_library("cudart")
    if found:
        candidates.append((found, "cudaLaunchHostFunc"))
    candidates.append(("libcuda.so.1", "cuLaunchHostFunc"))
    for path, symbol in candidates:
        try:
            fn = getattr(ctypes.CDLL(path), symbol)
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return fn, path
    raise RuntimeError("found neither libcudart (cudaLaunchHostFunc) nor libcuda.so.1 (cuLaunchHostFunc)")


def library() -> str:
    """Path of the library whose launcher is used (for logs and results)."""
    return _launcher()[1]


def launch_host_func(stream, fn_address: int, user_data: int) -> None:
    """Enqueue native `fn(user_data)` on `stream` (a torch.cuda.Stream)."""
    fn, path = _launcher()
    err = fn(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn_address), ctypes.c_void_p(user_data))
    if err:
        raise RuntimeError(f"host function launch failed with CUDA error {err} ({path})")


# How a host thread waits for the GPU (cudaStreamSynchronize, .item(), ...): CUDA's default spins,
# which takes a core from the CPU expert workers; blocking sleeps on an OS primitive.
SYNC_FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # CU_CTX_SCHED_*


def set_host_sync(mode: str) -> bool:
    """Set every GPU's primary-context scheduling flag to `mode` (SYNC_FLAGS), best before torch
    creates the contexts (recent drivers also accept it after); True if every GPU reads it back."""
    if mode not in SYNC_FLAGS:
        raise ValueError(f"host sync mode must be one of {', '.join(SYNC_FLAGS)}, got {mode!r}")
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGetCount(ctypes.byref(count)):
        return False
    for i in range(count.value):
        dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if (cuda.cuDeviceGet(ctypes.byref(dev), i) or cuda.cuDevicePrimaryCtxSetFlags(dev, SYNC_FLAGS[mode])
                or cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
                or flags.value & 7 != SYNC_FLAGS[mode]):
            return False
    return True
