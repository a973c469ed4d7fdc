"""Streaming `data prepare`: cut points are token-identical, pieces bound the memory, output does not
depend on the worker count, shards are streamed to disk."""
import base64
import random
import sys
import unicodedata

import numpy as np
import pytest

import llmqgen.data.prepare as prep
from llmqgen.data.prepare import _pieces, prepare
from llmqgen.data.shards import ShardReader, ShardWriter, open_split, write_shard
from llmqgen.data.tokenizer import (LLAMA3_PATTERN, QWEN2_PATTERN, WHITE_SPACE, _load_ranks,
                                    first_cut, is_cut, last_cut, load_tokenizer, qwen_bpe_file)

# characters that stress the pre-tokenizer pattern around line starts
_ALPHABET = (["\n"] * 6 + ["\r\n", "\r", " ", "  ", "\t", "\u3000", "\xa0", "\u2028", "\x85", "\x1c",
              "\f", "\v"] + list("ab'sZ09!#(){}-_.,;:\"`") + ["'s", "'LL", "é", "e\u0301", "\u0301",
                                                               "Å", "\u212b", "数据", "١٢", "🙂",
                                                               "\u0915\u094d", "ﬁ", "x" * 30])


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def _cut_points(text: str) -> list[int]:
    return [i for i in range(len(text) + 1) if is_cut(text, i)]


def _encode_cut(tok, text: str, cuts: list[int]) -> list[int]:
    ids, prev = [], 0
    for c in cuts + [len(text)]:
        ids += tok.encode(text[prev:c])
        prev = c
    return ids


def test_no_non_space_character_normalizes_to_space():
    """NFC part of the cut argument (tokenizer.py): over all of Unicode, a character that is not
    white space does not start its NFC form with white space; "\\n" is NFC-stable."""
    assert unicodedata.normalize("NFC", "\n") == "\n"
    assert unicodedata.is_normalized("NFC", "\n")
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if c in WHITE_SPACE or 0xD800 <= cp < 0xE000:
            continue
        n = unicodedata.normalize("NFC", c)
        assert n and n[0] not in WHITE_SPACE, hex(cp)


def test_white_space_set_covers_python_and_unicode():
    import re
    py_space = {chr(i) for i in range(sys.maxunicode + 1) if chr(i).isspace()}
    re_space = {chr(i) for i in range(0x3001) if re.match(r"\s", chr(i))}
    assert py_space <= WHITE_SPACE and re_space <= WHITE_SPACE
    assert "\u200b" not in WHITE_SPACE and "\u180e" not in WHITE_SPACE


def test_cut_helpers():
    t = "ab\n cd\nef\n\ngh\n"
    assert _cut_points(t) == [7, 11]
    assert last_cut(t) == 11 and last_cut(t, 1, 10) == 7 and last_cut(t, 8, 10) == 0
    assert first_cut(t) == 7 and first_cut(t, 8) == 11 and first_cut(t, 12) == 0
    assert not is_cut(t, len(t)) and not is_cut(t, 0)


@pytest.mark.parametrize("pattern", [QWEN2_PATTERN, LLAMA3_PATTERN], ids=["qwen2", "llama3"])
def test_cuts_are_token_identical(pattern):
    """Cutting at every cut point at once gives the tokens of the whole text (random adversarial
    texts and real source code), for both split patterns the argument covers."""
    tiktoken = pytest.importorskip("tiktoken")
    if pattern == QWEN2_PATTERN:
        tok = load_tokenizer("qwen2.5")
        encode = tok.encode
    else:
        enc = tiktoken.Encoding("llama3-split", pat_str=pattern,
                                mergeable_ranks=_load_ranks(qwen_bpe_file()), special_tokens={})
        encode = lambda t: enc.encode_ordinary(unicodedata.normalize("NFC", t))    # noqa: E731

    class _T:
        pass
    t = _T()
    t.encode = encode
    rng = random.Random(5)
    texts = [_random_text(rng, rng.randint(1, 400)) for _ in range(400)]
    texts.append(open(prep.__file__, encoding="utf-8").read())
    ncuts = 0
    for text in texts:
        cuts = _cut_points(text)
        ncuts += len(cuts)
        assert _encode_cut(t, text, cuts) == encode(text), repr(text)
    assert ncuts > 2000


def test_gpt2_pattern_is_not_cut_safe():
    """Why the cut rule is tied to the pattern: GPT-2's `\\s+(?!\\S)` without `\\s*[\\r\\n]+` splits
    "  \\n" before the newline when a word follows, but not at the end of a piece."""
    tiktoken = pytest.importorskip("tiktoken")
    gpt2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("gpt2-split", pat_str=gpt2, mergeable_ranks=_load_ranks(qwen_bpe_file()),
                            special_tokens={})
    text = "a  \nb"
    assert is_cut(text, 4)
    assert enc.encode_ordinary(text[:4]) + enc.encode_ordinary(text[4:]) != enc.encode_ordinary(text)


