"""Token shard format and dataset manifests: round trips and every validation error."""
import struct

import numpy as np
import pytest

from llmqgen.data.shards import (HEADER_SIZE, Manifest, ShardEntry, ShardError, ShardReader,
                                 open_split, read_manifest, write_manifest, write_shard)

IDENT = "test:" + "ab" * 32


@pytest.mark.parametrize("vocab,dtype", [(1000, np.uint16), (65536, np.uint16), (151665, np.uint32)])
def test_round_trip_width(tmp_path, vocab, dtype):
    toks = np.random.default_rng(0).integers(0, vocab, 1001)
    r = ShardReader(write_shard(tmp_path / "a.bin", toks, vocab, IDENT))
    assert r.tokens.dtype == dtype and r.num_tokens == 1001 and r.vocab_size == vocab
    assert r.tokenizer_id == IDENT and r.mask is None
    np.testing.assert_array_equal(r.tokens, toks)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_SIZE + 1001 * np.dtype(dtype).itemsize


def test_loss_mask_and_empty(tmp_path):
    toks = np.arange(10)
    mask = np.array([1, 0] * 5)
    r = ShardReader(write_shard(tmp_path / "m.bin", toks, 100, IDENT, loss_mask=mask))
    np.testing.assert_array_equal(r.mask, mask)
    np.testing.assert_array_equal(r.tokens, toks)
    e = ShardReader(write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), 100, IDENT))
    assert e.num_tokens == 0 and e.tokens.size == 0


def test_write_rejects_out_of_vocab(tmp_path):
    with pytest.raises(ShardError, match=r"\[0, 100\)"):
        write_shard(tmp_path / "x.bin", np.array([5, 100]), 100, IDENT)


def _corrupt(tmp_path, edit):
    p = write_shard(tmp_path / "c.bin", np.arange(50), 100, IDENT)
    raw = bytearray(p.read_bytes())
    raw = edit(raw)
    p.write_bytes(bytes(raw))
    return p


def test_bad_magic(tmp_path):
    p = _corrupt(tmp_path, lambda b: b"NOTATOK\0" + b[8:])
    with pytest.raises(ShardError, match="bad magic") as e:
        ShardReader(p)
    assert str(p) in str(e.value) and "llmqgen data prepare" in str(e.value)


def test_bad_version(tmp_path):
    p = _corrupt(tmp_path, lambda b: b[:8] + struct.pack("<I", 7) + b[12:])
    with pytest.raises(ShardError, match="version 7"):
        ShardReader(p)


def test_bad_checksum(tmp_path):
    def flip(b):
        b[40] ^= 1         # inside the identity field
        return b
    with pytest.raises(ShardError, match="checksum"):
        ShardReader(_corrupt(tmp_path, flip))


def test_truncated(tmp_path):
    p = _corrupt(tmp_path, lambda b: b[:-3])
    with pytest.raises(ShardError, match="truncated"):
        ShardReader(p)
    with pytest.raises(ShardError, match="bad magic"):
        ShardReader(_corrupt(tmp_path, lambda b: b[:100]))


def test_missing_file(tmp_path):
    with pytest.raises(ShardError, match="cannot read"):
        ShardReader(tmp_path / "nope.bin")


def test_manifest_round_trip_and_split_check(tmp_path):
    write_shard(tmp_path / "train-00000.bin", np.arange(30), 100, IDENT)
    write_shard(tmp_path / "eval-00000.bin", np.arange(7), 100, IDENT)
    m = Manifest(IDENT, 100, 99, [ShardEntry("train-00000.bin", 30)],
                 [ShardEntry("eval-00000.bin", 7)], {"train": 3, "eval": 1}, ["x"])
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    man, readers = open_split(tmp_path, "eval")
    assert man.tokens("train") == 30 and readers[0].num_tokens == 7
    write_manifest(tmp_path, Manifest(IDENT, 100, 99, [ShardEntry("train-00000.bin", 31)]))
    with pytest.raises(ShardError, match="disagrees"):
        open_split(tmp_path, "train")


def test_no_manifest(tmp_path):
    with pytest.raises(ShardError, match="llmqgen data prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ShardError, match="not an llmqgen dataset"):
        read_manifest(tmp_path)
