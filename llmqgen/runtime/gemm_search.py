"""Choosing each GEMM's cuBLASLt algorithm by timing. The heuristic ranks up to blas.HEURISTIC_CANDIDATES
algorithms, and its first pick is often not the fastest (bench/gemm_candidates.py on an H200,
bench/results/issue13-gemm-candidates-*.json: the fastest candidates take 5.7% less GEMM time than the first
picks in a Qwen2.5-0.5B BF16 step, 2.8% in a 7B one, 10-20% less for FP8 with fast accumulation).

A rank times its micro-step's GEMMs as it binds them, before anything lives in its arena (runtime/rank.py):
each GEMM's operands are filled with random values of their dtypes (all-zero operands draw less power and
would rank the candidates by other clocks than training sees), and its candidates are timed between CUDA
events (`fastest`). Choices are kept by "<GPU> | cuBLASLt <version> | <N> MiB workspace" (runtime/rank.py)
and the Gemm's label, and looked up in this order before anything is timed:

  1. this process (the ranks of one process share them);
  2. the build folder's gemm_algos.json: the build's record, read by a resume, by the other ranks' processes
     and by `bench`, so that another run of the build repeats the first bit for bit;
  3. the machine's cache, $LLMQGEN_CACHE_DIR/gemm/<GPU, cuBLASLt and workspace>/choices.json: other builds on this GPU
     model take the same algorithm for the same GEMM, so plans whose arithmetic is the same (recompute and
     offload variants) repeat each other bit for bit, and no build times a GEMM twice.

Files are written under file locks; a folder that cannot be written, or a broken file, keeps the choice for
this process only (with a warning)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from filelock import FileLock

from . import driver

if TYPE_CHECKING:          # blas needs nvmath, which CPU-only installs lack
    from .blas import Gemm

CHOICES = "gemm_algos.json"
MACHINE = "gemm"           # the machine cache's folder under the cache root (`llmqgen cache` lists it)
TIME_MS = 10.0             # timed runs per candidate and round: enough of them to last this long
MIN_REPS = 3               # (and at least this many)
ROUNDS = 3
MARGIN = 0.03              # how much faster than the heuristic's first pick another candidate must be
log = logging.getLogger(__name__)
_chosen: dict[str, int] = {}        # this process's choices, by "<where> | <label>"


def fastest(g: Gemm, run: Callable[[], None], stream: int) -> int:
    """Index of the fastest of `g`'s heuristic candidates; `run` enqueues `g` on `stream` on operands it may
    overwrite (its output, and its accumulator when it accumulates).

    ROUNDS rounds time every candidate in turn for about TIME_MS (so that each sees the clocks the others
    leave, not a cold GPU's boost), and a candidate's time is its median round. Another candidate replaces the
    heuristic's first pick only when it is MARGIN faster: a short timing ranks near-equal algorithms by
    noise, and the first pick is what every earlier measurement of this project ran."""
    start, end = driver.event_create(timing=True), driver.event_create(timing=True)
    times: dict[int, list[float]] = {}
    try:
        for _ in range(ROUNDS):
            for i in range(g.found):
                if i in times and not times[i]:
                    continue                # failed before
                g.use(i)
                try:
                    ms = _time(run, stream, start, end, 1)
                    ms = _time(run, stream, start, end, max(MIN_REPS, math.ceil(TIME_MS / max(ms, 1e-3))))
                except RuntimeError:        # a candidate the heuristic offered that fails for these operands
                    times[i] = []
                    continue
                times.setdefault(i, []).append(ms)
    finally:
        driver.event_destroy(start)
        driver.event_destroy(end)
    median = {i: statistics.median(t) for i, t in times.items() if t}
    if not median:
        raise RuntimeError(f"GEMM {g.label}: none of the {g.found} algorithms cuBLASLt offered runs")
    best = min(median, key=median.get)
    if 0 in median and median[best] > (1 - MARGIN) * median[0]:
        best = 0
    log.debug("GEMM %s: algorithm %d of %d, %.3f ms (first pick %.3f ms)", g.label, best, g.found,
             median[best], median.get(0, float("nan")))
    return best


def _time(run: Callable[[], None], stream: int, start: int, end: int, reps: int) -> float:
    """Mean ms of `reps` runs between events."""
    driver.event_record(start, stream)
    for _ in range(reps):
        run()
    driver.event_record(end, stream)
    driver.event_synchronize(end)
    return driver.event_elapsed_ms(start, end) / reps


def saved(folder: Path) -> dict[str, int]:
    """The choices kept in build folder `folder` ({} when none or unreadable): "<where> | <label>" -> index."""
    return _read(Path(folder) / CHOICES)


def machine_file(where: str, root: Path) -> Path:
    """The machine cache's file for one GPU model and cuBLASLt version (`where`) under cache root `root`."""
    return root / MACHINE / re.sub(r"[^A-Za-z0-9.]+", "-", where).strip("-") / "choices.json"


def choose(g: Gemm, where: str, folder: Path, machine: Optional[Path],
           timer: Optional[Callable[[], int]] = None) -> int:
    """Make `g` use its kept algorithm, or (first time on this GPU) the one `timer` finds fastest; returns the
    index. `where` names the GPU model and cuBLASLt version; `folder` is the build folder; `machine` the
    machine cache's file (None: no machine cache). Without a `timer` (the operands are live: nothing may be
    overwritten) a GEMM that was never timed takes the heuristic's first pick, and nothing is kept."""
    if g.found == 1:                                # nothing to choose, time or keep
        g.use(0)
        return 0
    key = f"{where} | {g.label}"
    if key not in _chosen:
        mine = Path(folder) / CHOICES
        i = _valid(_read(mine).get(key), g)
        if i is None:
            i = _machine_choice(g, machine, timer)
            if i is not None:
                _keep(mine, key, i)
        _chosen[key] = 0 if i is None else i
    g.use(_chosen[key])
    return _chosen[key]


def _machine_choice(g: Gemm, machine: Optional[Path], timer: Optional[Callable[[], int]]) -> Optional[int]:
    """`g`'s choice from the machine cache, or timed now and kept there; None when neither can be had."""
    if machine is None:
        return timer() if timer is not None else None
    with _locked(machine):                      # one process times a GEMM; the others wait and read it
        i = _valid(_read(machine).get(g.label), g)
        if i is None and timer is not None:
            i = timer()
            _keep(machine, g.label, i, lock=False)
    return i


def _valid(i, g: Gemm) -> Optional[int]:
    return i if isinstance(i, int) and 0 <= i < g.found else None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(path: Path):
    """`path`'s lock held (its folder made); a folder that cannot be made or locked: no lock, a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        log.warning("GEMM algorithm choices: cannot lock %s (%s): choosing without it", path, e)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _keep(path: Path, key: str, i: int, lock: bool = True) -> None:
    """Add key -> i to the JSON file `path`, re-read under its lock (lock=False: the caller holds it); a file
    that cannot be written or is broken is left as it is, with a warning."""
    try:
        with FileLock(str(path) + ".lock") if lock else contextlib.nullcontext():
            data = json.loads(path.read_text()) if path.is_file() else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get(key) == i:
                return
            data[key] = i
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except (OSError, ValueError) as e:
        log.warning("GEMM algorithm choices not kept in %s (%s): chosen for this run only", path, e)
