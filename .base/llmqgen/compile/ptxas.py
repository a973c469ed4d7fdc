"""Read ptxas's verbose report (-Xptxas=-v) into numbers per kernel.

    ptxas info    : Compiling entry function 'llmq_x' for 'sm_90'
    ptxas info    : Function properties for llmq_x
    ptxas         .     16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]

Only entry functions (kernels) are reported; non-inlined device functions have properties too,
but no registers line of their own.
"""
from __future__ import annotations

import re

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_NUM = {
    "registers": re.compile(r"Used (\d+) registers"),
    "barriers": re.compile(r"used (\d+) barriers"),
    "smem_bytes": re.compile(r"(\d+) bytes smem"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
FIELDS = tuple(_NUM)


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {registers, barriers, smem_bytes, stack_bytes, spill_stores, spill_loads}}."""
    kernels: dict[str, dict[str, int]] = {}
    props: dict[str, dict[str, int]] = {}   # stack/spill lines of every function, entry or not
    entry = current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            kernels[entry] = dict.fromkeys(FIELDS, 0)
            continue
        if m := _PROPS.search(line):
            current = m.group(1)
            continue
        found = {k: int(m.group(1)) for k, rx in _NUM.items() if (m := rx.search(line))}
        if "stack_bytes" in found and current is not None:
            props[current] = found
        elif "registers" in found and entry is not None:
            kernels[entry].update(found)
    for name, info in kernels.items():
        info.update(props.get(name, {}))
    return kernels


def spilling(info: dict[str, dict[str, int]]) -> list[str]:
    """Kernels that spill registers to local memory (slow: worth a look at their launch bounds)."""
    return sorted(k for k, v in info.items() if v["spill_stores"] or v["spill_loads"])
