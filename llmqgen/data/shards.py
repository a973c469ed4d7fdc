"""Token shards and dataset manifests: the on-disk format the loader memory-maps.

A shard file, all integers little-endian:

    offset  size  field
    0       8     magic b"LLMQTOK\\0"
    8       4     format version (u32, = 1)
    12      4     token width in bytes (u32: 2 when vocab_size <= 65536, else 4)
    16      4     flags (u32: bit 0 = a loss-mask section follows the tokens)
    20      4     vocab size of the tokenizer (u32)
    24      8     token count N (u64)
    32      160   tokenizer identity, UTF-8, NUL-padded ("qwen2.5:<sha256 of the BPE file>")
    192     60    reserved, zero
    252     4     CRC-32 of bytes 0..251
    256     N*w   tokens (uint16 or uint32)
    ...     N     loss mask, one byte per token (1 = the token counts as a target), when flagged

The data start at 256 so the token array is aligned for np.memmap. A dataset is a directory of
shards plus `manifest.json` (see `write_manifest`), which names the split each shard belongs to.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"LLMQTOK\0"
VERSION = 1
HEADER_SIZE = 256
IDENTITY_BYTES = 160
FLAG_LOSS_MASK = 1
_FIXED = struct.Struct("<8sIIIIQ")            # magic, version, width, flags, vocab, count
_CRC_AT = HEADER_SIZE - 4
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llmqgen-tokens"


class ShardError(ValueError):
    """A shard or manifest that cannot be used; the message names the file and the remedy."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _header(num_tokens: int, vocab_size: int, tokenizer_id: str, has_mask: bool) -> bytes:
    ident = tokenizer_id.encode("utf-8")
    if len(ident) > IDENTITY_BYTES:
        raise ShardError(f"tokenizer identity {tokenizer_id!r} is longer than {IDENTITY_BYTES} bytes;"
                         " use a shorter tokenizer name")
    width = token_dtype(vocab_size).itemsize
    head = _FIXED.pack(MAGIC, VERSION, width, FLAG_LOSS_MASK if has_mask else 0, vocab_size,
                       num_tokens)
    head += ident.ljust(IDENTITY_BYTES, b"\0")
    head = head.ljust(_CRC_AT, b"\0")
    return head + struct.pack("<I", zlib.crc32(head))


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, tokenizer_id: str,
                loss_mask: Optional[np.ndarray] = None) -> Path:
    """Write one shard; tokens must all be < vocab_size. Written to a temp name, then renamed."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ShardError(f"{path}: token ids must lie in [0, {vocab_size}); got "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    if loss_mask is not None and np.shape(loss_mask) != tokens.shape:
        raise ShardError(f"{path}: loss mask shape {np.shape(loss_mask)} != tokens {tokens.shape}")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_header(tokens.size, vocab_size, tokenizer_id, loss_mask is not None))
        f.write(tokens.astype(token_dtype(vocab_size), copy=False).tobytes())
        if loss_mask is not None:
            f.write((np.asarray(loss_mask) != 0).astype(np.uint8).tobytes())
    os.replace(tmp, path)
    return path


class ShardWriter:
    """One shard written as its tokens arrive (`write`), the header's count filled in by `close`;
    the same bytes as `write_shard` of all the tokens at once (without a loss mask). Written under a
    temporary name and renamed by `close`; `abort` removes it."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer_id: str):
        self.path, self.vocab_size, self.tokenizer_id = Path(path), vocab_size, tokenizer_id
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        _header(0, vocab_size, tokenizer_id, False)           # checks the identity's length
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.file.write(b"\0" * HEADER_SIZE)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ShardError(f"{self.path}: tokens must be a 1-D array, got shape {tokens.shape}")
        if not tokens.size:
            return
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ShardError(f"{self.path}: token ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.count += int(tokens.size)

    def close(self) -> Path:
        self.file.seek(0)
        self.file.write(_header(self.count, self.vocab_size, self.tokenizer_id, False))
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardReader:
    """A validated, memory-mapped shard: `.tokens` (uint16/uint32) and `.mask` (uint8 or None)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        redo = "re-create it with `llmqgen data prepare`"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as e:
            raise ShardError(f"{self.path}: cannot read token shard ({e.strerror}); check the "
                             "dataset path") from e
        if len(head) < HEADER_SIZE or head[:8] != MAGIC:
            raise ShardError(f"{self.path}: not an llmqgen token shard (bad magic); {redo}")
        magic, version, width, flags, vocab, count = _FIXED.unpack_from(head)
        if version != VERSION:
            raise ShardError(f"{self.path}: shard format version {version}, this llmqgen reads "
                             f"version {VERSION}; {redo}")
        if struct.unpack_from("<I", head, _CRC_AT)[0] != zlib.crc32(head[:_CRC_AT]):
            raise ShardError(f"{self.path}: header checksum mismatch (file corrupted); {redo}")
        if width != token_dtype(vocab).itemsize:
            raise ShardError(f"{self.path}: token width {width} does not fit vocab {vocab}; {redo}")
        has_mask = bool(flags & FLAG_LOSS_MASK)
        expect = HEADER_SIZE + count * width + (count if has_mask else 0)
        if size != expect:
            raise ShardError(f"{self.path}: file is {size} bytes, header says {expect} "
                             f"({count} tokens); the file is truncated or was not fully written; "
                             f"{redo}")
        self.vocab_size = vocab
        self.num_tokens = count
        self.tokenizer_id = head[32:32 + IDENTITY_BYTES].rstrip(b"\0").decode("utf-8")
        dt = token_dtype(vocab)
        self.tokens = (np.memmap(self.path, dtype=dt, mode="r", offset=HEADER_SIZE, shape=(count,))
                       if count else np.zeros(0, dt))
        self.mask = None
        if has_mask:
            self.mask = (np.memmap(self.path, dtype=np.uint8, mode="r",
                                   offset=HEADER_SIZE + count * width, shape=(count,))
                         if count else np.zeros(0, np.uint8))


@dataclass
class ShardEntry:
    file: str
    tokens: int


@dataclass
class Manifest:
    """What a dataset directory holds: shards per split and the tokenizer they were made with."""

    tokenizer_id: str
    vocab_size: int
    eos_id: int
    train: list[ShardEntry] = field(default_factory=list)
    eval: list[ShardEntry] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)   # per split
    sources: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[ShardEntry]:
        if name not in ("train", "eval"):
            raise ValueError(f"unknown split {name!r}: use 'train' or 'eval'")
        return self.train if name == "train" else self.eval

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split(split))


def write_manifest(directory: str | os.PathLike, m: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    doc = {"format": MANIFEST_FORMAT, "version": VERSION, "tokenizer": m.tokenizer_id,
           "vocab_size": m.vocab_size, "eos_id": m.eos_id, "sources": m.sources,
           "documents": m.documents,
           "splits": {s: [{"file": e.file, "tokens": e.tokens} for e in m.split(s)]
                      for s in ("train", "eval")}}
    tmp = path.with_name(MANIFEST + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST}; a dataset is a directory made by "
                         "`llmqgen data prepare INPUTS --out DIR`")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != MANIFEST_FORMAT or doc.get("version") != VERSION:
            raise ShardError(f"{path}: not an llmqgen dataset manifest of version {VERSION}; "
                             "re-create it with `llmqgen data prepare`")
        splits = {s: [ShardEntry(e["file"], int(e["tokens"])) for e in doc["splits"][s]]
                  for s in ("train", "eval")}
        return Manifest(doc["tokenizer"], int(doc["vocab_size"]), int(doc["eos_id"]),
                        splits["train"], splits["eval"], dict(doc.get("documents", {})),
                        list(doc.get("sources", [])))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: malformed manifest ({e}); re-create it with "
                         "`llmqgen data prepare`") from e


def open_split(directory: str | os.PathLike, split: str) -> tuple[Manifest, list[ShardReader]]:
    """The manifest and validated readers of one split; shards must agree with the manifest."""
    directory = Path(directory)
    m = read_manifest(directory)
    readers = []
    for e in m.split(split):
        r = ShardReader(directory / e.file)
        if r.num_tokens != e.tokens or r.tokenizer_id != m.tokenizer_id \
                or r.vocab_size != m.vocab_size:
            raise ShardError(f"{r.path}: shard disagrees with {directory / MANIFEST} (tokens "
                             f"{r.num_tokens} vs {e.tokens}, tokenizer {r.tokenizer_id!r} vs "
                             f"{m.tokenizer_id!r}); re-create the dataset with `llmqgen data prepare`")
        readers.append(r)
    return m, readers


def check_vocab(tokenizer: str, vocab: int, model) -> None:
    """Token ids of a dataset must be ids of the model's embedding (`model`: a ModelSpec; data is a leaf
    and does not import models): say so before any work."""
    if vocab > model.vocab_size:
        name = tokenizer.split(":")[0]
        family = next((f for p, f in (("qwen", "Qwen"), ("llama", "Llama 3")) if name.lower().startswith(p)),
                      f"{name}-tokenised")
        raise ValueError(f"the dataset was tokenised with {name} (vocab {vocab:,} ids); {model.name} has vocab "
                         f"{model.vocab_size:,}: prepare data with its tokenizer (llmqgen data prepare DOCS "
                         f"--out DIR --tokenizer PATH) or pick a {family} model")


def check_dataset(data: Path, model) -> None:
    m = read_manifest(data)
    check_vocab(m.tokenizer_id, m.vocab_size, model)
