"""Tokenizers: the bundled Qwen2.5 BPE against known ids, tiktoken files and HF tokenizer.json."""
import base64
import hashlib
import json
import pickle

import pytest

from llmqgen.data.tokenizer import (QWEN25_EOS_ID, TokenizerError, load_tokenizer,
                                    qwen_bpe_file)


def test_qwen25_known_ids_and_identity():
    tok = load_tokenizer("qwen2.5")
    # ids of Qwen2.5's tokenizer.json for these strings
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("def foo():\n    return 1") == [750, 15229, 3932, 262, 470, 220, 16]
    assert tok.eos_id == QWEN25_EOS_ID == 151643
    assert tok.vocab_size == 151665
    sha = hashlib.sha256(qwen_bpe_file().read_bytes()).hexdigest()
    assert tok.identity == f"qwen2.5:{sha}"
    # special-token text in documents stays text: no EOS can be injected by the data
    assert QWEN25_EOS_ID not in tok.encode("a <|endoftext|> b")
    text = "Grüße, 世界! x = [1, 2]\n\n\tend"
    assert tok.decode(tok.encode(text)) == text


def test_pickles_by_spec():
    tok = load_tokenizer("qwen2.5")
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_tiktoken_file(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"ab", b"abc"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = load_tokenizer(str(path))
    assert tok.encode("abc ab") == [257, ord(" "), 256]
    assert tok.eos_id == 258 and tok.vocab_size == 259
    assert tok.identity.startswith("tiny:")


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "mytok").mkdir()
    t.save(str(tmp_path / "mytok" / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "mytok"))
    assert tok.encode("hello world zzz") == [1, 2, 0]
    assert tok.eos_id == 3 and tok.vocab_size == 4
    assert tok.identity.startswith("mytok:")


def test_hf_tokenizer_without_eos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="end-of-text"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_unknown_tokenizer():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'no-such-tokenizer': give one of qwen2.5"):
        load_tokenizer("no-such-tokenizer")


@pytest.mark.parametrize("spec", ["/nonexist/tokenizer.json", "my.tiktoken", "some/dir"])
def test_a_missing_tokenizer_file_is_named_as_missing(spec):
    with pytest.raises(TokenizerError, match=f"tokenizer file {spec} does not exist: check the path"):
        load_tokenizer(spec)


# ---- special-token strings inside documents are text, for every kind of tokenizer ----------------

SPECIAL_DOC = ("Datasets mark documents with <|endoftext|> written as text; chats hold "
               "<|im_start|>user\nhi<|im_end|> and <tool_call>{}</tool_call> <|fim_prefix|>.\n")


def _byte_level_json(path, specials, plain_added=()):
    """A byte-level BPE tokenizer.json (no merges) with special and non-special added tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)},
                                                   merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(list(specials))
    t.add_tokens([AddedToken(s, special=False) for s in plain_added])
    path.mkdir(parents=True, exist_ok=True)
    t.save(str(path / "tokenizer.json"))
    return str(path / "tokenizer.json")


def _tiktoken_file(tmp_path):
    path = tmp_path / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return str(path)


def test_specials_are_text_builtin():
    from llmqgen.data.tokenizer import QWEN25_SPECIALS
    tok = load_tokenizer("qwen2.5")
    for s in QWEN25_SPECIALS:
        ids = tok.encode(f"x {s} y")
        assert max(ids) < QWEN25_EOS_ID and tok.decode(ids) == f"x {s} y", s
    ids = tok.encode(SPECIAL_DOC)
    assert list(tok.encode_array(SPECIAL_DOC)) == ids and tok.encode_array(SPECIAL_DOC).dtype == "uint32"
    assert list(tok.encode_array("a\ud800b")) == tok.encode("a\ud800b")     # lone surrogate


def test_specials_are_text_tiktoken_file(tmp_path):
    tok = load_tokenizer(_tiktoken_file(tmp_path))
    assert tok.eos_id == 256 and tok.cut_safe
    assert tok.encode("a<|endoftext|>b") == list(b"a<|endoftext|>b")


def test_specials_are_text_tokenizer_json(tmp_path):
    spec = _byte_level_json(tmp_path / "bl", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            plain_added=["<tool_call>", "</tool_call>", "<|fim_prefix|>"])
    tok = load_tokenizer(spec)
    assert tok.eos_id == 256 and tok.vocab_size == 262 and not tok.cut_safe
    ids = tok.encode(SPECIAL_DOC)
    assert max(ids) < 256 and tok.decode(ids) == SPECIAL_DOC
    # the separator is still the special id, and decodes as such
    assert tok.decode([*tok.encode("a"), tok.eos_id]) == "a<|endoftext|>"


@pytest.mark.parametrize("kind", ["qwen2.5", "tiktoken", "tokenizer.json"])
def test_prepare_keeps_specials_as_text(tmp_path, kind):
    """Through the command: the only special id in the data is the EOS after each document."""
    from click.testing import CliRunner

    from llmqgen.data.cli import data
    from llmqgen.data.shards import open_split
    spec = {"qwen2.5": "qwen2.5", "tiktoken": _tiktoken_file(tmp_path),
            "tokenizer.json": _byte_level_json(tmp_path / "bl", ["<|endoftext|>", "<|im_start|>",
                                                                 "<|im_end|>"], ["<tool_call>"])}[kind]
    tok = load_tokenizer(spec)
    (tmp_path / "doc.txt").write_text(SPECIAL_DOC * 3)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": SPECIAL_DOC}) + "\n")
    res = CliRunner().invoke(data, ["prepare", str(tmp_path / "doc.txt"), str(tmp_path / "more.jsonl"),
                                    "--out", str(tmp_path / "ds"), "--tokenizer", spec,
                                    "--eval-fraction", "0", "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    got = [int(t) for r in open_split(tmp_path / "ds", "train")[1] for t in r.tokens]
    want = tok.encode(SPECIAL_DOC * 3) + [tok.eos_id] + tok.encode(SPECIAL_DOC) + [tok.eos_id]
    assert got == want
    first_special = min(tok.eos_id, 151643 if kind == "qwen2.5" else 256)
    assert [i for i, t in enumerate(got) if t >= first_special] == \
        [len(tok.encode(SPECIAL_DOC * 3)), len(got) - 1]


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