def test_pieces_cover_the_text_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(prep, "_PIECE_CHARS", 64)
    rng = random.Random(1)
    text = _random_text(rng, 3000)
    blocks = [(text[i:i + 50], 50) for i in range(0, len(text), 50)]
    pieces = list(_pieces(blocks, cut=True))
    assert "".join(p for p, _, _ in pieces) == text
    assert [last for _, last, _ in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(n for _, _, n in pieces) == sum(n for _, n in blocks)
    assert len(pieces) > 10
    start = 0
    for piece, last, _ in pieces:
        end = start + len(piece)
        if not last:
            assert is_cut(text, end)
            # the last cut within _PIECE_CHARS of the start, else the first one after it
            within = [c for c in _cut_points(text) if start < c <= start + 64]
            assert end == (within[-1] if within else first_cut(text, start + 65))
        start = end
    # no cut point: one piece; not cut-safe: one piece
    assert [p for p, _, _ in _pieces([("x" * 500, 500), (" \n" * 100, 200)], True)] == \
        ["x" * 500 + " \n" * 100]
    assert len(list(_pieces(blocks, cut=False))) == 1
    assert list(_pieces([], True)) == [("", True, 0)]


def test_pieces_read_lazily(monkeypatch):
    """A piece is yielded before the rest of the file is read: memory holds a piece or two."""
    monkeypatch.setattr(prep, "_PIECE_CHARS", 1000)
    consumed = []

    def blocks():
        for i in range(1000):
            consumed.append(i)
            yield "line of text\n" * 10, 130
    it = _pieces(blocks(), cut=True)
    first, last, _ = next(it)
    assert not last and len(first) <= 1000 and len(consumed) <= 10


def test_shard_writer_matches_write_shard(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 151_665, 10_000).astype(np.uint32)
    write_shard(tmp_path / "a.bin", tokens, 151_665, "tok:abc")
    w = ShardWriter(tmp_path / "b.bin", 151_665, "tok:abc")
    for part in np.array_split(tokens, 7):
        w.write(part)
    w.write(np.zeros(0, np.uint32))
    assert w.close() == tmp_path / "b.bin"
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert ShardReader(tmp_path / "b.bin").num_tokens == 10_000
    w = ShardWriter(tmp_path / "c.bin", 100, "tok:abc")
    w.write(np.arange(10))
    w.abort()
    assert not list(tmp_path.glob("c.bin*"))


def _text_file(path, n_bytes: int) -> str:
    src = open(prep.__file__, encoding="utf-8").read() + "\n  indented\n\n\tx = 'naïve 数据'\r\n"
    text = (src * (n_bytes // len(src) + 1))[:n_bytes]
    path.write_text(text, encoding="utf-8", newline="")
    return text


@pytest.mark.parametrize("workers", [1, 3])
def test_large_file_streamed_identically(tmp_path, monkeypatch, workers):
    """One large text file cut into many pieces over the workers: the tokens are those of encoding
    the whole file, EOS once at the end, and the shards are the same bytes for any worker count."""
    monkeypatch.setattr(prep, "_BLOCK_BYTES", 4096)
    monkeypatch.setattr(prep, "_PIECE_CHARS", 3000)
    monkeypatch.setattr(prep, "_BATCH_BYTES", 5000)
    text = _text_file(tmp_path / "big.txt", 300_000)
    (tmp_path / "small.txt").write_text("tiny document\n")
    tok = load_tokenizer("qwen2.5")
    pieces = list(_pieces(prep._blocks(tmp_path / "big.txt", "utf-8-sig"), True))
    assert len(pieces) > 50
    prepare([tmp_path / "big.txt", tmp_path / "small.txt"], tmp_path / "ds", eval_fraction=0,
            shard_tokens=7000, workers=workers, progress=False)
    _, readers = open_split(tmp_path / "ds", "train")
    got = np.concatenate([np.asarray(r.tokens) for r in readers])
    want = tok.encode(text) + [tok.eos_id] + tok.encode("tiny document\n") + [tok.eos_id]
    np.testing.assert_array_equal(got, want)
    assert [r.num_tokens for r in readers[:-1]] == [7000] * (len(readers) - 1)
    # the reference: one worker, no cutting at all
    monkeypatch.setattr(prep, "_PIECE_CHARS", 10 ** 9)
    prepare([tmp_path / "big.txt", tmp_path / "small.txt"], tmp_path / "ref", eval_fraction=0,
            shard_tokens=7000, workers=1, progress=False)
    for r in readers:
        assert r.path.read_bytes() == (tmp_path / "ref" / r.path.name).read_bytes()
    assert not list((tmp_path / "ds").glob("*.tmp-*"))


def test_jobs_in_flight_are_bounded(tmp_path, monkeypatch):
    """The reader runs ahead of the writer by at most the jobs in flight (2 per worker, + 1)."""
    monkeypatch.setattr(prep, "_BLOCK_BYTES", 2048)
    monkeypatch.setattr(prep, "_PIECE_CHARS", 2000)
    monkeypatch.setattr(prep, "_BATCH_BYTES", 2000)
    _text_file(tmp_path / "big.txt", 200_000)
    jobs_seen, written_at_job = [], []
    written = [0]
    real_jobs, real_add = prep._jobs, prep._SplitWriter.add

    def jobs(pieces):
        for job in real_jobs(pieces):
            jobs_seen.append(job)
            written_at_job.append(written[0])
            yield job

    def add(self, tokens):
        written[0] += tokens.size
        real_add(self, tokens)
    monkeypatch.setattr(prep, "_jobs", jobs)
    monkeypatch.setattr(prep._SplitWriter, "add", add)
    workers = 2
    prepare([tmp_path / "big.txt"], tmp_path / "ds", eval_fraction=0, workers=workers,
            progress=False)
    tok = load_tokenizer("qwen2.5")
    sizes = [sum(len(tok.encode(t)) for t in texts) + sum(lasts) for texts, lasts, _ in jobs_seen]
    assert len(sizes) > 50 and written[0] == sum(sizes)
    bound = prep._IN_FLIGHT_PER_WORKER * workers + 1
    for j, w in enumerate(written_at_job):
        # when job j is read, all jobs before j - bound have been written
        assert w >= sum(sizes[:max(j - bound, 0)])


@pytest.fixture(scope="module")
def qwen_tokenizer_json(tmp_path_factory):
    """A tokenizer.json holding Qwen2.5's BPE (the ranks -> vocab + merges conversion of
    transformers' TikTokenConverter; Qwen2.5's split pattern, NFC and added tokens)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from llmqgen.data.tokenizer import QWEN25_SPECIALS

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    byte_char = dict(zip(bs, map(chr, cs)))
    ranks = _load_ranks(qwen_bpe_file())
    as_str = lambda b: "".join(byte_char[x] for x in b)        # noqa: E731
    merges = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]]))
    merges.sort(key=lambda m: m[2])
    t = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={as_str(k): v for k, v in ranks.items()},
        merges=[(as_str(a), as_str(b)) for a, b, _ in merges]))
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    # Qwen2.5 marks <tool_call> and the FIM tokens special=false: they must not match either
    t.add_tokens([AddedToken(s, special=s.startswith("<|") and "fim" not in s, normalized=False)
                  for s in QWEN25_SPECIALS])
    path = tmp_path_factory.mktemp("qwen-json") / "tokenizer.json"
    t.save(str(path))
    return path


def test_hf_qwen_json_matches_builtin_and_cuts(qwen_tokenizer_json, tmp_path, monkeypatch):
    from llmqgen.data.tokenizer import QWEN25_SPECIALS
    hf, builtin = load_tokenizer(str(qwen_tokenizer_json)), load_tokenizer("qwen2.5")
    assert hf.cut_safe and hf.eos_id == builtin.eos_id and hf.vocab_size == builtin.vocab_size
    rng = random.Random(2)
    text = (" ".join(QWEN25_SPECIALS) + "\n" + _random_text(rng, 3000) + "\n<|endoftext|>x\n"
            + open(prep.__file__, encoding="utf-8").read()[:20_000])
    want = builtin.encode(text)
    assert hf.encode(text) == want and max(want) < 151643
    assert _encode_cut(hf, text, _cut_points(text)) == want
    # through `prepare`, cut into pieces over two workers
    monkeypatch.setattr(prep, "_PIECE_CHARS", 2000)
    monkeypatch.setattr(prep, "_BATCH_BYTES", 3000)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8", newline="")
    prepare([tmp_path / "doc.txt"], tmp_path / "ds", tokenizer=str(qwen_tokenizer_json),
            eval_fraction=0, workers=2, progress=False)
    got = np.concatenate([np.asarray(r.tokens) for r in open_split(tmp_path / "ds", "train")[1]])
    np.testing.assert_array_equal(got, want + [151643])


def test_hf_other_pipelines_are_not_cut(tmp_path, monkeypatch):
    """A tokenizer.json whose pipeline the argument does not cover gets each document whole."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)},
                                                   merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)     # GPT-2's own regex
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert not tok.cut_safe
    monkeypatch.setattr(prep, "_PIECE_CHARS", 10)
    assert len(list(_pieces([("line one\nline two\n" * 10, 180)], tok.cut_safe))) == 1
