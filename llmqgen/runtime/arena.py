"""Arena: the plan's memory table made real, as one device (or one pinned host) allocation.

The rows of a place are laid out in table order, each row `count` contiguous instances of `bytes`.
The planner already rounds every row's `bytes` up to ARENA_ALIGN, so each instance (not only each
row) starts on a 256-byte boundary and the arena's size is exactly the sum of the row totals: the
planner's numbers are the allocation. Rows with lifetime "reserve" (CUDA context, library handles)
are counted by the planner but allocated by nobody here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..plan.schema import MemRow
from . import driver

ALIGN = 256  # cuBLASLt/cuDNN assume 256-byte aligned operands; equals plan.calibration.ARENA_ALIGN


@dataclass(frozen=True)
class Slot:
    offset: int     # bytes from the arena's base
    bytes: int      # one instance
    count: int      # instances, back to back

    @property
    def total(self) -> int:
        return self.bytes * self.count


def layout(rows: Iterable[MemRow], place: str) -> dict[str, Slot]:
    """Offsets of the rows placed at `place` ("device" or "host"), in table order."""
    slots: dict[str, Slot] = {}
    offset = 0
    for row in rows:
        if row.place != place or row.lifetime == "reserve":
            continue
        if row.name in slots:
            raise ValueError(f"memory table has two rows named {row.name!r}: row names must be unique")
        if row.bytes % ALIGN:
            raise ValueError(f"row {row.name!r} has {row.bytes} bytes, not a multiple of {ALIGN}: "
                             f"the planner must round every row up to the arena alignment")
        if row.count < 1:
            raise ValueError(f"row {row.name!r} has count {row.count}: every row needs at least one instance")
        slots[row.name] = Slot(offset, row.bytes, row.count)
        offset += row.bytes * row.count
    return slots


def arena_bytes(slots: dict[str, Slot]) -> int:
    return sum(s.total for s in slots.values())


class Arena:
    """One allocation holding every row of one place; `ptr(name, i)` is the i-th instance's address."""

    def __init__(self, rows: Iterable[MemRow], place: str):
        if place not in ("device", "host"):
            raise ValueError(f"place must be 'device' or 'host', not {place!r}")
        self.place = place
        self.slots = layout(rows, place)
        self.nbytes = arena_bytes(self.slots)
        self.base = driver.alloc(self.nbytes) if place == "device" else driver.host_alloc(self.nbytes)
        if self.base % ALIGN:  # the driver gives 256-byte (device) and page (host) alignment
            raise RuntimeError(f"{place} allocation at {self.base:#x} is not {ALIGN}-byte aligned")
        # where kernels, GEMMs and copies address the rows: pinned host rows are mapped (zero-copy)
        self.device_base = driver.host_device_pointer(self.base) if place == "host" else self.base

    def ptr(self, name: str, index: int = 0) -> int:
        slot = self.slot(name)
        if not 0 <= index < slot.count:
            raise IndexError(f"row {name!r} has {slot.count} instance(s), asked for index {index}")
        return self.base + slot.offset + index * slot.bytes

    def device_ptr(self, name: str, index: int = 0) -> int:
        """`ptr` as the GPU addresses it (the same value for device rows and, with unified addressing,
        for mapped host rows)."""
        return self.ptr(name, index) - self.base + self.device_base

    def slot(self, name: str) -> Slot:
        try:
            return self.slots[name]
        except KeyError:
            raise KeyError(f"no {self.place} row named {name!r} in the memory table "
                           f"(rows here: {', '.join(self.slots) or 'none'})") from None

    def view(self, name: str, index: int = 0, dtype=np.uint8) -> np.ndarray:
        """Host arenas only: a numpy view (no copy) of one instance of a row."""
        if self.place != "host":
            raise TypeError(f"row {name!r} lives on the device: copy it to a host row to read it")
        return driver.host_view(self.ptr(name, index), self.slot(name).bytes, dtype)

    def free(self) -> None:
        if self.base:
            (driver.free if self.place == "device" else driver.host_free)(self.base)
            self.base = 0

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc) -> None:
        self.free()
