"""`data prepare` decodes strictly: undecodable and binary files stop it with one line naming the
file (or are skipped, each named, with --skip-bad-files); --encoding decodes Latin-1, UTF-16..."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from llmqgen.cli import main
from llmqgen.data.prepare import PrepareError, prepare
from llmqgen.data.shards import open_split
from llmqgen.data.tokenizer import load_tokenizer

LATIN1 = "Café crème brûlée, naïve façade.\n"
UTF16 = "Hello from a Windows editor. Grüße 数据\r\n"


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text("plain good text\n", encoding="utf-8")
    (d / "latin1.txt").write_bytes(LATIN1.encode("latin-1"))
    (d / "utf16.txt").write_bytes(UTF16.encode("utf-16"))          # with a BOM
    (d / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    return d


def _run(*args):
    """`llmqgen data prepare`, through the command line that prints the library's warnings."""
    return CliRunner().invoke(main, ["data", "prepare", *map(str, args), "--eval-fraction", "0",
                                     "--workers", "1", "--quiet"])


def _tokens(out):
    _, readers = open_split(out, "train")
    return [int(t) for r in readers for t in r.tokens]


def _one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("name, what", [
    ("latin1.txt", "not valid UTF-8 text (invalid continuation byte 0xe9 at byte offset 3)"),
    ("utf16.txt", "starts with a UTF-16 byte-order mark: UTF-16 text, not UTF-8; give --encoding auto"),
    ("binary.txt", "holds NUL bytes (the first at byte offset 7): a binary file")])
def test_bad_file_stops_with_one_line(files, tmp_path, name, what):
    res = _run(files / "good.txt", files / name, "--out", tmp_path / "ds")
    line = _one_error_line(res, str(files / name), what, "--skip-bad-files")
    if name != "binary.txt":
        assert "--encoding" in line
    assert not (tmp_path / "ds").exists()        # checked before anything is written


def test_directory_with_a_binary_txt(files, tmp_path):
    res = _run(files, "--out", tmp_path / "ds", "--encoding", "latin-1")
    # Latin-1 decodes any byte: the UTF-16 file's NULs and the binary file's are refused still
    _one_error_line(res, "binary.txt", "NUL bytes")


def test_skip_bad_files_names_each(files, tmp_path):
    res = _run(files, "--out", tmp_path / "ds", "--skip-bad-files")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3
    for name in ("binary.txt", "latin1.txt", "utf16.txt"):
        assert sum(name in w and "skipping" in w for w in warnings) == 1
    assert "3 bad files skipped" in res.output and "prepared 1 document," in res.output
    tok = load_tokenizer("qwen2.5")
    assert _tokens(tmp_path / "ds") == tok.encode("plain good text\n") + [tok.eos_id]
    res = _run(files / "latin1.txt", "--out", tmp_path / "ds2", "--skip-bad-files")
    assert res.exit_code == 2 and "Traceback" not in res.output
    warning, error = res.output.splitlines()
    assert warning.startswith("warning: skipping ") and "latin1.txt" in warning
    assert error.startswith("error: no input left") and "--encoding" in error


def test_encodings_decode(files, tmp_path):
    tok = load_tokenizer("qwen2.5")
    res = _run(files / "latin1.txt", "--out", tmp_path / "a", "--encoding", "latin-1")
    assert res.exit_code == 0, res.output
    assert _tokens(tmp_path / "a") == tok.encode(LATIN1) + [tok.eos_id]
    res = _run(files / "utf16.txt", files / "good.txt", "--out", tmp_path / "b", "--encoding", "auto")
    assert res.exit_code == 0, res.output
    want = tok.encode(UTF16) + [tok.eos_id] + tok.encode("plain good text\n") + [tok.eos_id]
    assert _tokens(tmp_path / "b") == want                   # no BOM character, no NULs
    text = tok.decode(_tokens(tmp_path / "b"))
    assert "\ufffd" not in text and "\0" not in text and "\ufeff" not in text
    res = _run(files / "utf16.txt", "--out", tmp_path / "c", "--encoding", "utf-16")
    assert res.exit_code == 0 and _tokens(tmp_path / "c") == tok.encode(UTF16) + [tok.eos_id]
    # the binary file is refused whatever the encoding
    _one_error_line(_run(files / "binary.txt", "--out", tmp_path / "d", "--encoding", "latin-1"),
                    "binary.txt")
    _one_error_line(_run(files / "good.txt", "--out", tmp_path / "e", "--encoding", "klingon"),
                    "unknown --encoding 'klingon'")
    _one_error_line(_run(files / "good.txt", "--out", tmp_path / "e", "--encoding", "base64"),
                    "unknown --encoding")


