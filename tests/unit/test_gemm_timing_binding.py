"""How a rank times its GEMMs as it binds the micro-step (runtime/rank.py, runtime/gemm_search.py), through the
real Trainer over the stand-in driver (tests/standin_driver.py: device memory is host memory, so the rows
really hold what is written): the timing fills the operands with random values, and the arena is zero again
afterwards (gradients start at 0) but for the ones vector; one line says what was timed; the choices go to the
machine's cache, and a second trainer times nothing. The timing itself on a GPU: tests/gpu/test_gemm_search.py."""
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standin_driver  # noqa: E402  (before the runtime: it stubs nvmath)
from golden_build import ARCH, NVRTC  # noqa: E402
from harness import small_plan  # noqa: E402

from llmqgen.codegen.folder import folder_files, write_files, write_manifest  # noqa: E402
from llmqgen.codegen.render import render  # noqa: E402
from llmqgen.compile.build_folder import load  # noqa: E402
from llmqgen.runtime import gemm_search, rank  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


class TimedGemm(standin_driver.StandinGemm):
    """A stand-in GEMM with three algorithms and blas.Gemm's shape fields, so that it is timed."""
    def __init__(self, drv, m, n, k, a_dtype="bf16", b_dtype="bf16"):
        super().__init__(drv)
        self.m, self.n, self.k, self.a_dtype, self.b_dtype, self.found = m, n, k, a_dtype, b_dtype, 3
        self.label = f"{m}x{n}x{k} {a_dtype} x {b_dtype}"

    def use(self, i):
        assert 0 <= i < self.found
        self.algo_index = i


@pytest.fixture
def timed_gemms(monkeypatch, tmp_path):
    drv = standin_driver.install(monkeypatch)
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gemm_search, "_chosen", {})
    monkeypatch.setattr(gemm_search.driver, "event_elapsed_ms", lambda a, b: 5.0)   # each candidate 3 runs
    monkeypatch.setattr(rank, "linear_forward", lambda blas, M, N, K, x_dtype="bf16", w_dtype="bf16", **k:
                        TimedGemm(drv, M, N, K, x_dtype, w_dtype))
    monkeypatch.setattr(rank, "linear_dgrad", lambda blas, M, N, K: TimedGemm(drv, M, K, N))
    monkeypatch.setattr(rank, "linear_wgrad", lambda blas, M, N, K: TimedGemm(drv, N, K, M))
    return drv


def _trainer(tmp_path, fp8):
    plan = small_plan("qwen2", fp8)
    folder = tmp_path / plan.name
    if not folder.exists():
        files = folder_files(plan, render(plan, ARCH))
        del files["program.cu"]
        write_files(folder, files)
        write_manifest(folder, ARCH, NVRTC, compiled=False)
    return Trainer(plan, build=load(folder, plan, compiled=False), devices=[0], attention="flash")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_timing_leaves_the_arena_zero_says_so_and_is_kept(timed_gemms, tmp_path, caplog, fp8):
    with caplog.at_level(logging.INFO, logger="llmqgen.runtime.rank"):
        tr = _trainer(tmp_path, fp8)
    rk = tr.ranks[0]
    fills = [c for c in timed_gemms.calls if c.kind == "memcpy_htod" and c.nbytes >= 1024]
    assert fills, "the operands were not filled before timing"
    timed = [g for k, g in rk.gemms.items() if k[0] != "bias"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GEMM algorithms:")]
    assert len(lines) == 1 and f"{len({g.label for g in timed})} of {len(rk.gemms)} timed" in lines[0], lines
    ones = rk.rows["work.ones"]
    for name, row in rk.rows.items():
        if row.place != "device" or name == "work.ones" or name not in rk.mem.slots:
            continue
        data = rk.download(rk.mem.ptr(name), np.uint8, (row.total,))
        assert not data.any(), f"{name} is not zero after the GEMM timing"
    assert (rk.download(rk.mem.ptr("work.ones"), np.uint16, (ones.total // 2,))[:ones.shape[0]] == 0x3F80).all()
    machine = gemm_search.machine_file(rk.gemm_where, tmp_path / "cache")
    assert len(gemm_search._read(machine)) == len({g.label for g in timed})
    assert len(gemm_search.saved(rk.build.path)) == len({g.label for g in timed})
    tr.close()

    gemm_search._chosen.clear()                     # a new process: the machine's cache answers
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmqgen.runtime.rank"):
        _trainer(tmp_path, fp8).close()
    assert not [r for r in caplog.records if r.getMessage().startswith("GEMM algorithms:")]
