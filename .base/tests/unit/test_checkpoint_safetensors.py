"""Own safetensors reader/writer: dtypes, alignment, memory mapping, sharding, damaged files."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from llmqgen.checkpoint.safetensors import (INDEX, SINGLE, SafetensorsError, read_dir,
                                            read_header, read_safetensors, write_safetensors,
                                            write_sharded)


def sample():
    rng = np.random.default_rng(0)
    return {
        "w.bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "w.f32": rng.standard_normal((7,)).astype(np.float32),
        "w.f16": rng.standard_normal((2, 2, 3)).astype(np.float16),
        "w.e4m3": rng.standard_normal((9, 1)).astype(ml_dtypes.float8_e4m3fn),
        "i.i32": np.arange(5, dtype=np.int32),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_round_trip(tmp_path):
    t = sample()
    p = write_safetensors(tmp_path / "a.safetensors", t, metadata={"format": "pt"})
    header, meta, start = read_header(p)
    assert meta == {"format": "pt"} and start % 8 == 0
    assert header["w.bf16"]["dtype"] == "BF16" and header["w.e4m3"]["dtype"] == "F8_E4M3"
    got = read_safetensors(p)
    assert list(got) == list(t)
    for k in t:
        assert got[k].dtype == t[k].dtype and got[k].shape == t[k].shape
        assert got[k].tobytes() == t[k].tobytes()
    assert isinstance(got["w.f32"].base, np.memmap) or isinstance(got["w.f32"], np.memmap)
    assert read_safetensors(p, ["w.f16"], mmap=False).keys() == {"w.f16"}


def test_layout_is_the_spec(tmp_path):
    """Byte-level check of the format: u64 length, JSON, offsets relative to the data start."""
    p = write_safetensors(tmp_path / "b.safetensors", {"x": np.array([1.0, 2.0], np.float32)})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    assert h == {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert raw[8 + n:] == np.array([1.0, 2.0], "<f4").tobytes()


def test_big_endian_input_is_stored_little(tmp_path):
    p = write_safetensors(tmp_path / "c.safetensors", {"x": np.arange(3, dtype=">f4")})
    np.testing.assert_array_equal(read_safetensors(p)["x"], [0, 1, 2])


def test_sharded_index(tmp_path):
    t = {f"t{i}": np.full((100,), i, np.float32) for i in range(10)}
    files = write_sharded(tmp_path, t, shard_bytes=1000)
    assert (tmp_path / INDEX).is_file() and not (tmp_path / SINGLE).exists()
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 4000 and len(files) == 6
    assert index["weight_map"]["t9"] == "model-00005-of-00005.safetensors"
    got = read_dir(tmp_path)
    for k in t:
        np.testing.assert_array_equal(got[k], t[k])
    write_sharded(tmp_path / "one", t)
    assert (tmp_path / "one" / SINGLE).is_file() and read_dir(tmp_path / "one").keys() == t.keys()
    (tmp_path / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(SafetensorsError, match="missing"):
        read_dir(tmp_path)


def test_damaged_files(tmp_path):
    p = write_safetensors(tmp_path / "d.safetensors", sample())
    raw = p.read_bytes()
    p.write_bytes(raw[:-4])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_safetensors(p)
    p.write_bytes(struct.pack("<Q", 10 ** 12) + raw[8:])
    with pytest.raises(SafetensorsError, match="header length"):
        read_safetensors(p)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SafetensorsError, match="no model.safetensors"):
        read_dir(tmp_path / "nothing")
    with pytest.raises(SafetensorsError, match="has no safetensors name"):
        write_safetensors(tmp_path / "e.safetensors", {"c": np.zeros(2, np.complex64)})


def test_cross_check_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = {k: v for k, v in sample().items() if v.dtype in (np.float32, np.float16, np.int32)}
    write_safetensors(tmp_path / "mine.safetensors", t)
    theirs = st.load_file(str(tmp_path / "mine.safetensors"))
    for k in t:
        np.testing.assert_array_equal(theirs[k], t[k])
    st.save_file(t, str(tmp_path / "theirs.safetensors"))
    mine = read_safetensors(tmp_path / "theirs.safetensors")
    for k in t:
        np.testing.assert_array_equal(mine[k], t[k])


def test_hf_files_are_written_by_the_safetensors_package(tmp_path, monkeypatch):
    """write_sharded goes through safetensors.numpy.save_file: every dtype (bf16, fp8 too) reads back
    bit-exactly with our zero-copy reader, big-endian input is stored little, metadata is kept."""
    import safetensors.numpy as st
    calls = []
    real = st.save_file
    monkeypatch.setattr(st, "save_file", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    t = {**sample(), "be": np.arange(5, dtype=">f4")}
    write_sharded(tmp_path, t, metadata={"format": "pt"}, fsync=True)
    assert calls == [str(tmp_path / SINGLE)]
    header, meta, start = read_header(tmp_path / SINGLE)
    assert meta == {"format": "pt"} and start % 8 == 0
    got = read_dir(tmp_path)
    assert got.keys() == t.keys()
    for k, v in t.items():
        assert got[k].dtype == v.dtype.newbyteorder("<") and got[k].tobytes() == v.astype(got[k].dtype).tobytes()
    with pytest.raises(SafetensorsError, match="has no safetensors name"):
        write_sharded(tmp_path / "bad", {"c": np.zeros(2, np.complex64)})
