"""Arena: the plan's memory table made real, as one device (or one pinned host) allocation.

Each row is `count` contiguous instances of `bytes`. Device rows carry the offsets the planner packed
(plan/lifetimes.py: rows whose lifetimes in the schedule never overlap share bytes) and the arena is
exactly the packed peak; rows without offsets (host rows, an unpacked table) are laid out back to back
in table order. The planner rounds every row's `bytes` up to layout.ARENA_ALIGN and packs at multiples
of it, so each instance (not only each row) starts on an ARENA_ALIGN boundary: the planner's numbers are
the allocation. Rows with lifetime "reserve" (CUDA context, library handles)
are counted by the planner but allocated by nobody here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..layout import ARENA_ALIGN
from ..plan.schema import MemRow
from . import driver


@dataclass(frozen=True)
class Slot:
    offset: int     # bytes from the arena's base
    bytes: int      # one instance
    count: int      # instances, back to back

    @property
    def total(self) -> int:
        return self.bytes * self.count


def layout(rows: Iterable[MemRow], place: str) -> dict[str, Slot]:
    """Offsets of the rows placed at `place` ("device" or "host"): the planned ones, or in table order
    when no row of the place has one."""
    slots: dict[str, Slot] = {}
    offset = 0
    mine = [r for r in rows if r.place == place and r.lifetime != "reserve"]
    planned = any(r.offset is not None for r in mine)
    if planned and any(r.offset is None for r in mine):
        raise ValueError(f"some {place} rows have planned offsets and some do not: pack the whole table")
    for row in mine:
        if row.name in slots:
            raise ValueError(f"memory table has two rows named {row.name!r}: row names must be unique")
        if row.bytes % ARENA_ALIGN:
            raise ValueError(f"row {row.name!r} has {row.bytes} bytes, not a multiple of {ARENA_ALIGN}: "
                             f"the planner must round every row up to the arena alignment")
        if row.count < 1:
            raise ValueError(f"row {row.name!r} has count {row.count}: every row needs at least one instance")
        if planned:
            if row.offset % ARENA_ALIGN:
                raise ValueError(f"row {row.name!r} is planned at offset {row.offset}, not a multiple of {ARENA_ALIGN}")
            slots[row.name] = Slot(row.offset, row.bytes, row.count)
        else:
            slots[row.name] = Slot(offset, row.bytes, row.count)
            offset += row.bytes * row.count
    return slots


def arena_bytes(slots: dict[str, Slot]) -> int:
    """The allocation: the end of the highest row (the sum of the rows when they are back to back)."""
    return max((s.offset + s.total for s in slots.values()), default=0)


class Arena:
    """One allocation holding every row of one place; `ptr(name, i)` is the i-th instance's address."""

    def __init__(self, rows: Iterable[MemRow], place: str):
        if place not in ("device", "host"):
            raise ValueError(f"place must be 'device' or 'host', not {place!r}")
        self.place = place
        self.slots = layout(rows, place)
        self.nbytes = arena_bytes(self.slots)
        self.base = driver.alloc(self.nbytes) if place == "device" else driver.host_alloc(self.nbytes)
        if self.base % ARENA_ALIGN:  # the driver gives 256-byte (device) and page (host) alignment
            raise RuntimeError(f"{place} allocation at {self.base:#x} is not {ARENA_ALIGN}-byte aligned")
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
