"""Batches of token chunks from a prepared dataset, resumable from a small cursor.

Each shard is cut into chunks of seq_len+1 tokens that overlap by one (chunk k covers tokens
[k*T, k*T+T]), so inputs = chunk[:-1] and targets = chunk[1:]. Training visits all chunks once per
epoch in an order given by a keyed Feistel permutation of the chunk indices (counter-based: chunk
number i of epoch e is a pure function of (seed, e, i); no generator state to save). A step takes
B*num_ranks consecutive slots of that order, rank r the r-th group of B, so ranks never overlap.
The cursor {"seed", "epoch", "position"} is the same on every rank and is saved in checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .shards import Manifest, ShardError, ShardReader, open_split

IGNORE_INDEX = -100
_M64 = (1 << 64) - 1


@dataclass
class TokenBatch:
    inputs: np.ndarray            # int32 [B, T]
    targets: np.ndarray           # int32 [B, T], IGNORE_INDEX where the loss mask is 0
    sorted_positions: np.ndarray  # int32 [B*T]: flat input positions, stably sorted by token id
    segment_starts: np.ndarray    # int32 [B*T+1]: start of each token id's run, then B*T padding
    num_unique: int               # number of distinct token ids (valid segments)


def embedding_backward_index(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Positions grouped by token id, for a deterministic embedding-gradient reduction."""
    flat = inputs.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    s = flat[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1]))) if s.size else \
        np.zeros(0, np.int64)
    seg = np.full(flat.size + 1, flat.size, dtype=np.int32)
    seg[:starts.size] = starts
    return order, seg, int(starts.size)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wraps modulo 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(idx: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A bijection of [0, n) keyed by (seed, epoch): 4-round Feistel network + cycle walking."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    key = np.uint64((seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + 1) & _M64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for r in range(4):
            f = _mix64(right ^ key ^ np.uint64(r * 0x632BE59BD9B4E019 & _M64)) & mask
            left, right = right, left ^ f
        return (left << np.uint64(half)) | right

    y = feistel(np.asarray(idx, dtype=np.uint64))
    while (out := y >= np.uint64(n)).any():      # the walk ends: a permutation's cycles are finite
        y[out] = feistel(y[out])
    return y.astype(np.int64)


class _Chunks:
    """Chunk index -> (shard, start token) over the shards of one split."""

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int,
                 expect_tokenizer: Optional[str], model_vocab: Optional[int]):
        self.manifest, self.shards = open_split(directory, split)
        m: Manifest = self.manifest
        if expect_tokenizer is not None:
            # a bare name ("qwen2.5") matches any file hash; a full identity must match exactly
            have = m.tokenizer_id if ":" in expect_tokenizer else m.tokenizer_id.split(":")[0]
            if have != expect_tokenizer:
                raise ShardError(f"{directory}: data was tokenized with {m.tokenizer_id}, this run "
                                 f"expects {expect_tokenizer}; re-run `llmqgen data prepare` "
                                 "with the model's tokenizer")
        if model_vocab is not None and m.vocab_size > model_vocab:
            raise ShardError(f"{directory}: the data's vocabulary has {m.vocab_size} ids, the model "
                             f"only {model_vocab}; tokenize with the model's tokenizer")
        self.seq_len = seq_len
        per = np.array([max(r.num_tokens - 1, 0) // seq_len for r in self.shards], dtype=np.int64)
        self.ends = np.cumsum(per)
        self.count = int(self.ends[-1]) if per.size else 0
        self.tokens = sum(r.num_tokens for r in self.shards)
        self.split, self.directory = split, directory

    def require(self, chunks: int, what: str) -> None:
        if self.count < chunks:
            longest = max((r.num_tokens for r in self.shards), default=0)
            raise ShardError(
                f"{self.directory}: the {self.split} split has {self.tokens:,} tokens "
                f"({self.count} chunks of seq_len+1 = {self.seq_len + 1}; longest shard "
                f"{longest:,} tokens) but {what} needs {chunks}; use more data, a shorter "
                "--seq-len or a smaller batch")

    def batch(self, chunk_ids: np.ndarray) -> TokenBatch:
        T = self.seq_len
        shard = np.searchsorted(self.ends, chunk_ids, side="right")
        first = np.concatenate(([0], self.ends))[shard]
        rows, masks = [], []
        for s, k in zip(shard.tolist(), (chunk_ids - first).tolist()):
            r: ShardReader = self.shards[s]
            rows.append(np.asarray(r.tokens[k * T:k * T + T + 1], dtype=np.int32))
            masks.append(None if r.mask is None else np.asarray(r.mask[k * T + 1:k * T + T + 1]))
        chunk = np.stack(rows)
        inputs, targets = np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])
        for b, m in enumerate(masks):
            if m is not None:
                targets[b, m == 0] = IGNORE_INDEX
        order, seg, uniq = embedding_backward_index(inputs)
        return TokenBatch(inputs, targets, order, seg, uniq)


class TrainLoader:
    """Shuffled training batches of one rank; `cursor` is restorable with `TrainLoader(..., cursor=)`."""

    def __init__(self, directory: str | os.PathLike, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, num_ranks: int = 1, cursor: Optional[dict] = None,
                 expect_tokenizer: Optional[str] = None, model_vocab: Optional[int] = None):
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} outside [0, {num_ranks})")
        self.chunks = _Chunks(directory, "train", seq_len, expect_tokenizer, model_vocab)
        self.batch_size, self.rank, self.num_ranks = batch_size, rank, num_ranks
        self.step_chunks = batch_size * num_ranks
        self.chunks.require(self.step_chunks, f"one step (batch {batch_size} x {num_ranks} ranks)")
        self.seed, self.epoch, self.position = seed, 0, 0
        if cursor is not None:
            self.seed, self.epoch, self.position = (int(cursor["seed"]), int(cursor["epoch"]),
                                                    int(cursor["position"]))

    @property
    def cursor(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @property
    def steps_per_epoch(self) -> int:
        return self.chunks.count // self.step_chunks

    def next_batch(self) -> TokenBatch:
        if self.position + self.step_chunks > self.chunks.count:    # drop the epoch's tail
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        slots = np.arange(start, start + self.batch_size, dtype=np.int64)
        self.position += self.step_chunks
        return self.chunks.batch(permute(slots, self.chunks.count, self.seed, self.epoch))

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            yield self.next_batch()


class EvalLoader:
    """The eval split in order: batch k of rank r holds chunks [(k*R + r)*B, (k*R + r + 1)*B)."""

    def __init__(self, directory: str | os.PathLike, batch_size: int, seq_len: int, rank: int = 0,
                 num_ranks: int = 1, max_batches: Optional[int] = None,
                 expect_tokenizer: Optional[str] = None, model_vocab: Optional[int] = None):
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} outside [0, {num_ranks})")
        self.chunks = _Chunks(directory, "eval", seq_len, expect_tokenizer, model_vocab)
        self.chunks.require(batch_size * num_ranks, "one eval batch")
        self.batch_size, self.rank, self.num_ranks = batch_size, rank, num_ranks
        n = self.chunks.count // (batch_size * num_ranks)
        self.num_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[TokenBatch]:
        B = self.batch_size
        for k in range(self.num_batches):
            start = (k * self.num_ranks + self.rank) * B
            yield self.chunks.batch(np.arange(start, start + B, dtype=np.int64))
