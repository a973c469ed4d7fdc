"""`llmqgen cache`: shows where the caches are and what is in them; `clear` asks first (or --yes)."""
from click.testing import CliRunner

from llmqgen.cli import main


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def fill(root):
    e = root / "cubin" / "ab" / ("ab" + "0" * 62)
    e.mkdir(parents=True)
    (e / "program.cubin").write_bytes(b"x" * 3000)
    (e / "meta.json").write_text("{}")
    (root / "cubin" / "ab" / (e.name + ".lock")).write_text("")
    c = root / "corpus" / "py311-stdlib-0123456789ab"
    c.mkdir(parents=True)
    (c / "train-000.bin").write_bytes(b"y" * 5000)
    (root / "nvrtc-headers" / "13.3").mkdir(parents=True)
    g = root / "gemm" / "NVIDIA-H200-cuBLASLt-130100-32-MiB-workspace"
    g.mkdir(parents=True)
    (g / "choices.json").write_text("{}")
    (root / "unrelated.txt").write_text("mine")


def test_show_lists_location_entries_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path))
    fill(tmp_path)
    r = invoke("cache")
    assert r.exit_code == 0, r.output
    assert f"cache: {tmp_path} ($LLMQGEN_CACHE_DIR)" in r.output
    assert "cubin/" in r.output and "1 entry" in r.output and "2.9 KiB" in r.output
    assert "py311-stdlib-0123456789ab" in r.output and "4.9 KiB" in r.output
    assert "gemm/" in r.output and "NVIDIA-H200-cuBLASLt-130100-32-MiB-wo" in r.output


def test_show_an_empty_or_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "none"))
    r = invoke("cache")
    assert r.exit_code == 0 and "0 entries" in r.output
    r = invoke("cache", "clear", "--yes")
    assert r.exit_code == 0 and "nothing to clear" in r.output


def test_clear_asks_and_keeps_everything_on_no(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path))
    fill(tmp_path)
    r = invoke("cache", "clear", input="n\n")                     # the user's no: not an error
    assert r.exit_code == 0 and r.output.rstrip().endswith("nothing cleared") and "error" not in r.output
    assert (tmp_path / "cubin").is_dir()
    r = invoke("cache", "clear")                                  # no answer (EOF): nothing cleared
    assert r.exit_code == 2 and "error: nothing cleared: answer y, or pass --yes" in r.output
    assert (tmp_path / "corpus").is_dir()
    r = invoke("cache", "clear", input="y\n")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "cubin").exists() and not (tmp_path / "corpus").exists()
    assert (tmp_path / "unrelated.txt").read_text() == "mine"     # only the caches' own folders go


def test_clear_only_one_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path))
    fill(tmp_path)
    r = invoke("cache", "clear", "--yes", "--only", "cubin")
    assert r.exit_code == 0 and "cleared cubin/" in r.output
    assert not (tmp_path / "cubin").exists() and (tmp_path / "corpus").is_dir()
    r = invoke("cache", "clear", "--yes", "--only", "bogus")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "f"))
    for args in (("cache",), ("cache", "clear", "--yes")):
        r = invoke(*args)
        assert r.exit_code == 2 and r.output.strip().startswith("error: ") and "is a file" in r.output
        assert len(r.output.strip().splitlines()) == 1


def test_unreadable_cache_folder_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path))
    fill(tmp_path)
    real = Path.iterdir

    def iterdir(self):      # as chmod 000 on cubin/ would, for a user other than root
        if self.name == "cubin":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    for args in (["cache"], ["cache", "clear", "--yes"]):
        r = invoke(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert f"error: cannot read {tmp_path / 'cubin'}: Permission denied" in r.output
    assert (tmp_path / "cubin").exists()
