"""`data prepare`: inputs of every kind, EOS placement, the split, worker-count independence, CLI."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from llmqgen.data.cli import data
from llmqgen.data.prepare import PrepareError, is_eval, prepare
from llmqgen.data.shards import open_split
from llmqgen.data.tokenizer import load_tokenizer


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "def", "return", "(", ")", "\n", "数据", "é"]
    docs = [" ".join(rng.choice(words, int(rng.integers(5, 200)))) for _ in range(60)]
    for i, d in enumerate(docs[:20]):
        (src / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(d)
    (src / "ignored.bin").write_bytes(b"\0\1")
    jl = tmp_path / "more.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[20:])))
    # directory order: sorted paths, recursively
    order = sorted((p for p in src.rglob("*.txt")), key=str)
    return [src, jl], [p.read_text() for p in order] + docs[20:]


def _read_all(out, split):
    _, readers = open_split(out, split)
    return np.concatenate([np.asarray(r.tokens) for r in readers]) if readers else np.zeros(0)


def test_tokens_match_reference(inputs, tmp_path):
    paths, docs = inputs
    man, stats = prepare(paths, tmp_path / "ds", eval_fraction=0.2, shard_tokens=500, workers=1,
                         progress=False)
    tok = load_tokenizer("qwen2.5")
    want = {"train": [], "eval": []}
    for i, d in enumerate(docs):
        want["eval" if is_eval(i, 0.2) else "train"] += tok.encode(d) + [tok.eos_id]
    for split in ("train", "eval"):
        np.testing.assert_array_equal(_read_all(tmp_path / "ds", split), want[split])
    assert 0 < len(man.eval) and all(e.tokens == 500 for e in man.train[:-1])
    assert stats.documents == 60 == sum(man.documents.values())
    assert stats.tokens == len(want["train"]) + len(want["eval"])
    assert man.tokenizer_id == tok.identity and man.eos_id == 151643


def test_bit_identical_for_any_worker_count(inputs, tmp_path, monkeypatch):
    import llmqgen.data.prepare as prep
    monkeypatch.setattr(prep, "_BATCH_BYTES", 2000)        # many batches across the workers
    paths, _ = inputs
    prepare(paths, tmp_path / "w1", eval_fraction=0.1, shard_tokens=700, workers=1, progress=False)
    prepare(paths, tmp_path / "w3", eval_fraction=0.1, shard_tokens=700, workers=3, progress=False)
    f1 = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert f1 == sorted(p.name for p in (tmp_path / "w3").iterdir()) and len(f1) > 3
    for name in f1:
        if name.endswith(".bin"):
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes()


def test_max_tokens_stops_after_document(inputs, tmp_path):
    paths, _ = inputs
    _, stats = prepare(paths, tmp_path / "ds", max_tokens=300, workers=1, progress=False)
    assert 300 <= stats.tokens < 300 + 1000 and stats.documents < 60


def test_errors(inputs, tmp_path):
    paths, _ = inputs
    with pytest.raises(PrepareError, match="--field"):
        prepare([paths[1]], tmp_path / "a", field="body", workers=1, progress=False)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare([tmp_path / "missing"], tmp_path / "b", workers=1, progress=False)
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(PrepareError, match="pip install pyarrow"):
            prepare([pq], tmp_path / "c", workers=1, progress=False)
    prepare(paths, tmp_path / "d", workers=1, progress=False)
    with pytest.raises(PrepareError, match="--force"):
        prepare(paths, tmp_path / "d", workers=1, progress=False)


def test_cli(inputs, tmp_path):
    paths, _ = inputs
    res = CliRunner().invoke(data, ["prepare", *map(str, paths), "--out", str(tmp_path / "ds"),
                                    "--eval-fraction", "0.1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "prepared 60 documents" in res.output and "tokens/s" in res.output
    res = CliRunner().invoke(data, ["prepare", str(paths[1]), "--out", str(tmp_path / "e"),
                                    "--field", "nope", "--workers", "1"])
    assert res.exit_code != 0 and "--field" in res.output


def test_folders_skip_hidden_and_refuse_unreadable_and_files_count_once(tmp_path, monkeypatch):
    src = tmp_path / "proj"
    for rel in ("a.py", "sub/b.txt", ".venv/lib/x.py", ".hidden.txt", "sub/.git/c.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"print({rel!r})\n")
    (tmp_path / ".given.txt").write_text("a hidden file named explicitly is read\n")
    _, stats = prepare([src, src / "a.py", tmp_path / "proj" / ".." / "proj", tmp_path / ".given.txt"],
                       tmp_path / "ds", workers=1, progress=False)
    assert stats.documents == 3         # a.py and sub/b.txt once each, and .given.txt
    real = os.scandir

    def scandir(path="."):      # as chmod 000 on sub/ would, for a user other than root
        if os.path.basename(path) == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PrepareError, match=r"proj/sub: cannot read \(Permission denied\)"):
        prepare([src], tmp_path / "ds2", workers=1, progress=False)


def test_max_tokens_help_says_documents_are_kept_whole(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("alpha beta\n" * 2000)
    res = CliRunner().invoke(data, ["prepare", str(big), "--out", str(tmp_path / "ds"), "--max-tokens", "10",
                                    "--workers", "1", "--quiet"])
    assert res.exit_code == 0 and "prepared 1 document, " in res.output and "10 tokens" not in res.output
    help_text = " ".join(CliRunner().invoke(data, ["prepare", "--help"]).output.split())
    assert "Stop at the end of the document that reaches this many tokens: documents are kept whole" in help_text


def test_empty_eval_split_is_warned_about(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("one small document\n")
    prepare([tmp_path / "a.txt"], tmp_path / "ds", workers=1, progress=False)      # 1% of one document: none
    assert any("the eval split is empty" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    caplog.clear()
    prepare([tmp_path / "a.txt"], tmp_path / "ds0", eval_fraction=0.0, workers=1, progress=False)   # asked for
    assert not any("eval split" in r.getMessage() for r in caplog.records)


def test_a_worker_that_dies_stops_with_one_line_not_a_hang(inputs, tmp_path, monkeypatch):
    """A broken pool (a tokenizing worker killed, as the OOM killer would; a concurrent.futures executor reports
    it where a multiprocessing Pool waits forever): PrepareError naming --workers, and no manifest. The pool
    here breaks at its third job, deterministically: killing a real worker races its start-up."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import llmqgen.data.prepare as prep

    class Breaking(ProcessPoolExecutor):
        jobs = 0

        def submit(self, fn, *args):
            self.jobs += 1
            if self.jobs == 3:
                raise BrokenProcessPool("A child process terminated abruptly")
            return super().submit(fn, *args)

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Breaking)
    monkeypatch.setattr(prep, "_BATCH_BYTES", 2000)
    paths, _ = inputs
    with pytest.raises(PrepareError, match="worker process died.*--workers"):
        prepare(paths, tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
