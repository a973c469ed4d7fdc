"""Hugging Face model directories <-> llmqgen's fused parameters (see models/hf_names.py)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from .. import __version__
from ..models.hf_names import name_map, param_shapes
from ..models.spec import ModelSpec
from .safetensors import INDEX, SINGLE, read_dir, sharded_names, write_sharded

IMPORT_DTYPES = {np.dtype(ml_dtypes.bfloat16), np.dtype("<f4"), np.dtype("<f2")}
_TORCH_DTYPE = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype("<f4"): "float32",
                np.dtype("<f2"): "float16"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
CONFIG = "config.json"
MANIFEST = "llmqgen-export.json"        # the files an export wrote: what a later export there may replace


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
              shard_bytes: int = 5 << 30, dtype: np.dtype = np.dtype(ml_dtypes.bfloat16),
              force: bool = False) -> list[Path]:
    """Write an HF directory: model.safetensors (or shards of at most `shard_bytes` bytes + index) in
    `dtype`, config.json, and `MANIFEST` naming them; every file with the permissions the umask gives. An
    earlier export's files in `out_dir` are replaced (shards of another count removed). Returns the model
    files and config.json. Raises HFCheckpointError, before anything is written, for another dtype than
    bf16/f32/f16, tensors not of `spec`, or files in `out_dir` that no export wrote unless `force` (then
    those stay, except model files that would be read in place of these); OSError where it cannot write."""
    from ..models.hf_config import to_hf_config      # the one writer of HF configs
    if np.dtype(dtype) not in _TORCH_DTYPE:
        raise HFCheckpointError(f"export writes bf16, f32 or f16, not {np.dtype(dtype)}")
    out_dir = Path(out_dir)
    replaced = check_export_folder(out_dir, force)
    hf = {n: np.ascontiguousarray(a, dtype=dtype) for n, a in split_hf(tensors, spec).items()}
    names = sharded_names(hf, shard_bytes) + [CONFIG]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_dir, sorted(replaced | set(names)))     # interrupted from here on: all still ours
    for name in replaced - set(names):
        (out_dir / name).unlink(missing_ok=True)
    files = write_sharded(out_dir, hf, shard_bytes, metadata={"format": "pt"})
    config = out_dir / CONFIG
    cfg = to_hf_config(spec)
    cfg["torch_dtype"] = _TORCH_DTYPE[np.dtype(dtype)]
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_manifest(out_dir, names)
    return files + [config]


def _earlier_export(out_dir: Path) -> set[str]:
    """The files an earlier export wrote into `out_dir`, as its manifest names them (plain file names);
    none where there is no manifest or it is not one an export wrote."""
    try:
        files = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return set()
    plain = isinstance(files, list) and all(isinstance(f, str) and f == Path(f).name and f not in ("", "..")
                                            for f in files)
    return set(files) if plain else set()


def check_export_folder(out_dir: Path, force: bool) -> set[str]:
    """The names of the files in `out_dir` that an export replaces: an earlier export's, and with `force`
    any model files that would be read in place of the new ones (model.safetensors, numbered shards, the
    index). Raises HFCheckpointError where `out_dir` holds other files and not `force`. Reads names only:
    `llmqgen export` asks before it reads (and hashes) the checkpoint."""
    if not out_dir.is_dir():
        return set()
    present = {p.name for p in out_dir.iterdir()} - {MANIFEST}
    earlier = _earlier_export(out_dir) & present
    other = sorted(present - earlier)
    if other and not force:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise HFCheckpointError(f"{out_dir} holds files that no llmqgen export wrote ({shown}): export into a new "
                                f"or empty folder, or add --force to write there anyway (its model safetensors "
                                f"files and {CONFIG} are replaced, other files kept)")
    return (earlier | {n for n in present if n in (SINGLE, INDEX) or _SHARD.match(n)}) if force else earlier


def _write_manifest(out_dir: Path, files: list[str]) -> None:
    doc = {"written_by": f"llmqgen {__version__} export", "files": files,
           "note": "a later llmqgen export into this folder replaces these files"}
    (out_dir / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
