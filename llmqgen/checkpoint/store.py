"""Training checkpoints: crash-safe save, resume, pruning.

root/
  step-000123/        tensors.safetensors (weights by llmqgen name, optimizer state by any name),
                      state.json (llmqgen version, step, schedule position, loader cursor, RNG...),
                      plan.json (the plan the run was made from; its "model" is the model identity)
  latest              "step-000123": the last complete checkpoint

A save writes root/step-000123.tmp-<pid>, fsyncs every file and the directory, renames it into
place and only then repoints `latest`, so a crash or a full disk at any moment leaves the previous
checkpoint whole and `latest` pointing at it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from .. import __version__
from ..models.spec import ModelSpec
from .safetensors import read_safetensors, write_safetensors

TENSORS, STATE, PLAN, LATEST = "tensors.safetensors", "state.json", "plan.json", "latest"
_STEP = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^step-\d+\.(?:tmp|old)-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))
             and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Temp dirs left by writers that died mid-save (never those of a live process)."""
    for p in root.iterdir():
        m = _TMP.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int, keep_every: int, protect: Optional[Path] = None) -> None:
    """Keep the newest `keep_last` checkpoints and every step divisible by `keep_every` (> 0)."""
    ckpts = list_checkpoints(root)
    newest = {p for _, p in ckpts[-keep_last:]} if keep_last > 0 else set()
    for step, path in ckpts:
        if path in newest or path == protect or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: Union[str, os.PathLike], step: int, tensors: Mapping[str, np.ndarray],
                    state: dict, plan_json: str, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write checkpoint `step` atomically, repoint `latest`, prune; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    final = step_dir(root, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        write_safetensors(tmp / TENSORS, tensors, fsync=True)
        doc = {"llmqgen_version": __version__, "step": step, **state}
        _write_text(tmp / STATE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
        _write_text(tmp / PLAN, plan_json)
        _fsync_dir(tmp)
        if final.exists():          # the same step saved again (a resumed run): swap it out
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / f"{LATEST}.tmp-{os.getpid()}"
        _write_text(pointer, final.name + "\n")
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / f"{LATEST}.tmp-{os.getpid()}").unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            prev = list_checkpoints(root)
            kept = f"the previous checkpoint {prev[-1][1].name} is intact" if prev else \
                "no earlier checkpoint exists"
            raise CheckpointError(f"disk full while saving checkpoint step {step} to {root}; "
                                  f"{kept}. Free space, lower --keep-last, or checkpoint to "
                                  "another disk") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last, keep_every, protect=final)
    return final


def resolve(path_or_root: Union[str, os.PathLike], which: Union[str, int] = "latest") -> Path:
    """A checkpoint directory from itself, or from a root and "latest" / a step number."""
    path = Path(path_or_root)
    if (path / STATE).is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path}: no checkpoint found (expected step-NNNNNN directories "
                              "with state.json); check the run directory")
    if which == "latest":
        pointer = path / LATEST
        name = pointer.read_text().strip() if pointer.is_file() else ""
        chosen = path / name if name and (path / name / STATE).is_file() else ckpts[-1][1]
        return chosen
    step = int(str(which).removeprefix("step-"))
    for s, p in ckpts:
        if s == step:
            return p
    raise CheckpointError(f"{path}: no checkpoint of step {step}; have steps "
                          f"{', '.join(str(s) for s, _ in ckpts)}")


def check_model(plan_json: str, expect: ModelSpec, where: Path) -> None:
    model = json.loads(plan_json).get("model")
    if model is None:
        raise CheckpointError(f"{where}: plan.json names no model; cannot check it against "
                              f"{expect.name}")
    want = expect.model_dump(mode="json")
    if model != want:
        if model.get("name") != expect.name:
            raise CheckpointError(f"{where}: checkpoint is of {model.get('name')}, this run is "
                                  f"{expect.name}; resume with the same --model")
        diff = sorted(k for k in set(model) | set(want) if model.get(k) != want.get(k))
        raise CheckpointError(f"{where}: checkpoint's {expect.name} differs from this run's in "
                              f"{', '.join(diff)}; resume with the same model config")


def load_checkpoint(path_or_root: Union[str, os.PathLike], which: Union[str, int] = "latest",
                    expect: Optional[ModelSpec] = None) -> tuple[dict[str, np.ndarray], dict, str]:
    """(tensors, state, plan_json) of a checkpoint; tensors are read-only memory maps."""
    path = resolve(path_or_root, which)
    try:
        plan_json = (path / PLAN).read_text()
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); resume from an earlier "
                              "step") from e
    if expect is not None:
        check_model(plan_json, expect, path)
    return read_safetensors(path / TENSORS), state, plan_json
