"""`data prepare`: text files, directories, JSONL or Parquet -> a directory of token shards.

Documents are read in a fixed order (inputs as given, directories sorted recursively), tokenized
in worker processes (`Pool.imap` keeps the order, so the output is bit-identical for any worker
count), joined with EOS after each document, and split train/eval by a hash of the document index.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .shards import MANIFEST, Manifest, ShardEntry, write_manifest, write_shard
from .tokenizer import load_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".cu", ".rs", ".go",
                 ".js", ".ts", ".java", ".tex", ".html", ".css", ".sh", ".toml", ".yaml", ".yml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
_BATCH_BYTES = 1 << 20          # texts sent to a worker at a time


class PrepareError(ValueError):
    pass


@dataclass
class PrepareStats:
    documents: int
    tokens: int
    shards: int
    seconds: float

    def summary(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        return (f"prepared {self.documents:,} documents, {self.tokens:,} tokens in {self.shards} "
                f"shards, {self.seconds:.1f} s ({rate:,.0f} tokens/s)")


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in known)
        elif item.is_file():
            files.append(item)
        else:
            raise PrepareError(f"input {item} does not exist: give text/JSONL/Parquet files or "
                               "directories")
    if not files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))} (looked for "
                           f"{', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))}, .parquet)")
    return files


def _field(doc: object, name: str, where: str) -> str:
    if not isinstance(doc, dict) or not isinstance(doc.get(name), str):
        raise PrepareError(f"{where}: no string field {name!r}; choose the field with --field")
    return doc[name]


def _documents(files: list[Path], field: str) -> Iterator[tuple[str, int]]:
    """(text, bytes of input consumed) per document, in order."""
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            doc = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise PrepareError(f"{path}:{n}: invalid JSON ({e.msg})") from e
                        yield _field(doc, field, f"{path}:{n}"), len(line)
        elif path.suffix in PARQUET_SUFFIXES:
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise PrepareError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
                                   "(or convert to JSONL)") from e
            table = pq.read_table(path)
            if field not in table.column_names:
                raise PrepareError(f"{path}: no column {field!r} (columns: "
                                   f"{', '.join(table.column_names)}); choose it with --field")
            column = table.column(field).to_pylist()
            share = path.stat().st_size // max(len(column), 1)
            for text in column:
                yield text or "", share
        else:
            raw = path.read_bytes()
            yield raw.decode("utf-8", errors="replace"), len(raw)


def _batches(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    texts, size = [], 0
    for text, nbytes in docs:
        texts.append(text)
        size += nbytes
        if size >= _BATCH_BYTES:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size


def _tokenize(job: tuple[str, list[str], int]) -> tuple[list[np.ndarray], int]:
    spec, texts, nbytes = job
    tok = load_tokenizer(spec)          # cached per process
    return [np.asarray(tok.encode(t), dtype=np.uint32) for t in texts], nbytes


def is_eval(doc_index: int, eval_fraction: float) -> bool:
    """Deterministic split: a document is eval when the hash of its index falls below the fraction."""
    h = hashlib.blake2b(doc_index.to_bytes(8, "little"), digest_size=8, person=b"llmqsplt")
    return int.from_bytes(h.digest(), "little") < eval_fraction * 2.0 ** 64


class _SplitWriter:
    """Buffers one split's tokens and writes shards of exactly `shard_tokens` (the last shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab: int, ident: str):
        self.out, self.split, self.shard_tokens, self.vocab, self.ident = \
            out, split, shard_tokens, vocab, ident
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.entries: list[ShardEntry] = []
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.parts.append(tokens)
        self.buffered += tokens.size
        self.documents += 1
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.parts)
            self._write(flat[:self.shard_tokens])
            self.parts, self.buffered = [flat[self.shard_tokens:]], flat.size - self.shard_tokens

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.parts))
        self.parts, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.entries):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab, self.ident)
        self.entries.append(ShardEntry(name, int(tokens.size)))


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.start = self.last = time.perf_counter()

    def update(self, done_bytes: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and not final):
            return
        self.last = now
        frac = min(done_bytes / self.total, 1.0)
        bar = "#" * int(frac * 30)
        rate = tokens / max(now - self.start, 1e-9)
        sys.stderr.write(f"\rtokenizing [{bar:<30}] {100 * frac:5.1f}%  {tokens:,} tokens  "
                         f"{rate:,.0f} tokens/s" + ("\n" if final else ""))
        sys.stderr.flush()


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, tokenizer: str = "qwen2.5",
            field: str = "text", eval_fraction: float = 0.01, shard_tokens: int = 100_000_000,
            workers: Optional[int] = None, max_tokens: Optional[int] = None,
            progress: bool = True, force: bool = False) -> tuple[Manifest, PrepareStats]:
    """Tokenize `inputs` into the dataset directory `out`; `max_tokens` stops after the document
    that reaches it. Returns the manifest written and the statistics."""
    if not 0.0 <= eval_fraction < 1.0:
        raise PrepareError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be positive, got {shard_tokens}")
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise PrepareError(f"{out} already holds a dataset: choose another --out or pass --force")
    files = _expand(inputs)
    tok = load_tokenizer(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("train-*.bin"), *out.glob("eval-*.bin")]:    # a forced overwrite's shards
        old.unlink()
    writers = {s: _SplitWriter(out, s, shard_tokens, tok.vocab_size, tok.identity)
               for s in ("train", "eval")}
    bar = _Progress(sum(p.stat().st_size for p in files), progress)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = ((tokenizer, texts, n) for texts, n in _batches(_documents(files, field)))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    doc_index = tokens = done_bytes = 0
    try:
        results = pool.imap(_tokenize, jobs) if pool else map(_tokenize, jobs)
        for arrays, nbytes in results:
            for ids in arrays:
                if max_tokens is not None and tokens >= max_tokens:
                    break
                split = "eval" if is_eval(doc_index, eval_fraction) else "train"
                writers[split].add(np.append(ids, np.uint32(tok.eos_id)))
                doc_index += 1
                tokens += ids.size + 1
            done_bytes += nbytes
            bar.update(done_bytes, tokens)
            if max_tokens is not None and tokens >= max_tokens:
                break
    finally:
        if pool:
            pool.terminate()
    for w in writers.values():
        w.close()
    bar.update(bar.total, tokens, final=True)
    manifest = Manifest(tok.identity, tok.vocab_size, tok.eos_id, writers["train"].entries,
                        writers["eval"].entries,
                        {s: w.documents for s, w in writers.items()}, [str(p) for p in inputs])
    write_manifest(out, manifest)
    stats = PrepareStats(doc_index, tokens, sum(len(w.entries) for w in writers.values()),
                         time.perf_counter() - bar.start)
    return manifest, stats
