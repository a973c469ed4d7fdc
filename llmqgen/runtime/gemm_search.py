"""Choosing a cuBLASLt algorithm by timing, for the GEMMs whose heuristic pick is known to be slow: FP8 with
fast accumulation (precision.fast_accum). Measured on an H200 (bench/gemm_candidates.py,
bench/results/issue13-gemm-candidates-0.5b.json): the heuristic's first fast-accumulating pick is sometimes
slower than precise accumulation, the fastest of its candidates 10-20% faster.

Each candidate runs on the operation's own operands (a forward GEMM writes only its transient output) once to
warm up, then REPS times between CUDA events; the fastest wins. The choice of each GEMM, by GPU name and the
Gemm's label, is kept in the build folder's gemm_algos.json under a file lock: later runs of the build on such
a GPU (a resume, the other ranks) take the same algorithm, so their results repeat bit for bit. A folder that
cannot be written keeps the choice for this process only."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from filelock import FileLock

from . import driver

if TYPE_CHECKING:          # blas needs nvmath, which CPU-only installs lack
    from .blas import Gemm

CHOICES = "gemm_algos.json"
REPS = 3
log = logging.getLogger(__name__)
_chosen: dict[str, int] = {}        # this process's choices, by key (ranks of one process share them)


def fastest(g: Gemm, run: Callable[[], None], stream: int) -> int:
    """Index of the fastest of `g`'s heuristic candidates; `run` enqueues `g` on `stream` with real operands."""
    start, end = driver.event_create(timing=True), driver.event_create(timing=True)
    best, best_ms = 0, float("inf")
    try:
        for i in range(g.found):
            g.use(i)
            try:
                run()
                driver.event_record(start, stream)
                for _ in range(REPS):
                    run()
                driver.event_record(end, stream)
                driver.event_synchronize(end)
            except RuntimeError:        # a candidate the heuristic offered that fails for these operands
                continue
            ms = driver.event_elapsed_ms(start, end)
            if ms < best_ms:
                best, best_ms = i, ms
    finally:
        driver.event_destroy(start)
        driver.event_destroy(end)
    log.info("GEMM %s: algorithm %d of %d, %.3f ms", g.label, best, g.found, best_ms / REPS)
    return best


def saved(folder: Path) -> dict[str, int]:
    """The choices kept in build folder `folder` ({} when none or unreadable): "<GPU> | <GEMM label>" -> index."""
    try:
        return json.loads((Path(folder) / CHOICES).read_text())
    except (OSError, ValueError):
        return {}


def choose(g: Gemm, run: Callable[[], None], stream: int, folder: Path, gpu: str) -> int:
    """Make `g` use its saved or (first time on this GPU) its fastest algorithm; returns the index."""
    key = f"{gpu} | {g.label}"
    if key not in _chosen:
        try:
            with FileLock(folder / (CHOICES + ".lock")):
                path = folder / CHOICES
                saved = json.loads(path.read_text()) if path.is_file() else {}
                i = saved.get(key)
                if not isinstance(i, int) or not 0 <= i < g.found:
                    i = saved[key] = fastest(g, run, stream)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True))
                    os.replace(tmp, path)
        except (OSError, ValueError) as e:   # a read-only folder, or a broken file: choose for this process
            log.warning("GEMM algorithm choices not kept in %s (%s): chosen for this run only", folder, e)
            i = fastest(g, run, stream)
        _chosen[key] = i
    g.use(_chosen[key])
    return _chosen[key]
