"""Kernel: one generated CUDA kernel and how it is launched (a row of kernels.json)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Kernel:
    name: str                          # extern "C" symbol, llmq_<op>_<variant>
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[str, str], ...]  # (name, C type) in signature order, e.g. ("out", "__nv_bfloat16*")
    smem: int = 0                      # dynamic shared memory, bytes
    doc: str = ""                      # one line: the math it does
    meta: dict = field(default_factory=dict, compare=False)  # family-specific facts (e.g. rows, tile)
    # What the runtime launches it for where no schedule "kernel" operation names it: a schedule operation
    # kind ("attention_backward": its kernels run in table order) or a collective's arithmetic
    # ("reduce_scatter"); "adamw": the schedule names it, the runtime sizes its grid for the running GPU.
    role: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["args"] = [{"name": n, "type": t} for n, t in self.args]
        return d


def kernel_from_json(d: dict) -> Kernel:
    """A row of kernels.json back into a Kernel."""
    return Kernel(name=d["name"], grid=tuple(d["grid"]), block=tuple(d["block"]),
                  args=tuple((a["name"], a["type"]) for a in d["args"]), smem=d.get("smem", 0),
                  doc=d.get("doc", ""), meta=d.get("meta", {}), role=d.get("role", ""))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
