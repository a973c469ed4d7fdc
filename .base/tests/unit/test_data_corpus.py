"""The default corpus: stdlib sources, prepared once into the cache, then reused."""
import logging
import time

import numpy as np

from llmqgen.data import corpus
from llmqgen.data.loader import TrainLoader
from llmqgen.data.shards import read_manifest
from llmqgen.data.tokenizer import load_tokenizer


def test_stdlib_sources_exclude_tests():
    files = corpus.stdlib_sources()
    assert len(files) > 300 and files == sorted(files)
    parts = {part for f in files for part in f.parts}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}
    assert any(f.name == "textwrap.py" for f in files)


def test_default_corpus_prepared_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(corpus, "MAX_TOKENS", 400_000)        # keeps the test quick
    caplog.set_level(logging.INFO, logger="llmqgen")
    out = corpus.default_corpus(progress=True, workers=2)
    assert out.parent == tmp_path / "corpus"
    assert "standard library" in caplog.messages[0] and caplog.messages[-1].endswith(f"-> {out}")
    m = read_manifest(out)
    tok = load_tokenizer("qwen2.5")
    assert m.tokenizer_id == tok.identity and m.tokens("eval") > 0
    assert 400_000 <= m.tokens("train") + m.tokens("eval") < 600_000
    t0 = time.perf_counter()
    assert corpus.default_corpus(progress=False) == out           # cached
    assert time.perf_counter() - t0 < 1.0
    b = TrainLoader(out, 2, 128, expect_tokenizer="qwen2.5", model_vocab=151936).next_batch()
    assert np.all(b.inputs < tok.vocab_size)
    assert not list(tmp_path.glob("corpus/*.tmp-*"))
