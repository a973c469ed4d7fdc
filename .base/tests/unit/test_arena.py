"""Arena layout on CPU: the planner's rows become offsets, 256-byte aligned, summing exactly."""
import random

import pytest

from llmqgen.layout import ARENA_ALIGN
from llmqgen.plan.schema import MemRow
from llmqgen.runtime.arena import Slot, arena_bytes, layout


def row(name, nbytes, count=1, place="device", lifetime="persistent"):
    return MemRow(name=name, bytes=nbytes, count=count, place=place, lifetime=lifetime,
                  dtype="uint8", shape=(nbytes,))


def test_rows_in_order_back_to_back():
    rows = [row("w", 512, count=3, lifetime="per_layer"), row("h", 256, place="host"),
            row("x", 1024), row("ctx", 640 << 20, lifetime="reserve")]
    dev = layout(rows, "device")
    assert list(dev) == ["w", "x"]
    assert dev["w"] == Slot(0, 512, 3)
    assert dev["x"] == Slot(1536, 1024, 1)
    assert arena_bytes(dev) == 512 * 3 + 1024
    assert layout(rows, "host") == {"h": Slot(0, 256, 1)}


def test_random_tables_align_and_sum_exactly():
    rng = random.Random(0)
    for _ in range(50):
        rows = [row(f"r{i}", ARENA_ALIGN * rng.randint(0, 4000), count=rng.randint(1, 80),
                    place=rng.choice(["device", "host"])) for i in range(rng.randint(1, 40))]
        for place in ("device", "host"):
            slots = layout(rows, place)
            mine = [r for r in rows if r.place == place]
            assert arena_bytes(slots) == sum(r.total for r in mine)
            end = 0
            for r in mine:  # contiguous, in table order, every instance aligned
                s = slots[r.name]
                assert s.offset == end and s.offset % ARENA_ALIGN == 0 and s.bytes % ARENA_ALIGN == 0
                end = s.offset + s.total


def test_unaligned_row_is_rejected_with_advice():
    with pytest.raises(ValueError, match="multiple of 256"):
        layout([row("bad", 100)], "device")


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="unique"):
        layout([row("a", 256), row("a", 512)], "device")


def test_planned_offsets_are_used_and_the_arena_is_the_peak():
    rows = [row("p", 512), row("a", 1024, lifetime="shared").model_copy(update={"offset": 512}),
            row("b", 768, lifetime="shared").model_copy(update={"offset": 512}),
            row("h", 256, place="host"), row("ctx", 640 << 20, lifetime="reserve")]
    rows[0] = rows[0].model_copy(update={"offset": 0})
    dev = layout(rows, "device")
    assert dev == {"p": Slot(0, 512, 1), "a": Slot(512, 1024, 1), "b": Slot(512, 768, 1)}
    assert arena_bytes(dev) == 1536                  # a and b share bytes: the peak, not the sum
    assert layout(rows, "host") == {"h": Slot(0, 256, 1)}


def test_half_planned_or_unaligned_offsets_rejected():
    with pytest.raises(ValueError, match="pack the whole table"):
        layout([row("a", 256).model_copy(update={"offset": 0}), row("b", 256)], "device")
    with pytest.raises(ValueError, match="offset 100"):
        layout([row("a", 256).model_copy(update={"offset": 100})], "device")
