"""llmqgen's initialisation recipe for training from scratch."""
from __future__ import annotations

import math

import numpy as np

from .hf_names import param_shapes
from .spec import ModelSpec

INIT_STD = 0.02
_NORMS = ("ln1", "ln2", "q_norm", "k_norm")       # per-layer vectors initialised to one
_OUT_PROJECTIONS = ("attn_out", "down")           # written into the residual: scaled by 1/sqrt(2L)


def init_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """numpy fp32 in param_shapes order: matrices ~ N(0, 0.02), the residual output projections
    ~ N(0, 0.02 / sqrt(2 L)), norm weights one, biases zero. Same seed, same numbers."""
    rng = np.random.default_rng(seed)
    out_std = INIT_STD / math.sqrt(2 * spec.num_layers)
    params = {}
    for name, shape in param_shapes(spec).items():
        key = name.rsplit(".", 1)[-1]
        if key in _NORMS or name == "final_norm":
            params[name] = np.ones(shape, np.float32)
        elif key == "qkv_bias":
            params[name] = np.zeros(shape, np.float32)
        else:
            std = out_std if key in _OUT_PROJECTIONS else INIT_STD
            params[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return params
