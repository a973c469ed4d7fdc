"""Loader: permutation, chunk contents vs the shards, rank disjointness, resume, masks, errors."""
import numpy as np
import pytest

from llmqgen.data.loader import (IGNORE_INDEX, EvalLoader, TrainLoader, embedding_backward_index,
                                 permute)
from llmqgen.data.shards import Manifest, ShardEntry, ShardError, write_manifest, write_shard

IDENT = "tok:" + "cd" * 32
VOCAB = 1000


def make_dataset(d, sizes=(1000, 777, 513), eval_size=300, mask=False):
    rng = np.random.default_rng(7)
    train = []
    for i, n in enumerate(sizes):
        toks = rng.integers(0, VOCAB, n)
        m = (rng.random(n) < 0.7).astype(np.uint8) if mask else None
        write_shard(d / f"train-{i:05d}.bin", toks, VOCAB, IDENT, loss_mask=m)
        train.append((toks, m))
    ev = rng.integers(0, VOCAB, eval_size)
    write_shard(d / "eval-00000.bin", ev, VOCAB, IDENT)
    write_manifest(d, Manifest(IDENT, VOCAB, 0, [ShardEntry(f"train-{i:05d}.bin", n)
                                                 for i, n in enumerate(sizes)],
                               [ShardEntry("eval-00000.bin", eval_size)]))
    return train, ev


def all_chunks(train, T):
    out = []
    for toks, m in train:
        for k in range((len(toks) - 1) // T):
            out.append((toks[k * T:k * T + T + 1], None if m is None else m[k * T + 1:k * T + T + 1]))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_permute_is_bijection(n):
    p = permute(np.arange(n), n, seed=5, epoch=2)
    assert sorted(p.tolist()) == list(range(n))


def test_permute_depends_on_seed_and_epoch():
    a, b, c = (permute(np.arange(500), 500, s, e) for s, e in [(1, 0), (1, 1), (2, 0)])
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9
    np.testing.assert_array_equal(a, permute(np.arange(500), 500, 1, 0))


def test_epoch_visits_every_chunk_once(tmp_path):
    train, _ = make_dataset(tmp_path)
    T, B = 32, 4
    chunks = all_chunks(train, T)
    ld = TrainLoader(tmp_path, B, T, seed=3)
    assert ld.chunks.count == len(chunks)
    seen = []
    for _ in range(ld.steps_per_epoch):
        b = ld.next_batch()
        assert b.inputs.dtype == np.int32 and b.inputs.shape == (B, T) == b.targets.shape
        for row_in, row_tg in zip(b.inputs, b.targets):
            full = np.concatenate([row_in, row_tg[-1:]])
            np.testing.assert_array_equal(row_in[1:], row_tg[:-1])
            seen.append(next(i for i, (c, _) in enumerate(chunks) if np.array_equal(c, full)))
    assert len(set(seen)) == len(seen) == ld.steps_per_epoch * B
    ld.next_batch()
    assert ld.cursor["epoch"] == 1 and ld.cursor["position"] == B


def test_ranks_are_disjoint_and_cover(tmp_path):
    make_dataset(tmp_path)
    T, B, R = 16, 3, 4
    loaders = [TrainLoader(tmp_path, B, T, seed=9, rank=r, num_ranks=R) for r in range(R)]
    rows = []
    for _ in range(loaders[0].steps_per_epoch):
        for ld in loaders:
            rows += [tuple(x) for x in ld.next_batch().inputs]
    assert len(set(rows)) == len(rows)
    assert len({ld.cursor["position"] for ld in loaders}) == 1      # one cursor for every rank


def test_resume_from_cursor(tmp_path):
    make_dataset(tmp_path)
    a = TrainLoader(tmp_path, 4, 32, seed=11)
    for _ in range(23):          # crosses an epoch boundary
        a.next_batch()
    cursor = dict(a.cursor)
    b = TrainLoader(tmp_path, 4, 32, cursor=cursor)
    for _ in range(10):
        x, y = a.next_batch(), b.next_batch()
        np.testing.assert_array_equal(x.inputs, y.inputs)
        np.testing.assert_array_equal(x.targets, y.targets)


def test_loss_mask_becomes_ignore_index(tmp_path):
    train, _ = make_dataset(tmp_path, mask=True)
    T = 20
    chunks = all_chunks(train, T)
    b = TrainLoader(tmp_path, 8, T, seed=1).next_batch()
    for row_in, row_tg in zip(b.inputs, b.targets):
        c, m = next((c, m) for c, m in chunks if np.array_equal(c[:-1], row_in))
        np.testing.assert_array_equal(row_tg, np.where(m == 0, IGNORE_INDEX, c[1:]))
    assert (b.targets == IGNORE_INDEX).any()


def test_embedding_backward_index():
    x = np.random.default_rng(0).integers(0, 50, (4, 33)).astype(np.int32)
    order, seg, uniq = embedding_backward_index(x)
    flat = x.ravel()
    assert order.dtype == seg.dtype == np.int32 and seg.shape == (flat.size + 1,)
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    assert uniq == len(np.unique(flat))
    for u in range(uniq):                  # each segment: one id, positions ascending
        pos = order[seg[u]:seg[u + 1]]
        assert len(set(flat[pos])) == 1 and np.all(np.diff(pos) > 0)
        assert seg[u + 1] == flat.size or flat[order[seg[u + 1]]] != flat[pos[0]]
    assert np.all(seg[uniq:] == flat.size)


def test_eval_is_sequential(tmp_path):
    _, ev = make_dataset(tmp_path)
    T, B = 16, 2
    got = [b.inputs for b in EvalLoader(tmp_path, B, T)]
    assert len(got) == ((len(ev) - 1) // T) // B
    np.testing.assert_array_equal(got[1][0], ev[2 * T:3 * T])
    r1 = [b.inputs for b in EvalLoader(tmp_path, B, T, rank=1, num_ranks=2)]
    np.testing.assert_array_equal(r1[0], got[1])


def test_errors(tmp_path):
    make_dataset(tmp_path, sizes=(100, 60))
    with pytest.raises(ShardError, match="shorter --seq-len"):
        TrainLoader(tmp_path, 1, 100)
    with pytest.raises(ShardError, match="only 500"):
        TrainLoader(tmp_path, 1, 8, model_vocab=500)
    with pytest.raises(ShardError, match="expects qwen2.5"):
        TrainLoader(tmp_path, 1, 8, expect_tokenizer="qwen2.5")
    TrainLoader(tmp_path, 1, 8, expect_tokenizer="tok")
    TrainLoader(tmp_path, 1, 8, expect_tokenizer=IDENT)
    with pytest.raises(ShardError, match="tokenized with"):
        TrainLoader(tmp_path, 1, 8, expect_tokenizer="tok:" + "00" * 32)
