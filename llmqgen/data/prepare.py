"""`data prepare`: text files, directories, JSONL or Parquet -> a directory of token shards.

Documents are read in a fixed order (inputs as given, directories sorted recursively), tokenized
in worker processes, joined with EOS after each document, and split train/eval by a hash of the
document index. One text file is one document; one JSONL line or Parquet row is one document.

Reading streams: a file is read in blocks of `_BLOCK_BYTES` and decoded incrementally, and a long
document is cut into pieces of about `_PIECE_CHARS` characters where a newline is followed by a
non-space character (`tokenizer.is_cut`); for the tokenizers where such cuts are provably
token-identical (`Tokenizer.cut_safe`, see tokenizer.py) the pieces are tokenized separately, by
all workers, and the tokens are the same as encoding the document whole. Pieces go to the workers
in jobs of about `_BATCH_BYTES`, at most `_IN_FLIGHT_PER_WORKER` jobs per worker at a time, and
their results are taken in submission order; shards are written as tokens arrive. So memory is
bounded by the jobs in flight whatever the file sizes, and the output is bit-identical for any
worker count. (A tokenizer that is not cut-safe gets each document whole.)

Decoding is strict: `encoding` (default UTF-8; a UTF-8 byte-order mark is dropped) or `auto` (by
byte-order mark: UTF-32, UTF-16, UTF-8, else UTF-8). Every text and JSONL file is checked before
anything is written: a file that does not decode, or holds NUL characters (a binary file, or UTF-16
without a byte-order mark), stops `prepare` with a message naming it, or with `skip_bad_files`
is left out with a warning naming it. Nothing is ever decoded with replacement characters.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .shards import MANIFEST, Manifest, ShardEntry, ShardWriter, write_manifest
from .tokenizer import first_cut, last_cut, load_tokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".cu", ".rs", ".go",
                 ".js", ".ts", ".java", ".tex", ".html", ".css", ".sh", ".toml", ".yaml", ".yml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
_BLOCK_BYTES = 1 << 20          # read at a time
_PIECE_CHARS = 1 << 20          # a longer document is cut into pieces of about this size
_BATCH_BYTES = 1 << 20          # texts sent to a worker at a time
_IN_FLIGHT_PER_WORKER = 2       # jobs queued per worker (bounds the memory of texts and tokens)
AUTO = "auto"
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
ENCODING_HINT = ("give the encoding with --encoding (e.g. --encoding latin-1, or --encoding auto for "
                 "UTF-16/UTF-32/UTF-8 files with a byte-order mark) or leave such files out with "
                 "--skip-bad-files")
BINARY_HINT = ("leave it out of the inputs, or leave such files out with --skip-bad-files (for "
               "UTF-16 text without a byte-order mark give --encoding utf-16-le or utf-16-be)")


class PrepareError(ValueError):
    pass


class _BadFile(PrepareError):
    """A file that cannot be read as text: `reason` names it, `hint` says what to do."""

    def __init__(self, reason: str, hint: str):
        super().__init__(f"{reason}; {hint}")
        self.reason, self.hint = reason, hint


@dataclass
class PrepareStats:
    documents: int
    tokens: int
    shards: int
    seconds: float
    skipped: int = 0

    def summary(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        def n(count: int, noun: str) -> str:
            return f"{count:,} {noun}{'' if count == 1 else 's'}"
        skipped = f", {n(self.skipped, 'bad file')} skipped" if self.skipped else ""
        return (f"prepared {n(self.documents, 'document')}, {n(self.tokens, 'token')} in {n(self.shards, 'shard')}, "
                f"{self.seconds:.1f} s ({rate:,.0f} tokens/s){skipped}")


def _files_under(folder: Path) -> list[Path]:
    """The files of known suffixes under `folder`, leaving out hidden files and folders (.git, .venv),
    as most tools do; a folder that cannot be read is an error, as a file that cannot be read is."""
    def fail(e: OSError):
        raise PrepareError(f"{e.filename}: cannot read ({e.strerror or e})") from e

    known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    found = []
    for top, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / n for n in names if not n.startswith(".") and Path(n).suffix in known]
    return sorted(p for p in found if p.is_file())


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += _files_under(item)
        elif item.is_file():
            files.append(item)
        else:
            raise PrepareError(f"input {item} does not exist: give text/JSONL/Parquet files or "
                               "directories")
    unique: dict[Path, Path] = {}       # each file once (docs/ docs/a.txt), where it came first
    for f in files:
        unique.setdefault(f.resolve(), f)
    files = list(unique.values())
    if not files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))} (looked for "
                           f"{', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))}, .parquet)")
    return files


# ---- decoding ------------------------------------------------------------------------------------

def check_encoding(encoding: str) -> str:
    """The codec `encoding` names (`auto` stays `auto`; UTF-8 drops a byte-order mark)."""
    if encoding.strip().lower() == AUTO:
        return AUTO
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise PrepareError(f"unknown --encoding {encoding!r}: give a text encoding such as utf-8, "
                           "latin-1, cp1252, utf-16, or auto (by byte-order mark)")
    return "utf-8-sig" if info.name == "utf-8" else info.name


def _codec_of(path: Path, codec: str) -> str:
    if codec != AUTO:
        return codec
    with open(path, "rb") as f:
        head = f.read(4)
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8-sig")


def _label(codec: str) -> str:
    return {"utf-8-sig": "UTF-8", "utf-16": "UTF-16", "utf-32": "UTF-32",
            "iso8859-1": "Latin-1"}.get(codec, codec)


def _blocks(path: Path, codec: str) -> Iterator[tuple[str, int]]:
    """(text, bytes read) per block of `path`, decoded strictly; NUL characters refused."""
    decoder = codecs.getincrementaldecoder(codec)("strict")
    wide = codecs.lookup(codec).name.replace("_", "-").startswith(("utf-16", "utf-32"))
    offset = chars = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_BLOCK_BYTES)
                if not offset and not wide:
                    _refuse_wide_bom(path, raw, codec)
                nul = -1 if wide else raw.find(b"\0")     # a NUL byte is a NUL character
                if nul >= 0:
                    raise _BadFile(f"{path}: holds NUL bytes (the first at byte offset "
                                   f"{offset + nul:,}): a binary file, not text", BINARY_HINT)
                pending = decoder.getstate()[0]
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    data = pending + raw            # decoders may drop a prefix (a BOM) first
                    at = offset - len(pending) + len(data) - len(e.object) + e.start
                    byte = f" 0x{e.object[e.start]:02x}" if e.start < len(e.object) else ""
                    raise _BadFile(f"{path}: not valid {_label(codec)} text ({e.reason}{byte} at "
                                   f"byte offset {at:,})", ENCODING_HINT) from e
                nul = text.find("\0")
                if nul >= 0:
                    raise _BadFile(f"{path}: holds NUL characters (the first is character "
                                   f"{chars + nul:,} as {_label(codec)}): a binary file, not text",
                                   BINARY_HINT)
                offset += len(raw)
                chars += len(text)
                if text or raw:
                    yield text, len(raw)
                if not raw:
                    return
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror or e})") from e


def _refuse_wide_bom(path: Path, head: bytes, codec: str) -> None:
    for bom, name in _BOMS:
        if head.startswith(bom) and name != "utf-8-sig":
            raise _BadFile(f"{path}: starts with a {_label(name)} byte-order mark: {_label(name)} "
                           f"text, not {_label(codec)}", f"give --encoding auto (or --encoding "
                           f"{name}), or leave such files out with --skip-bad-files")


def _check_file(path: Path, codec: str) -> None:
    """Raises `_BadFile` when `path` does not decode with `codec` or is binary."""
    for _ in _blocks(path, codec):
        pass


# ---- documents and pieces ------------------------------------------------------------------------

@dataclass
class _Source:
    path: Path
    kind: str                   # "text", "jsonl" or "parquet"
    codec: Optional[str]        # the decoding of a text or JSONL file


def _kind(path: Path) -> str:
    if path.suffix in JSONL_SUFFIXES:
        return "jsonl"
    return "parquet" if path.suffix in PARQUET_SUFFIXES else "text"


def _pieces(blocks: Iterable[tuple[str, int]], cut: bool) -> Iterator[tuple[str, bool, int]]:
    """One document from its text blocks: (piece, is the last, input bytes) in order. With `cut`,
    pieces end at cut points, about `_PIECE_CHARS` long: at the last cut point within that length
    of the piece's start, else at the first one after it (a document without cut points stays whole)."""
    if not cut:
        blocks = list(blocks)
        yield "".join(t for t, _ in blocks), True, sum(n for _, n in blocks)
        return
    buf, pos, nbytes = "", 0, 0
    scanned = 0         # no cut point lies in (pos + _PIECE_CHARS, scanned)
    for text, n in blocks:
        if pos:
            buf, scanned, pos = buf[pos:] + text, max(scanned - pos, 0), 0
        else:
            buf += text
        nbytes += n
        while len(buf) - pos > _PIECE_CHARS:
            limit = pos + _PIECE_CHARS
            c = last_cut(buf, pos + 1, limit) if scanned <= limit else 0
            if not c:
                c = first_cut(buf, max(limit + 1, scanned))
                if not c:
                    scanned = len(buf)      # a cut at len(buf) depends on the next block
                    break
            yield buf[pos:c], False, nbytes
            pos, nbytes, scanned = c, 0, 0
    yield buf[pos:], True, nbytes


