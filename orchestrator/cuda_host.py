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

from runtime.errors import HmoeError


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
        raise HmoeError(f"HMOE_CUDA_SYNC (host sync mode) must be one of {', '.join(SYNC_FLAGS)}, got {mode!r}")
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


# ---------------------------------------------------------------- stream memory operations
# The memops hand-over (HMOE_HANDOVER=memops, orchestrator/doorbell.py): the stream writes and waits
# on 32-bit words in page-locked host memory, with no CUDA thread in between. Driver API, CUDA >= 12
# (`_v2`, enabled on every device since CUDA 11.7; the older entry points behind the attribute below).

CU_STREAM_WAIT_VALUE_EQ = 1  # wait until *addr == value (0 would be the cyclic >=)
CU_STREAM_WRITE_VALUE_DEFAULT = 0  # with a memory barrier: earlier writes (the D2H copy) are visible first
CU_MEMHOSTREGISTER_PORTABLE, CU_MEMHOSTREGISTER_DEVICEMAP = 1, 2
CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 = 92  # reported in describe(), not relied on


@lru_cache(maxsize=None)
def _memops():
    """(write32, wait32, host_device_pointer) driver functions, `_v2` names first."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def pick(*names):
        for name in names:
            fn = getattr(cuda, name, None)
            if fn is not None:
                return fn
        raise RuntimeError(f"libcuda.so.1 has none of {', '.join(names)}")

    write = pick("cuStreamWriteValue32_v2", "cuStreamWriteValue32")
    wait = pick("cuStreamWaitValue32_v2", "cuStreamWaitValue32")
    for fn in (write, wait):  # (CUstream, CUdeviceptr, cuuint32_t value, unsigned flags)
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    dptr = pick("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer")
    dptr.restype, dptr.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    return write, wait, dptr


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with CUDA error {err}")


def stream_write32(stream, device_address: int, value: int) -> None:
    """Enqueue `*(uint32 *)device_address = value` on `stream`, after all earlier work on it."""
    _check(_memops()[0](ctypes.c_void_p(stream.cuda_stream), device_address, value, CU_STREAM_WRITE_VALUE_DEFAULT),
           "cuStreamWriteValue32")


def stream_wait32(stream, device_address: int, value: int) -> None:
    """Enqueue a wait: later work on `stream` starts once `*(uint32 *)device_address == value`."""
    _check(_memops()[1](ctypes.c_void_p(stream.cuda_stream), device_address, value, CU_STREAM_WAIT_VALUE_EQ),
           "cuStreamWaitValue32")


def register_mapped(address: int, nbytes: int) -> int:
    """Page-lock host memory for every context, mapped into the device's address space; returns the
    device address of `address` (cuMemHostGetDevicePointer: what the memops take)."""
    import torch

    torch.cuda.init()
    cudart = torch.cuda.cudart()  # cudaHostRegisterPortable | cudaHostRegisterMapped
    torch.cuda.check_error(cudart.cudaHostRegister(address, nbytes, CU_MEMHOSTREGISTER_PORTABLE
                                                   | CU_MEMHOSTREGISTER_DEVICEMAP))
    out = ctypes.c_uint64()
    _check(_memops()[2](ctypes.byref(out), ctypes.c_void_p(address), 0), "cuMemHostGetDevicePointer")
    return out.value


def unregister(address: int) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)


def memops_unsupported(device) -> str | None:
    """Why stream memory operations cannot carry the hand-over on `device` (None: they can). A
    probe, since the attribute that announced them is deprecated: a side stream writes a mapped host
    word and waits on it, and the host reads it back."""
    import numpy as np
    import torch

    from cpu_experts.pool import aligned_zeros

    try:
        word = aligned_zeros(1024, np.int64, align=4096)
        dptr = register_mapped(word.ctypes.data, word.nbytes)
        try:
            with torch.cuda.device(device):
                side = torch.cuda.Stream(device)
                stream_write32(side, dptr, 7)
                stream_wait32(side, dptr, 7)
                side.synchronize()
        finally:
            unregister(word.ctypes.data)
        if int(word[0]) != 7:
            return f"the probe's host word reads {int(word[0])}, not 7"
    except (OSError, RuntimeError, AssertionError) as e:  # AssertionError: torch built without CUDA
        return str(e) or type(e).__name__
    return None


def describe_memops(device_index: int = 0) -> dict:
    """The driver's answer on memops for logs and results: the deprecated v1 attribute and the probe."""
    value = ctypes.c_int(-1)
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), device_index) == 0:
            cuda.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1, dev)
    except OSError:
        pass
    return {"can_use_stream_mem_ops_v1": value.value, "probe": memops_unsupported(device_index) or "ok"}