def test_auto_detects_each_bom(tmp_path):
    tok = load_tokenizer("qwen2.5")
    text = "Grüße 数据 🙂\n"
    for codec, data in [("utf-8-sig", text.encode("utf-8-sig")), ("utf-16-be", b"\xfe\xff" + text.encode("utf-16-be")),
                        ("utf-32", text.encode("utf-32")), ("none", text.encode("utf-8"))]:
        (tmp_path / f"{codec}.txt").write_bytes(data)
        prepare([tmp_path / f"{codec}.txt"], tmp_path / codec, eval_fraction=0, workers=1,
                progress=False, encoding="auto")
        assert _tokens(tmp_path / codec) == tok.encode(text) + [tok.eos_id], codec


def test_utf8_bom_dropped_and_truncated_utf8(tmp_path):
    tok = load_tokenizer("qwen2.5")
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n".encode("utf-8"))
    prepare([tmp_path / "bom.txt"], tmp_path / "a", eval_fraction=0, workers=1, progress=False)
    assert _tokens(tmp_path / "a") == tok.encode("hello\n") + [tok.eos_id]
    (tmp_path / "cut.txt").write_bytes("ok 数".encode("utf-8")[:-1])
    with pytest.raises(PrepareError, match=r"cut.txt: not valid UTF-8 text \(unexpected end of data 0xe6 at byte offset 3\)"):
        prepare([tmp_path / "cut.txt"], tmp_path / "b", workers=1, progress=False)


def test_invalid_utf8_far_into_a_file(tmp_path, monkeypatch):
    """The offset is the file's, across read blocks; the check runs before any tokenizing."""
    import llmqgen.data.prepare as prep
    monkeypatch.setattr(prep, "_BLOCK_BYTES", 1000)
    data = ("数据 text\n" * 500).encode("utf-8")
    (tmp_path / "late.txt").write_bytes(data + b"\xff tail")
    with pytest.raises(PrepareError) as e:
        prepare([tmp_path / "late.txt"], tmp_path / "ds", workers=1, progress=False)
    assert f"byte 0xff at byte offset {len(data):,})" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_jsonl_encodings(tmp_path):
    tok = load_tokenizer("qwen2.5")
    docs = ["Café", "naïve\nline two"]
    body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    (tmp_path / "l1.jsonl").write_bytes(body.encode("latin-1"))
    (tmp_path / "u16.jsonl").write_bytes(body.encode("utf-16"))
    want = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    res = _run(tmp_path / "l1.jsonl", "--out", tmp_path / "bad")
    _one_error_line(res, "l1.jsonl", "not valid UTF-8")
    res = _run(tmp_path / "l1.jsonl", "--out", tmp_path / "a", "--encoding", "latin-1")
    assert res.exit_code == 0 and _tokens(tmp_path / "a") == want
    res = _run(tmp_path / "u16.jsonl", "--out", tmp_path / "b", "--encoding", "auto")
    assert res.exit_code == 0 and _tokens(tmp_path / "b") == want
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    _one_error_line(_run(tmp_path / "broken.jsonl", "--out", tmp_path / "c"), "broken.jsonl:2",
                    "invalid JSON")


def test_good_inputs_unchanged_by_the_check(tmp_path):
    """Valid UTF-8 of every kind (CRLF, tabs, supplementary planes) tokenizes as before."""
    tok = load_tokenizer("qwen2.5")
    text = "line\r\n\tindented 🙂\n\n  spaced\u3000wide\u2028sep\n" * 50
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    prepare([tmp_path / "a.txt"], tmp_path / "ds", eval_fraction=0, workers=1, progress=False)
    np.testing.assert_array_equal(_tokens(tmp_path / "ds"), tok.encode(text) + [tok.eos_id])
