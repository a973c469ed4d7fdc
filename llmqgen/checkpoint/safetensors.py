"""The safetensors format with numpy + ml_dtypes (no torch): Hugging Face files are written by the
safetensors package's numpy API (`write_sharded`); reading is our own, zero-copy (memory-mapped, the
tensors are views of the file), and `write_safetensors` streams a checkpoint's tensors with a
running digest and fsync.

File: u64 little-endian N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {str: str}} padded with spaces so the data start 8-byte aligned, then the tensor
bytes (offsets relative to the data start). Large models are split into several files named by
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: file}}).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    pass


def _dtype_name(a: np.ndarray, name: str) -> str:
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt not in _NAMES:
        raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name "
                               f"(supported: {', '.join(DTYPES)})")
    return _NAMES[dt]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None, fsync: bool = False,
                      digest=None) -> Path:
    """Write `tensors` (in the given order) to one file; `fsync` flushes it to disk before closing;
    `digest` (a hashlib object) is fed every byte written."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, a in tensors.items():
        size = np.asarray(a).nbytes
        header[name] = {"dtype": _dtype_name(np.asarray(a), name), "shape": list(np.shape(a)),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    with open(path, "wb") as f:
        def put(data):
            f.write(data)
            if digest is not None:
                digest.update(data)
        put(struct.pack("<Q", len(blob)))
        put(blob)
        for a in tensors.values():
            a = np.ascontiguousarray(a)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            put(a.reshape(-1).view(np.uint8).data)     # bytes view: also for bf16/fp8
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of one file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} is invalid for a {size}-byte file; "
                                   "the file is not safetensors or is truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, e in header.items():
        if e.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')}")
        b, end = e["data_offsets"]
        want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
        if end - b != want or not 0 <= b <= end <= data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} offsets {b}..{end} do not fit its shape "
                                   f"{e['shape']} or the {data_len} data bytes; the file is "
                                   "damaged or truncated")
    return header, meta, 8 + n


def read_safetensors(path: str | os.PathLike, names: Optional[Iterable[str]] = None,
                     mmap: bool = True) -> dict[str, np.ndarray]:
    """The tensors of one file (all, or `names`), memory-mapped read-only unless mmap=False."""
    path = Path(path)
    header, _, start = read_header(path)
    wanted = list(header) if names is None else list(names)
    missing = [n for n in wanted if n not in header]
    if missing:
        raise SafetensorsError(f"{path}: no tensor named {', '.join(missing[:5])}")
    data = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, np.uint8)
    out = {}
    for name in wanted:
        e = header[name]
        b, end = e["data_offsets"]
        out[name] = data[start + b:start + end].view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def _umask() -> int:
    """The process's file-mode creation mask (os.umask sets it while reading it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_file(path: Path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]],
               fsync: bool) -> Path:
    """One Hugging Face file, written by the safetensors package (bf16 and fp8 through ml_dtypes), with the
    permissions of any new file under the umask (the package writes 0600)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        _dtype_name(a, name)                       # our one-line error for a dtype safetensors lacks
        arrays[name] = np.ascontiguousarray(a)
    try:
        save_file(arrays, str(path), metadata=dict(metadata) if metadata else None)
    except (SafetensorError, ValueError, TypeError) as e:
        raise SafetensorsError(f"{path}: the safetensors package could not write it ({e})") from None
    os.chmod(path, 0o666 & ~_umask())
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _groups(tensors: Mapping[str, np.ndarray], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """`tensors` in order, cut into files of at most `shard_bytes` (a larger tensor alone in one)."""
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        nbytes = np.asarray(a).nbytes
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = a
        size += nbytes
    return groups


def sharded_names(tensors: Mapping[str, np.ndarray], shard_bytes: int = 5 << 30) -> list[str]:
    """The names of the files `write_sharded` writes for `tensors`: [model.safetensors], or the numbered
    shards and the index last."""
    return _names(len(_groups(tensors, shard_bytes)))


def _names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)] + [INDEX]


def write_sharded(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                  shard_bytes: int = 5 << 30, metadata: Optional[Mapping[str, str]] = None,
                  fsync: bool = False) -> list[Path]:
    """`model.safetensors` when everything fits in `shard_bytes` (bytes), else numbered shards + index
    (`sharded_names`); files of those names are replaced, no other file of `directory` is touched (an
    earlier export's other files are the caller's: checkpoint/hf.py). Raises SafetensorsError for a
    tensor the format cannot hold, OSError where the directory cannot be written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups = _groups(tensors, shard_bytes)
    names = _names(len(groups))
    files = [_save_file(directory / name, g, metadata, fsync) for name, g in zip(names, groups)]
    if names[-1] != INDEX:
        return files
    weight_map = {n: name for name, g in zip(names, groups) for n in g}
    total = sum(np.asarray(a).nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [directory / INDEX]


def read_dir(directory: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a directory holding `model.safetensors` or an index with its shards."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{directory / INDEX}: malformed index ({e})") from e
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        out = {}
        for fname, names in by_file.items():
            if not (directory / fname).is_file():
                raise SafetensorsError(f"{directory}: shard {fname} named by {INDEX} is missing; "
                                       "download the complete checkpoint")
            out.update(read_safetensors(directory / fname, names, mmap))
        return out
    if (directory / SINGLE).is_file():
        return read_safetensors(directory / SINGLE, mmap=mmap)
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return read_safetensors(directory / found[0], mmap=mmap)
    raise SafetensorsError(f"{directory}: no {SINGLE} or {INDEX} (found {found or 'no'} "
                           "safetensors files); point at an HF model directory")
