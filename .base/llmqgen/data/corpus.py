"""The default corpus: this Python interpreter's standard library sources, tokenized with Qwen2.5.

Needs no download and is the same on every machine with the same Python, so `llmqgen train` works
out of the box and its losses are comparable between runs. Prepared once into a cache directory
($LLMQGEN_CACHE_DIR/corpus/<id> or ~/.cache/llmqgen/corpus/<id>) under a file lock.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from filelock import FileLock

from .prepare import prepare
from .shards import MANIFEST, read_manifest
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

MAX_TOKENS = 20_000_000            # bounds the preparation time and the disk used
EVAL_FRACTION = 0.02
SHARD_TOKENS = 4_000_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def cache_root() -> Path:
    env = os.environ.get("LLMQGEN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmqgen"


def stdlib_sources() -> list[Path]:
    """The stdlib's .py files, sorted, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files)


def corpus_id(files: list[Path], tokenizer_id: str) -> str:
    """Changes when the Python version, the file set or the tokenizer changes."""
    h = hashlib.sha256(f"{sys.version}|{tokenizer_id}|{MAX_TOKENS}|{EVAL_FRACTION}".encode())
    for p in files:
        h.update(f"{p}|{p.stat().st_size}\n".encode())
    return f"py{sys.version_info[0]}{sys.version_info[1]}-stdlib-{h.hexdigest()[:12]}"


def describe() -> str:
    v = sys.version_info
    return (f"default corpus: the Python {v[0]}.{v[1]} standard library's own .py sources "
            f"(tests excluded, at most {MAX_TOKENS / 1e6:.0f}M tokens), tokenized with Qwen2.5's "
            "BPE; give your own data with --data DIR (made by `llmqgen data prepare`)")


def default_corpus(progress: bool = True, workers: int | None = None) -> Path:
    """The dataset directory of the default corpus, preparing it on first use. `progress`: log what it
    is and, when preparing it, show the tokenizing progress and log the summary."""
    files = stdlib_sources()
    if not files:
        raise RuntimeError(f"no .py files under {sysconfig.get_paths()['stdlib']}: this Python has "
                           "no stdlib sources; give a dataset with --data DIR")
    tok = load_tokenizer("qwen2.5")
    out = cache_root() / "corpus" / corpus_id(files, tok.identity)
    if progress:
        logger.info(describe())
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / MANIFEST).is_file():          # another process prepared it meanwhile
            return out
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # a stdlib source that is not UTF-8 text (none in CPython's) is left out, not fatal
            _, stats = prepare(files, tmp, tokenizer="qwen2.5", eval_fraction=EVAL_FRACTION,
                               shard_tokens=SHARD_TOKENS, workers=workers, max_tokens=MAX_TOKENS,
                               progress=progress, skip_bad_files=True)
            read_manifest(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            logger.info(f"{stats.summary()} -> {out}")
    return out
