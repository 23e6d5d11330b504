"""The double-buffer schedule of streamed prefill: which device slot holds which layer, and when.

Streamed layers j = 0, 1, ... alternate between two slots (j % 2), so layer j+1's copy never
touches the slot layer j computes from. Per layer, in order:

    Copy(j)       if slot j % 2 does not hold layer j: the copy stream waits for the slot's
                  `released` event, copies, records `copied`
    Copy(j + 1)   the prefetch, same rule (its slot was released by layer j - 1)
    Compute(j)    the compute stream waits for `copied`, computes, records `released`

A slot remembers which layer it holds, so a model with two streamed layers copies each once.
Pure bookkeeping (no tensors, no CUDA): the CPU tests check the order, the runner executes it.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOTS = 2


@dataclass(frozen=True)
class Copy:
    layer: int
    slot: int


@dataclass(frozen=True)
class Compute:
    layer: int
    slot: int


class DoubleBuffer:
    def __init__(self, num_layers: int):
        if num_layers < 1:
            raise ValueError(f"a streamed schedule needs at least one layer, got {num_layers}")
        self.num_layers = num_layers
        self.holds: list[int | None] = [None] * SLOTS  # layer whose bytes a slot holds (or is being copied)

    def step(self, layer: int, *, prefetch: bool = True) -> list[Copy | Compute]:
        """The actions for computing streamed layer `layer` (0-based among the streamed layers)."""
        assert 0 <= layer < self.num_layers, layer
        actions = self._ensure(layer)
        if prefetch and layer + 1 < self.num_layers:
            actions += self._ensure(layer + 1)
        return actions + [Compute(layer, layer % SLOTS)]

    def forget(self) -> None:
        """The slots' contents are unknown (e.g. an exception between a copy and its compute)."""
        self.holds = [None] * SLOTS

    def _ensure(self, layer: int) -> list[Copy]:
        slot = layer % SLOTS
        if self.holds[slot] == layer:
            return []
        self.holds[slot] = layer
        return [Copy(layer, slot)]
