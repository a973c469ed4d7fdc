"""Training checkpoints: crash-safe save, resume, pruning.

root/
  step-000123/        tensors.safetensors (weights by llmqgen name, optimizer state by any name),
                      state.json (llmqgen version, step, schedule position, loader cursor, RNG...),
                      plan.json (the plan the run was made from; its "model" is the model identity)
  latest              "step-000123": the last complete checkpoint

state.json also records the byte size and SHA-256 of tensors.safetensors and plan.json ("files"), so that
a checkpoint damaged after it was written (a partial copy, a disk error) is found before it is used:
`resolve("latest")` passes over damaged checkpoints to the newest intact one (and says so), and a damaged
checkpoint named explicitly is refused with the newest intact one named. `read_checkpoint` is the one
reader of the format (resume and `llmqgen export` both use it); `layout.py` says what the tensors are.

A save writes root/step-000123.tmp-<pid>, fsyncs every file and the directory, renames it into
place and only then repoints `latest`, so a crash or a full disk at any moment leaves the previous
checkpoint whole and `latest` pointing at it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from .. import __version__
from ..models.spec import ModelSpec
from .safetensors import SafetensorsError, read_header, read_safetensors, write_safetensors

TENSORS, STATE, PLAN, LATEST = "tensors.safetensors", "state.json", "plan.json", "latest"
_STEP = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^step-\d+\.(?:tmp|old)-(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be used; the message names it and what to do."""


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
    """Keep the newest `keep_last` checkpoints (0: all of them) and every step divisible by `keep_every`
    (> 0); delete the others."""
    if keep_last == 0:
        return
    ckpts = list_checkpoints(root)
    newest = {p for _, p in ckpts[-keep_last:]}
    for step, path in ckpts:
        if path in newest or path == protect or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: Union[str, os.PathLike], step: int, tensors: Mapping[str, np.ndarray],
                    state: dict, plan_json: str, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write checkpoint `step` atomically, repoint `latest`, prune (`prune`: `keep_last` 0 keeps all);
    returns its directory. Raises CheckpointError on a full disk (the previous checkpoint intact), OSError
    for other write failures."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    final = step_dir(root, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        digest = hashlib.sha256()
        write_safetensors(tmp / TENSORS, tensors, fsync=True, digest=digest)
        _write_text(tmp / PLAN, plan_json)
        files = {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size, "sha256": digest.hexdigest()},
                 PLAN: {"bytes": (tmp / PLAN).stat().st_size, "sha256": _sha256(tmp / PLAN)}}
        doc = {**state, "llmqgen_version": __version__, "step": step, "files": files}
        _write_text(tmp / STATE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, deep: bool = True) -> Optional[str]:
    """None if the checkpoint directory is intact, else what is wrong with it. Checks state.json, the
    recorded size (and with `deep` the SHA-256) of each file, and the safetensors header against the
    file's size (which alone catches truncation in checkpoints that predate the recorded sizes)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE} holds no step"
        named = _STEP.match(path.name)      # state.json carries no hash of its own: its step must be the folder's
        if named and int(named.group(1)) != state["step"]:
            return f"{STATE} says step {state['step']}, the folder is step {int(named.group(1))}"
    except FileNotFoundError:
        return f"{STATE} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{STATE} is unreadable ({e})"
    for name in (TENSORS, PLAN):
        if not (path / name).is_file():
            return f"{name} is missing"
    for name, rec in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec.get("bytes"):
            return f"{name} has {size:,} bytes, {rec.get('bytes'):,} were written"
        if deep and rec.get("sha256") and _sha256(f) != rec["sha256"]:
            return f"{name} does not match the SHA-256 recorded when it was written"
    try:
        read_header(path / TENSORS)
    except (OSError, SafetensorsError) as e:
        return f"{TENSORS}: {e}"
    return None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step-N directory under root, complete or not, oldest first."""
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP.match(p.name)) and p.is_dir()) if root.is_dir() else []


def _newest_intact(root: Path, below: Optional[int] = None, deep: bool = True) -> Optional[Path]:
    for step, p in reversed(step_dirs(root)):
        if (below is None or step < below) and verify(p, deep) is None:
            return p
    return None


