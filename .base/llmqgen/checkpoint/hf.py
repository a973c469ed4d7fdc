"""Hugging Face model directories <-> llmqgen's fused parameters (see models/hf_names.py)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from ..models.hf_names import name_map, param_shapes
from ..models.spec import ModelSpec
from .safetensors import read_dir, write_sharded

IMPORT_DTYPES = {np.dtype(ml_dtypes.bfloat16), np.dtype("<f4"), np.dtype("<f2")}
_TORCH_DTYPE = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype("<f4"): "float32",
                np.dtype("<f2"): "float16"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class HFCheckpointError(ValueError):
    pass


def import_hf(directory: str | os.PathLike, spec: ModelSpec,
              dtype: Optional[np.dtype] = None) -> dict[str, np.ndarray]:
    """Read an HF model directory (model.safetensors or index + shards) into the fused layout.
    Tensors keep their stored dtype (BF16/F32/F16) unless `dtype` is given."""
    directory = Path(directory)
    hf = read_dir(directory)
    layers = {int(m.group(1)) for n in hf if (m := _LAYER.match(n))}
    if layers and max(layers) + 1 != spec.num_layers:
        raise HFCheckpointError(f"{directory} has {max(layers) + 1} layers, {spec.name} has "
                                f"{spec.num_layers}; pick the model matching the checkpoint "
                                "(or pass its directory as --model)")
    out = {}
    for name, parts in name_map(spec).items():
        arrays = []
        for hf_name, shape in parts:
            if hf_name not in hf:
                hint = (" (the checkpoint ties embeddings; this spec does not)"
                        if hf_name == "lm_head.weight" else "")
                raise HFCheckpointError(f"{directory}: tensor {hf_name} is missing{hint}; is it "
                                        f"a {spec.architecture} checkpoint of {spec.name}?")
            a = hf[hf_name]
            if tuple(a.shape) != shape:
                raise HFCheckpointError(f"{directory}: {hf_name} has shape {tuple(a.shape)}, "
                                        f"{spec.name} needs {shape}; the checkpoint is of another "
                                        "model size")
            if a.dtype not in IMPORT_DTYPES:
                raise HFCheckpointError(f"{directory}: {hf_name} is {a.dtype}; import reads BF16, "
                                        "F32 or F16 checkpoints (dequantize it first)")
            arrays.append(a)
        fused = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        out[name] = np.array(fused, dtype=dtype or fused.dtype)     # own the memory: no mmap
    return out


def split_hf(tensors: Mapping[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Fused llmqgen tensors -> HF tensors (views), after checking every name and shape."""
    shapes = param_shapes(spec)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise HFCheckpointError(f"no tensor {', '.join(missing[:4])}"
                                f"{' …' if len(missing) > 4 else ''} for {spec.name}; is the "
                                "checkpoint of this model?")
    out = {}
    for name, parts in name_map(spec).items():
        a = np.asarray(tensors[name])
        if tuple(a.shape) != shapes[name]:
            raise HFCheckpointError(f"{name} has shape {tuple(a.shape)}, {spec.name} needs "
                                    f"{shapes[name]}")
        row = 0
        for hf_name, shape in parts:
            out[hf_name] = a[row:row + shape[0]]
            row += shape[0]
    return out


def export_hf(tensors: Mapping[str, np.ndarray], spec: ModelSpec, out_dir: str | os.PathLike,
              shard_bytes: int = 5 << 30, dtype: np.dtype = np.dtype(ml_dtypes.bfloat16)) -> list[Path]:
    """Write an HF directory: model.safetensors (or shards + index) in `dtype`, and config.json."""
    from ..models.hf_config import to_hf_config      # the one writer of HF configs
    if np.dtype(dtype) not in _TORCH_DTYPE:
        raise HFCheckpointError(f"export writes bf16, f32 or f16, not {np.dtype(dtype)}")
    out_dir = Path(out_dir)
    hf = {n: np.ascontiguousarray(a, dtype=dtype) for n, a in split_hf(tensors, spec).items()}
    files = write_sharded(out_dir, hf, shard_bytes, metadata={"format": "pt"})
    config = out_dir / "config.json"
    cfg = to_hf_config(spec)
    cfg["torch_dtype"] = _TORCH_DTYPE[np.dtype(dtype)]
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return files + [config]
