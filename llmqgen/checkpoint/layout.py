"""What a training checkpoint holds, derived from its plan: one description for the Trainer that writes
and loads the state, and for every reader of a checkpoint (resume, `llmqgen export`).

A checkpoint stores, per parameter instance (`layers.3.qkv`, `embedding`, ...), the master weight
(`master.<name>`; the work copy where it serves as master) and the Adam moments (`adam_m.<name>`,
`adam_v.<name>`), each a whole tensor in the dtype of its row of the plan's memory table. Checkpoints
of llmqgen <= 0.x stored them as flat uint8 byte views; `decode` reads both. Plans with delayed FP8 scaling
add GPU 0's amax history (AMAX_HISTORY_KEY, fp32 [activation slots, amax_history]), optional on reading.
"""
from __future__ import annotations

from math import prod
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from ..plan.memory import memory_table, param_tensors
from ..plan.schema import MemRow, Plan

KINDS = ("params", "adam_m", "adam_v")
PREFIX = {"params": "master", "adam_m": "adam_m", "adam_v": "adam_v"}     # checkpoint key prefix of each kind
AMAX_HISTORY_KEY = "fp8.amax_history"
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32),
          "e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "e5m2": np.dtype(ml_dtypes.float8_e5m2)}


def param_row(rows: Mapping[str, MemRow], name: str) -> str:
    """The row holding a parameter's master: `master.<name>`, or the work copy when it is the master."""
    return f"master.{name}" if f"master.{name}" in rows else f"weights.{name}"


def instances(plan: Plan, rows: Mapping[str, MemRow], what: str) -> Iterator[tuple]:
    """(llmqgen name, row, instance, whole shape, stored dtype) of every tensor of one kind: "params"
    (the masters), "grads", "adam_m" or "adam_v"."""
    for name, shape, per_layer, _ in param_tensors(plan):
        row = param_row(rows, name) if what == "params" else f"{what}.{name}"
        dtype = DTYPES[rows[row].dtype]
        for i in range(plan.model.num_layers if per_layer else 1):
            yield (f"layers.{i}.{name}" if per_layer else name), row, i, tuple(shape), dtype


def state_layout(plan: Plan) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Checkpoint key -> (shape, dtype) of every tensor a checkpoint of `plan` holds."""
    rows = {r.name: r for r in memory_table(plan)}
    return {f"{PREFIX[what]}.{key}": (shape, dtype)
            for what in KINDS for key, _, _, shape, dtype in instances(plan, rows, what)}


class LayoutError(ValueError):
    pass


def decode(tensors: Mapping[str, np.ndarray], plan: Plan, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """The state tensors of a checkpoint written under `plan`, each in its stored dtype and whole shape
    (views, no copies). Reads typed tensors and the older flat uint8 byte views alike."""
    out = {}
    for key, (shape, dtype) in state_layout(plan).items():
        if key not in tensors:
            raise LayoutError(f"{where} lacks tensor {key}: it was not written by `llmqgen run` for "
                              f"{plan.model.name} (or by an llmqgen with another checkpoint layout)")
        a = tensors[key]
        if a.dtype == np.uint8 and dtype != np.uint8:
            if a.size != prod(shape) * dtype.itemsize:
                raise LayoutError(f"{where}: tensor {key} has {a.size} bytes, its plan stores "
                                  f"{prod(shape) * dtype.itemsize} ({dtype.name})")
            a = a.reshape(-1).view(dtype)
        elif a.dtype != dtype or a.size != prod(shape):
            raise LayoutError(f"{where}: tensor {key} is {a.dtype.name} {list(a.shape)}, its plan stores "
                              f"{dtype.name} {list(shape)}")
        out[key] = a.reshape(shape)
    if AMAX_HISTORY_KEY in tensors:
        out[AMAX_HISTORY_KEY] = np.asarray(tensors[AMAX_HISTORY_KEY], np.float32)
    return out


def params_of(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The master weights of decoded state tensors, by llmqgen name (`layers.0.qkv`, `embedding`, ...)."""
    p = PREFIX["params"] + "."
    return {k[len(p):]: a for k, a in state.items() if k.startswith(p)}