def _root_of(path: Path) -> Path:
    """A run directory (holding checkpoints/) -> its checkpoint root; anything else unchanged."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() and not _STEP.match(path.name) else path


def _refuse_damaged(p: Path, problem: str, root: Path, deep: bool) -> CheckpointError:
    ok = _newest_intact(root, deep=deep)
    hint = (f"the newest intact checkpoint is {ok.name} (step {int(_STEP.match(ok.name).group(1))})"
            if ok else "no intact checkpoint is left: start the run again in another --out")
    return CheckpointError(f"checkpoint {p} is damaged: {problem}; {hint}")


def _step_number(which: Union[str, int]) -> int:
    try:
        return int(str(which).removeprefix("step-"))
    except ValueError:
        raise CheckpointError(f"{which!r} is not a checkpoint: use latest or a step number") from None


def resolve(path_or_root: Union[str, os.PathLike], which: Union[str, int] = "latest", deep: bool = True) -> Path:
    """An intact checkpoint directory: `path_or_root` itself if it is one (a step directory), else a
    step of a checkpoint root or run directory: "latest" (the newest intact one: damaged newer ones are
    passed over, each logged as a warning) or a step number (refused if damaged)."""
    path = Path(path_or_root)
    if _STEP.match(path.name) and path.is_dir():             # one step directory, named directly
        if which != "latest" and _step_number(which) != int(_STEP.match(path.name).group(1)):
            raise CheckpointError(f"{path} is the checkpoint of one step, and step {which} was asked for: "
                                  f"give the run directory with a step, or the step directory alone")
        problem = verify(path, deep)
        if problem:
            raise _refuse_damaged(path, problem, path.parent, deep)
        return path
    root = _root_of(path)
    dirs = step_dirs(root)
    if not dirs:
        raise CheckpointError(f"{path}: no checkpoint found (expected a run directory, its checkpoints/ "
                              "or a step-NNNNNN directory made by `llmqgen run`)")
    if which == "latest":
        pointer = root / LATEST
        name = pointer.read_text().strip() if pointer.is_file() else ""
        named = [(s, p) for s, p in dirs if p.name == name]
        # the pointer's checkpoint first (the last one written), then older ones, then any others
        order = (named + [(s, p) for s, p in reversed(dirs) if named and s < named[0][0]]
                 + [(s, p) for s, p in reversed(dirs) if not named or s > named[0][0]])
        damaged = []
        for _, p in order:
            problem = verify(p, deep)
            if problem is None:
                for d, why in damaged:
                    logger.warning(f"checkpoint {d} is damaged ({why}); using {p.name} instead")
                return p
            damaged.append((p.name, problem))
        raise CheckpointError(f"{root}: every checkpoint is damaged ("
                              + "; ".join(f"{d}: {why}" for d, why in damaged)
                              + "): start the run again in another --out")
    step = _step_number(which)
    for s, p in dirs:
        if s == step:
            problem = verify(p, deep)
            if problem:
                raise _refuse_damaged(p, problem, root, deep)
            return p
    have = [f"{s}" + ("" if verify(p, deep=False) is None else " (damaged)") for s, p in dirs]
    raise CheckpointError(f"{root}: no checkpoint of step {step}; have steps {', '.join(have)}")


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
    """(tensors as stored, state, plan_json) of a checkpoint; tensors are read-only memory maps."""
    return _load(resolve(path_or_root, which), expect)


def _load(path: Path, expect: Optional[ModelSpec]) -> tuple[dict[str, np.ndarray], dict, str]:
    try:
        plan_json = (path / PLAN).read_text()
        state = json.loads((path / STATE).read_text())
        tensors = read_safetensors(path / TENSORS)
    except (OSError, json.JSONDecodeError, SafetensorsError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); resume from an earlier "
                              "step") from e
    if expect is not None:
        check_model(plan_json, expect, path)
    return tensors, state, plan_json


@dataclass
class TrainingCheckpoint:
    """A checkpoint written by `llmqgen run`: its directory, state.json, plan and tensors as stored."""
    path: Path
    state: dict
    plan_json: str
    tensors: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def plan(self):
        from pydantic import ValidationError

        from ..plan.schema import Plan, validation_summary
        try:
            return Plan.from_json(self.plan_json)
        except ValidationError as e:
            raise CheckpointError(f"{self.path}: its plan.json is not a plan this llmqgen reads "
                                  f"({validation_summary(e)})") from None

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Masters and Adam moments by checkpoint key, each in its stored dtype and whole shape."""
        from .layout import LayoutError, decode
        try:
            return decode(self.tensors, self.plan(), str(self.path))
        except LayoutError as e:
            raise CheckpointError(str(e)) from e

    def params(self) -> dict[str, np.ndarray]:
        """The master weights by llmqgen name (`layers.0.qkv`, ...), in their stored dtype."""
        from .layout import params_of
        return params_of(self.state_tensors())


def read_checkpoint(path_or_root: Union[str, os.PathLike], which: Union[str, int] = "latest",
                    expect: Optional[ModelSpec] = None) -> TrainingCheckpoint:
    """The one reader of training checkpoints (resume and export): a run directory, its checkpoints/
    root (then `which`: latest = the newest intact one, or a step) or one step directory."""
    path = resolve(path_or_root, which)
    tensors, state, plan_json = _load(path, expect)
    return TrainingCheckpoint(path, state, plan_json, tensors)
