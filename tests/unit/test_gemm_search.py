"""runtime/gemm_search.py's bookkeeping on the CPU: a GEMM's algorithm is timed once per GPU model and cuBLASLt
version, kept in the build folder and in the machine's cache, and read back by later runs and other builds; a
folder that cannot be written keeps the choice for this process; live operands are never timed. The timing
itself runs on the GPU: tests/gpu/test_gemm_search.py."""
import json
import os

import pytest

from llmqgen.runtime import gemm_search

WHERE = "NVIDIA H200 | cuBLASLt 130100 | 32 MiB workspace"


class FakeGemm:
    """What choose() uses of a Gemm: its label, how many candidates the heuristic found, use(i)."""
    def __init__(self, label="65536x896x896 e4m3 x e4m3 fast-accum", found=4):
        self.label, self.found, self.algo_index = label, found, 0

    def use(self, i):
        assert 0 <= i < self.found
        self.algo_index = i


@pytest.fixture
def timed(monkeypatch):
    """A timer that records the GEMM it timed and picks candidate 2; the process's choices forgotten."""
    calls = []
    monkeypatch.setattr(gemm_search, "_chosen", {})
    return calls


def timer(calls, g, pick=2):
    return lambda: calls.append(g.label) or pick


def choose(g, folder, machine, calls, where=WHERE, pick=2):
    return gemm_search.choose(g, where, folder, machine, timer(calls, g, pick))


def test_a_choice_is_timed_once_and_kept_in_the_build_and_the_machine(tmp_path, timed, monkeypatch):
    build, machine = tmp_path / "build", gemm_search.machine_file(WHERE, tmp_path / "cache")
    build.mkdir()
    g = FakeGemm()
    assert choose(g, build, machine, timed) == 2 and g.algo_index == 2
    assert gemm_search.saved(build) == {f"{WHERE} | {g.label}": 2}
    assert json.loads(machine.read_text()) == {g.label: 2}
    assert machine.parent.name == "NVIDIA-H200-cuBLASLt-130100-32-MiB-workspace"
    assert choose(FakeGemm(), build, machine, timed) == 2                 # this process: no timing
    monkeypatch.setattr(gemm_search, "_chosen", {})                      # another process: the build's file
    (build / gemm_search.CHOICES).write_text(json.dumps({f"{WHERE} | {g.label}": 1}))
    h = FakeGemm()
    assert choose(h, build, machine, timed) == 1 and h.algo_index == 1
    assert timed == [g.label]


def test_another_build_on_the_machine_takes_the_machine_s_choice(tmp_path, timed, monkeypatch):
    machine = gemm_search.machine_file(WHERE, tmp_path / "cache")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    choose(FakeGemm(), tmp_path / "a", machine, timed, pick=3)
    monkeypatch.setattr(gemm_search, "_chosen", {})
    g = FakeGemm()
    assert choose(g, tmp_path / "b", machine, timed, pick=1) == 3 and timed == [g.label]
    assert gemm_search.saved(tmp_path / "b") == {f"{WHERE} | {g.label}": 3}   # the build records what it used


def test_another_gpu_or_cublas_version_times_its_own(tmp_path, timed):
    root = tmp_path / "cache"
    for where in (WHERE, WHERE.replace("130100", "130200"), "NVIDIA H100 80GB HBM3 | cuBLASLt 130100 | 32 MiB"):
        choose(FakeGemm(), tmp_path, gemm_search.machine_file(where, root), timed, where=where)
    assert len(timed) == 3 and len(gemm_search.saved(tmp_path)) == 3
    assert len(list((root / gemm_search.MACHINE).iterdir())) == 3


def test_live_operands_are_not_timed(tmp_path, timed):
    """Without a timer: a kept choice, else the heuristic's first pick, and nothing written."""
    machine = gemm_search.machine_file(WHERE, tmp_path / "cache")
    g = FakeGemm()
    assert gemm_search.choose(g, WHERE, tmp_path, machine) == 0 and g.algo_index == 0
    assert gemm_search.saved(tmp_path) == {} and not machine.exists()
    gemm_search._chosen.clear()
    choose(FakeGemm(), tmp_path / "other", machine, timed)                 # timed by another build
    gemm_search._chosen.clear()
    assert gemm_search.choose(FakeGemm(), WHERE, tmp_path, machine) == 2


def test_a_saved_index_beyond_the_candidates_is_timed_again(tmp_path, timed):
    g = FakeGemm(found=3)
    (tmp_path / gemm_search.CHOICES).write_text(json.dumps({f"{WHERE} | {g.label}": 7}))
    choose(g, tmp_path, None, timed)
    assert timed == [g.label] and gemm_search.saved(tmp_path)[f"{WHERE} | {g.label}"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders")
def test_read_only_folders_keep_the_choice_for_this_process(tmp_path, timed):
    tmp_path.chmod(0o500)
    try:
        machine = gemm_search.machine_file(WHERE, tmp_path / "cache")
        assert choose(FakeGemm(), tmp_path, machine, timed) == 2
        assert choose(FakeGemm(), tmp_path, machine, timed) == 2 and len(timed) == 1
    finally:
        tmp_path.chmod(0o700)
    assert not (tmp_path / gemm_search.CHOICES).exists() and not (tmp_path / "cache").exists()


def test_broken_files_keep_the_choice_for_this_process(tmp_path, timed):
    machine = gemm_search.machine_file(WHERE, tmp_path / "cache")
    machine.parent.mkdir(parents=True)
    for path in (tmp_path / gemm_search.CHOICES, machine):
        path.write_text("{not json")
    assert choose(FakeGemm(), tmp_path, machine, timed) == 2
    assert (tmp_path / gemm_search.CHOICES).read_text() == machine.read_text() == "{not json"


def test_saved_reads_the_choices_for_the_bench_record(tmp_path, timed):
    assert gemm_search.saved(tmp_path) == {}
    choose(FakeGemm(), tmp_path, None, timed)
    assert gemm_search.saved(tmp_path) == {f"{WHERE} | {FakeGemm().label}": 2}
    (tmp_path / gemm_search.CHOICES).write_text("[1, 2]")
    assert gemm_search.saved(tmp_path) == {}


def test_a_gemm_with_one_algorithm_is_neither_timed_nor_kept(tmp_path, timed):
    machine = gemm_search.machine_file(WHERE, tmp_path / "cache")
    assert choose(FakeGemm(found=1), tmp_path, machine, timed) == 0
    assert timed == [] and gemm_search.saved(tmp_path) == {} and not machine.exists()
