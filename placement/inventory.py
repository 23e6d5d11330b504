"""The machine a plan is made for: GPUs with their free memory, available RAM, NUMA nodes.

`detect()` asks torch and psutil; `hypothetical()` describes a machine from numbers (tests, and
`--vram/--ram` to plan for a machine you are not on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_bytes: int


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    ram_bytes: int  # available to us now (psutil's `available`)
    numa_nodes: int = 1
    detected: bool = False  # False: numbers given by the user or a test

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cpu",) + tuple(f"cuda:{g.index}" for g in self.gpus)

    def has(self, device: str) -> bool:
        return device in self.devices

    def capacity(self, device: str) -> int:
        if device == "cpu":
            return self.ram_bytes
        return self.gpus[int(device.split(":")[1])].free_bytes

    def describe_gpus(self) -> str:
        if not self.gpus:
            return "no CUDA GPU"
        names = ", ".join(f"cuda:{g.index}" for g in self.gpus)
        return f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''} ({names})"


def detect() -> Inventory:
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            gpus.append(Gpu(i, torch.cuda.get_device_name(i), free))
    return Inventory(tuple(gpus), psutil.virtual_memory().available, _numa_nodes(), detected=True)


def hypothetical(vram_gib: list[float] | tuple[float, ...] = (), ram_gib: float | None = None,
                 numa_nodes: int = 1) -> Inventory:
    """A machine with GPUs of these free GiB and this much available RAM (detected RAM if None)."""
    if ram_gib is None:
        import psutil

        ram = psutil.virtual_memory().available
    else:
        ram = int(ram_gib * GiB)
    gpus = tuple(Gpu(i, "hypothetical", int(v * GiB)) for i, v in enumerate(vram_gib))
    return Inventory(gpus, ram, numa_nodes)


def _numa_nodes() -> int:
    try:
        nodes = [d for d in os.listdir("/sys/devices/system/node") if d.startswith("node") and d[4:].isdigit()]
    except OSError:
        return 1
    return max(len(nodes), 1)
