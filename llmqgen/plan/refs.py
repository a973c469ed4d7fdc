"""Schedule references, as the runtime binds them and the planner's lifetimes read them: row, instance
(an index expression of the layer), byte offset and shard marker; and the tags of overlapped
collectives. Pure Python (no GPU)."""
from __future__ import annotations


def at(ref: str, i: int) -> str:
    """Instance i of a row reference ("grads.qkv@shard" -> "grads.qkv[3]@shard")."""
    body, sep, shard = ref.partition("@")
    return f"{body}[{i}]{sep}{shard}"


def layer_index(expr: str, layer: int | None) -> int:
    """An index expression of the schedule ("3", "l", "l-1", "l+1", "l%2", "(l+1)%2") at `layer`."""
    if not set(expr) <= set("l0123456789+-%()"):
        raise ValueError(f"index expression {expr!r} is not one of the schedule's forms")
    return int(eval(expr, {"__builtins__": {}}, {"l": layer}))   # noqa: S307 - checked characters only


def split_index(body: str, layer: int | None) -> tuple[str, int | None]:
    if "[" not in body:
        return body, None
    name, idx = body[:-1].split("[", 1)
    return name, layer_index(idx, layer)


def parse_ref(ref: str, layer: int | None) -> tuple[str, int | None, int, bool]:
    """A row reference -> (row name, instance or None, byte offset, this GPU's shard?):
    "lmhead.ln+4096", "act.res[l-1]", "stage.weights.qkv[(l+1)%2]", "grads.qkv[3]@shard"."""
    ref, _, shard = ref.partition("@")
    head, bracket, tail = ref.rpartition("]")
    body, off = (head + bracket, tail) if bracket else ref.partition("+")[::2]
    off = off.lstrip("+")
    name, idx = split_index(body, layer)
    return name, idx, int(off or 0), bool(shard)


def resolve_tag(tag: str, layer: int | None) -> str:
    """"w[l+1]" at layer 3 -> "w[4]": the name under which an overlapped collective is awaited."""
    name, idx = split_index(tag, layer)
    return name if idx is None else f"{name}[{idx}]"