def _field(doc: object, name: str, where: str) -> str:
    if not isinstance(doc, dict) or not isinstance(doc.get(name), str):
        raise PrepareError(f"{where}: no string field {name!r}; choose the field with --field")
    return doc[name]


def _jsonl_texts(src: _Source, field: str) -> Iterator[tuple[str, int]]:
    rest, n = "", 0
    for block, _ in _blocks(src.path, src.codec):
        lines = (rest + block).split("\n")
        rest = lines.pop()
        for line in lines:
            n += 1
            if line.strip():
                yield _json_text(line, field, f"{src.path}:{n}"), len(line) + 1
    if rest.strip():
        yield _json_text(rest, field, f"{src.path}:{n + 1}"), len(rest)


def _json_text(line: str, field: str, where: str) -> str:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{where}: invalid JSON ({e.msg})") from e
    return _field(doc, field, where)


def _parquet_texts(path: Path, field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PrepareError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
                           "(or convert to JSONL)") from e
    try:
        table = pq.read_table(path, columns=None)
    except Exception as e:          # pyarrow's ArrowInvalid and friends
        raise PrepareError(f"{path}: not a readable Parquet file ({e})") from e
    if field not in table.column_names:
        raise PrepareError(f"{path}: no column {field!r} (columns: "
                           f"{', '.join(table.column_names)}); choose it with --field")
    column = table.column(field).to_pylist()
    share = path.stat().st_size // max(len(column), 1)
    for i, text in enumerate(column):
        if text is not None and not isinstance(text, str):
            raise PrepareError(f"{path}: column {field!r} holds {type(text).__name__} values (row "
                               f"{i}), not text; choose a string column with --field")
        yield text or "", share


