"""Tokenizers: the bundled Qwen2.5 BPE against known ids, tiktoken files and HF tokenizer.json."""
import base64
import hashlib
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
    with pytest.raises(TokenizerError, match="qwen2.5"):
        load_tokenizer("no-such-tokenizer")
