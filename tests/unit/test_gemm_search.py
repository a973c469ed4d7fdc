"""runtime/gemm_search.py's bookkeeping on the CPU: a GEMM's algorithm is timed once per GPU and build, kept in
the build folder, and read back by later runs; a folder that cannot be written keeps the choice for this
process. The timing itself runs on the GPU: tests/gpu/test_gemm_search.py."""
import json
import os

import pytest

from llmqgen.runtime import gemm_search


class FakeGemm:
    """What choose() uses of a Gemm: its label, how many candidates the heuristic found, use(i)."""
    def __init__(self, label="65536x896x896 e4m3 x e4m3 fast-accum", found=4):
        self.label, self.found, self.algo_index = label, found, 0

    def use(self, i):
        assert 0 <= i < self.found
        self.algo_index = i


@pytest.fixture
def timed(monkeypatch):
    """fastest() replaced by a recorder that picks candidate 2."""
    calls = []
    monkeypatch.setattr(gemm_search, "_chosen", {})
    monkeypatch.setattr(gemm_search, "fastest", lambda g, run, stream: calls.append(g.label) or 2)
    return calls


def test_a_choice_is_timed_once_kept_and_read_back(tmp_path, timed, monkeypatch):
    g = FakeGemm()
    assert gemm_search.choose(g, None, 0, tmp_path, "NVIDIA H200") == 2 and g.algo_index == 2
    saved = json.loads((tmp_path / gemm_search.CHOICES).read_text())
    assert saved == {f"NVIDIA H200 | {g.label}": 2}
    assert gemm_search.choose(FakeGemm(), None, 0, tmp_path, "NVIDIA H200") == 2     # this process: no timing
    monkeypatch.setattr(gemm_search, "_chosen", {})                                 # another process: the file
    (tmp_path / gemm_search.CHOICES).write_text(json.dumps({f"NVIDIA H200 | {g.label}": 1}))
    h = FakeGemm()
    assert gemm_search.choose(h, None, 0, tmp_path, "NVIDIA H200") == 1 and h.algo_index == 1
    assert timed == [g.label]
    gemm_search.choose(FakeGemm(), None, 0, tmp_path, "NVIDIA H100 80GB HBM3")       # another GPU: its own
    assert timed == [g.label, g.label] and len(json.loads((tmp_path / gemm_search.CHOICES).read_text())) == 2


def test_a_saved_index_beyond_the_candidates_is_timed_again(tmp_path, timed):
    g = FakeGemm(found=3)
    (tmp_path / gemm_search.CHOICES).write_text(json.dumps({f"GPU | {g.label}": 7}))
    gemm_search.choose(g, None, 0, tmp_path, "GPU")
    assert timed == [g.label] and json.loads((tmp_path / gemm_search.CHOICES).read_text())[f"GPU | {g.label}"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders")
def test_a_read_only_folder_keeps_the_choice_for_this_process(tmp_path, timed):
    tmp_path.chmod(0o500)
    try:
        assert gemm_search.choose(FakeGemm(), None, 0, tmp_path, "GPU") == 2
    finally:
        tmp_path.chmod(0o700)
    assert not (tmp_path / gemm_search.CHOICES).exists()


def test_a_broken_file_keeps_the_choice_for_this_process(tmp_path, timed):
    (tmp_path / gemm_search.CHOICES).write_text("{not json")
    assert gemm_search.choose(FakeGemm(), None, 0, tmp_path, "GPU") == 2
    assert (tmp_path / gemm_search.CHOICES).read_text() == "{not json"


def test_saved_reads_the_choices_for_the_bench_record(tmp_path, timed):
    assert gemm_search.saved(tmp_path) == {}
    gemm_search.choose(FakeGemm(), None, 0, tmp_path, "GPU")
    assert gemm_search.saved(tmp_path) == {f"GPU | {FakeGemm().label}": 2}
    (tmp_path / gemm_search.CHOICES).write_text("{not json")
    assert gemm_search.saved(tmp_path) == {}