def _all_pieces(sources: list[_Source], field: str, cut: bool) -> Iterator[tuple[str, bool, int]]:
    """(piece, ends a document, input bytes) over all documents, in order."""
    for src in sources:
        if src.kind == "text":
            yield from _pieces(_blocks(src.path, src.codec), cut)
        else:
            texts = (_jsonl_texts(src, field) if src.kind == "jsonl"
                     else _parquet_texts(src.path, field))
            for text, nbytes in texts:
                yield from _pieces([(text, nbytes)], cut)


def _jobs(pieces: Iterable[tuple[str, bool, int]]) -> Iterator[tuple[list[str], list[bool], int]]:
    """Pieces in jobs of about `_BATCH_BYTES` characters: (texts, ends of documents, input bytes)."""
    texts, lasts, size, total = [], [], 0, 0
    for text, last, nbytes in pieces:
        texts.append(text)
        lasts.append(last)
        size += len(text)
        total += nbytes
        if size >= _BATCH_BYTES:
            yield texts, lasts, total
            texts, lasts, size, total = [], [], 0, 0
    if texts:
        yield texts, lasts, total


def _tokenize(job: tuple[str, list[str]]) -> list[np.ndarray]:
    spec, texts = job
    tok = load_tokenizer(spec)          # cached per process
    return [tok.encode_array(t) for t in texts]


class _Done:
    """The result of a job run in this process (what `submit` gives for a pool)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# ---- output --------------------------------------------------------------------------------------

def is_eval(doc_index: int, eval_fraction: float) -> bool:
    """Deterministic split: a document is eval when the hash of its index falls below the fraction."""
    h = hashlib.blake2b(doc_index.to_bytes(8, "little"), digest_size=8, person=b"llmqsplt")
    return int.from_bytes(h.digest(), "little") < eval_fraction * 2.0 ** 64


class _SplitWriter:
    """Streams one split's tokens into shards of exactly `shard_tokens` (the last shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab: int, ident: str):
        self.out, self.split, self.shard_tokens, self.vocab, self.ident = \
            out, split, shard_tokens, vocab, ident
        self.entries: list[ShardEntry] = []
        self.documents = 0
        self.shard: Optional[ShardWriter] = None

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.shard is None:
                name = f"{self.split}-{len(self.entries):05d}.bin"
                self.shard = ShardWriter(self.out / name, self.vocab, self.ident)
            room = self.shard_tokens - self.shard.count
            self.shard.write(tokens[:room])
            tokens = tokens[room:]
            if self.shard.count == self.shard_tokens:
                self._finish()

    def close(self) -> None:
        if self.shard is not None:
            self._finish()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None

    def _finish(self) -> None:
        path = self.shard.close()
        self.entries.append(ShardEntry(path.name, self.shard.count))
        self.shard = None


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


