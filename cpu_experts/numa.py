"""NUMA topology and weight memory by policy, through libnuma (ctypes).

Policies: 'interleave' (pages round-robin over nodes, default), 'split' (each node holds its
share of every expert's intermediate dimension), 'replicate' (a copy per node), 'none' (plain
process memory). Without libnuma every policy degrades to 'none' with one warning.
"""
import ctypes
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

POLICIES = ("interleave", "split", "replicate", "none")
_warned = False


def _parse_cpulist(text: str) -> list[int]:
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@lru_cache(maxsize=None)
def node_cpus() -> dict[int, list[int]]:
    """{node: [cpu, ...]} restricted to the CPUs this process may run on."""
    allowed = os.sched_getaffinity(0)
    nodes = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        cpus = [c for c in _parse_cpulist((d / "cpulist").read_text()) if c in allowed]
        if cpus:
            nodes[int(d.name[4:])] = cpus
    return nodes or {0: sorted(allowed)}


@lru_cache(maxsize=None)
def _libnuma():
    try:
        lib = ctypes.CDLL("libnuma.so.1")
    except OSError:
        return None
    lib.numa_available.restype = ctypes.c_int
    if lib.numa_available() < 0:
        return None
    lib.numa_alloc_interleaved.restype = ctypes.c_void_p
    lib.numa_alloc_interleaved.argtypes = [ctypes.c_size_t]
    lib.numa_alloc_onnode.restype = ctypes.c_void_p
    lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.numa_free.restype = None
    lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def effective_policy(policy: str) -> str:
    """The policy that will really be used on this machine (one warning when libnuma is missing)."""
    global _warned
    if policy not in POLICIES:
        raise ValueError(f"unknown NUMA policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if policy != "none" and _libnuma() is None:
        if not _warned:
            warnings.warn("libnuma.so.1 not found or NUMA unavailable: weight memory uses policy 'none'")
            _warned = True
        return "none"
    if policy in ("split", "replicate") and len(node_cpus()) > 1:
        raise ValueError(f"NUMA policy {policy!r} on {len(node_cpus())} nodes is not implemented yet; "
                         "use 'interleave' or 'none'")
    return policy


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@lru_cache(maxsize=None)
def _madvise():
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


class Buffer:
    """Page-aligned weight memory placed by policy; .array(dtype) views it. Free with close().

    Buffers of 2 MiB or more start on a 2 MiB boundary and are marked MADV_HUGEPAGE before their
    first touch: with transparent huge pages in 'madvise' mode (both machines here) the kernels'
    streams then cross a TLB entry every 2 MiB instead of every 4 KiB (measured: +11% GB/s at one
    token on the CI box, NOTES.md)."""

    def __init__(self, nbytes: int, policy: str):
        self.nbytes = max(int(nbytes), 1)
        self.policy = effective_policy(policy)
        self.address, self._owner = 0, None
        lib = _libnuma()
        huge = self.nbytes >= HUGE_PAGE
        pad = HUGE_PAGE if huge else 4096
        self._raw_bytes = self.nbytes + pad
        if self.policy == "none":
            self._owner = np.empty(self._raw_bytes, np.uint8)
            raw = self._owner.ctypes.data
        elif self.policy == "interleave":
            raw = lib.numa_alloc_interleaved(self._raw_bytes)
        else:  # split / replicate on one node: the node's own memory
            raw = lib.numa_alloc_onnode(self._raw_bytes, next(iter(node_cpus())))
        if not raw:
            raise MemoryError(f"could not allocate {self.nbytes} bytes of weight memory (policy {self.policy})")
        self._raw = raw
        self.address = raw + (-raw) % pad
        if huge:   # advice only: a kernel without THP leaves 4 KiB pages, which is still correct
            _madvise()(self.address, self.nbytes, MADV_HUGEPAGE)

    def array(self, dtype, offset: int = 0, count: int | None = None) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = (self.nbytes - offset) // dtype.itemsize if count is None else count
        assert offset + count * dtype.itemsize <= self.nbytes
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.address + offset)
        return np.frombuffer(raw, dtype=dtype)

    def close(self):
        if self.address and self.policy != "none":
            _libnuma().numa_free(self._raw, self._raw_bytes)
        self.address = 0
        self._owner = None

    def __del__(self):
        self.close()


@lru_cache(maxsize=None)
def physical_cpus() -> list[int]:
    """One logical CPU per physical core (first sibling), node by node."""
    cpus, seen = [], set()
    for node, node_list in sorted(node_cpus().items()):
        for cpu in node_list:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            try:
                core = (node, (topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
            except OSError:
                core = (node, cpu)
            if core not in seen:
                seen.add(core)
                cpus.append(cpu)
    return cpus


def spare_cpus(busy) -> list[int]:
    """Physical cores (their first sibling) that none of the CPUs in `busy` (e.g. pinned workers) uses."""
    busy = set(busy)
    return [c for c in physical_cpus() if c not in busy]


def worker_cpus(threads: int | None) -> list[int]:
    """CPUs for `threads` pinned workers (all physical cores when None); spread over nodes in order."""
    cpus = physical_cpus()
    if threads is None:
        return cpus
    return [cpus[i % len(cpus)] for i in range(threads)]


def anon_huge_gb() -> float | None:
    """GB of this process's memory on transparent huge pages (None where /proc does not say): whether
    the weight Buffers got the huge pages they asked for."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
        return round(kb / 1e6, 2)
    except (OSError, StopIteration):
        return None
