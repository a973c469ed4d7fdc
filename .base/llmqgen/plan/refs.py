"""Schedule references: typed while the schedule is built, strings in schedule.json, read back here.

    Ref("act.res", "l")                 "act.res[l]"        layer l's instance of a per-layer row
    Ref("lmhead.ln", offset=4096)       "lmhead.ln+4096"    a byte offset into a row
    Ref("grads.qkv", "l", shard=True)   "grads.qkv[l]@shard"  this GPU's shard of a whole row
    Fp8Ref("ln1", "l", descale=True)    "fp8:ln1[l]/descale"  a tensor's FP8 stats slot (amax; descale +16)
    Scalar("grad_scale")                "scalar:grad_scale"   a float of stats.scalars
    Seed("qkv")                         "seed:qkv"          a stochastic-rounding stream
Index expressions of the layer l: "3", "l", "l-1", "l+1", "l%2", "(l+1)%2", "(l-1)%2", "l+1-2". Tags of overlapped
collectives and copies take one too ("w[l+1]"). Pure Python (no GPU).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_MODULO = re.compile(r"\((.+)\)%(\d+)|(.+?)%(\d+)")
_SUM = re.compile(r"(?:l|\d+)(?:[+-](?:l|\d+))*")
_TERM = re.compile(r"([+-]?)(l|\d+)")


@dataclass(frozen=True)
class Ref:
    """A row of the memory table: instance `index` (an index expression, None: the row itself), a byte
    `offset` into it, or this GPU's `shard` of it."""
    row: str
    index: str | None = None
    offset: int | None = None
    shard: bool = False

    def __str__(self) -> str:
        return (self.row + ("" if self.index is None else f"[{self.index}]")
                + ("" if self.offset is None else f"+{self.offset}") + ("@shard" if self.shard else ""))

    def whole(self) -> bool:
        """The whole row (not an offset into it, nor a shard): a write of it kills the row's old value."""
        return self.offset is None and not self.shard

    @classmethod
    def parse(cls, text: str) -> Ref:
        """The reference a string of schedule.json names ("grads.qkv[3]@shard" -> Ref("grads.qkv", "3",
        shard=True))."""
        body, at, shard = text.partition("@")
        if at and shard != "shard":
            raise ValueError(f"reference {text!r}: only '@shard' may follow '@'")
        head, bracket, tail = body.rpartition("]")
        body, plus, off = (head + bracket, tail[:1], tail[1:]) if bracket else body.partition("+")
        index = None
        if body.endswith("]"):
            body, _, index = body[:-1].partition("[")
        return cls(body, index, int(off) if plus else None, bool(at))


@dataclass(frozen=True)
class Fp8Ref:
    """A tensor's FP8 stats slot (layer `index`'s; None: a slot of its own, "sink"); `descale`: its
    descale (layout.FP8_DESCALE_OFFSET) instead of its amax."""
    slot: str
    index: str | None = "l"
    descale: bool = False

    def __str__(self) -> str:
        return f"fp8:{self.slot}" + ("" if self.index is None else f"[{self.index}]") + ("/descale" if self.descale else "")


@dataclass(frozen=True)
class Scalar:
    """A float of stats.scalars (layout.SCALARS gives its index)."""
    name: str

    def __str__(self) -> str:
        return f"scalar:{self.name}"


@dataclass(frozen=True)
class Seed:
    """The stochastic-rounding stream of a tensor's optimizer update."""
    name: str

    def __str__(self) -> str:
        return f"seed:{self.name}"


def row_ref(value) -> Ref | None:
    """The row reference a schedule value names (a string of schedule.json), or None: numbers, tags,
    FP8 slots, scalars and seeds."""
    if not isinstance(value, str) or "." not in value or value.startswith(("fp8:", "scalar:", "seed:")):
        return None
    return Ref.parse(value)


def at(ref: str, i: int) -> str:
    """Instance i of a row reference ("grads.qkv@shard" -> "grads.qkv[3]@shard")."""
    body, sep, shard = ref.partition("@")
    return f"{body}[{i}]{sep}{shard}"


def layer_index(expr: str, layer: int | None) -> int:
    """An index expression of the schedule ("3", "l", "l-1", "l+1", "l%2", "(l+1)%2", "l+1-2") at `layer`:
    a sum of l and numbers, optionally modulo a number."""
    body, mod = expr, None
    m = _MODULO.fullmatch(expr)
    if m:
        body, mod = (m[1], m[2]) if m[1] else (m[3], m[4])
    if not _SUM.fullmatch(body):
        raise ValueError(f"index expression {expr!r} is not one of the schedule's forms")
    value = sum((-1 if sign == "-" else 1) * (layer if t == "l" else int(t)) for sign, t in _TERM.findall(body))
    return value % int(mod) if mod else value


def split_index(body: str, layer: int | None) -> tuple[str, int | None]:
    if "[" not in body:
        return body, None
    name, idx = body[:-1].split("[", 1)
    return name, layer_index(idx, layer)


def parse_ref(ref: str, layer: int | None) -> tuple[str, int | None, int, bool]:
    """A row reference -> (row name, instance or None, byte offset, this GPU's shard?):
    "lmhead.ln+4096", "act.res[l-1]", "stage.weights.qkv[(l+1)%2]", "grads.qkv[3]@shard"."""
    r = Ref.parse(ref)
    return r.row, None if r.index is None else layer_index(r.index, layer), r.offset or 0, r.shard


def resolve_tag(tag: str, layer: int | None) -> str:
    """"w[l+1]" at layer 3 -> "w[4]": the name under which an overlapped collective is awaited."""
    name, idx = split_index(tag, layer)
    return name if idx is None else f"{name}[{idx}]"