def _sources(files: list[Path], codec: str, skip_bad_files: bool) -> tuple[list[_Source], int]:
    """The inputs to read, each text/JSONL file checked for its decoding; bad files stop, or are
    skipped with a warning naming each."""
    sources, skipped = [], 0
    for path in files:
        kind = _kind(path)
        if kind == "parquet":
            sources.append(_Source(path, kind, None))
            continue
        try:
            file_codec = _codec_of(path, codec)
            _check_file(path, file_codec)
        except OSError as e:
            raise PrepareError(f"{path}: cannot read ({e.strerror or e})") from e
        except _BadFile as bad:
            if not skip_bad_files:
                raise
            logger.warning(f"skipping {bad.reason}")
            skipped += 1
            continue
        sources.append(_Source(path, kind, file_codec))
    if not sources:
        raise PrepareError(f"no input left: all {skipped} input files were skipped as undecodable "
                           "or binary; " + ENCODING_HINT.split(" or leave")[0])
    return sources, skipped


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, tokenizer: str = "qwen2.5",
            field: str = "text", eval_fraction: float = 0.01, shard_tokens: int = 100_000_000,
            workers: Optional[int] = None, max_tokens: Optional[int] = None,
            progress: bool = True, force: bool = False, encoding: str = "utf-8",
            skip_bad_files: bool = False) -> tuple[Manifest, PrepareStats]:
    """Tokenize `inputs` into the dataset directory `out`; `max_tokens` stops after the document
    that reaches it. `encoding`: how text and JSONL files are decoded (a codec name, or `auto`);
    `skip_bad_files`: leave out undecodable and binary files (each named in a logged warning) instead
    of stopping. Returns the manifest written and the statistics."""
    if not 0.0 <= eval_fraction < 1.0:
        raise PrepareError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise PrepareError(f"--max-tokens must be positive, got {max_tokens}")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    codec = check_encoding(encoding)
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise PrepareError(f"{out} already holds a dataset: choose another --out or pass --force")
    files = _expand(inputs)
    tok = load_tokenizer(tokenizer)
    sources, skipped = _sources(files, codec, skip_bad_files)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("train-*.bin"), *out.glob("eval-*.bin")]:    # a forced overwrite's shards
        old.unlink()
    writers = {s: _SplitWriter(out, s, shard_tokens, tok.vocab_size, tok.identity)
               for s in ("train", "eval")}
    bar = _Progress(sum(s.path.stat().st_size for s in sources), progress)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = _jobs(_all_pieces(sources, field, tok.cut_safe))
    # an executor, not a Pool: a worker that dies (out of memory) breaks it with an error, where a Pool waits forever
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None
    eos = np.array([tok.eos_id], dtype=np.uint32)
    doc_index = tokens = done_bytes = 0
    split = "eval" if is_eval(0, eval_fraction) else "train"
    stop = False
    in_flight: deque = deque()
    try:
        def consume() -> None:
            nonlocal doc_index, tokens, done_bytes, split, stop
            result, lasts, nbytes = in_flight.popleft()
            for ids, last in zip(result.result(), lasts):
                writers[split].add(ids)
                tokens += ids.size
                if last:
                    writers[split].add(eos)
                    writers[split].documents += 1
                    tokens += 1
                    doc_index += 1
                    split = "eval" if is_eval(doc_index, eval_fraction) else "train"
                    if max_tokens is not None and tokens >= max_tokens:
                        stop = True
                        break
            done_bytes += nbytes
            bar.update(done_bytes, tokens)

        for texts, lasts, nbytes in jobs:
            job = (tokenizer, texts)
            in_flight.append((pool.submit(_tokenize, job) if pool else _Done(_tokenize(job)),
                              lasts, nbytes))
            while in_flight and not stop and \
                    (len(in_flight) > _IN_FLIGHT_PER_WORKER * workers or not pool):
                consume()
            if stop:
                break
        while in_flight and not stop:
            consume()
        for w in writers.values():
            w.close()
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, BrokenProcessPool):     # from submit or from a result
            raise PrepareError(f"a tokenizing worker process died (out of memory?): run again with fewer "
                               f"--workers than {workers}, or --workers 1") from None
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.update(bar.total, tokens, final=True)
    manifest = Manifest(tok.identity, tok.vocab_size, tok.eos_id, writers["train"].entries,
                        writers["eval"].entries,
                        {s: w.documents for s, w in writers.items()}, [str(p) for p in inputs])
    write_manifest(out, manifest)
    if eval_fraction > 0 and not manifest.eval:
        logger.warning(f"the eval split is empty: none of the {doc_index:,} documents fell into the "
                       f"--eval-fraction {eval_fraction}; `llmqgen run --eval-every` needs one: give more "
                       "documents or a larger --eval-fraction")
    stats = PrepareStats(doc_index, tokens, sum(len(w.entries) for w in writers.values()),
                         time.perf_counter() - bar.start, skipped)
    return manifest, stats
