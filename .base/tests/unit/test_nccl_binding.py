"""The NCCL ctypes binding without a GPU: library search, enum tables, calls that need no device."""
import pytest

from llmqgen.runtime import nccl


@pytest.fixture
def lib():
    try:
        return nccl.load_library()
    except nccl.NcclUnavailable as e:
        pytest.skip(f"libnccl.so.2 cannot be loaded here: {e}")


@pytest.fixture
def fresh_load(monkeypatch):
    """load_library() searches again, and is searched again after the test (its result is cached)."""
    nccl.load_library.cache_clear()
    yield
    nccl.load_library.cache_clear()


def test_version_and_unique_ids(lib):
    assert nccl.version() > 0
    a, b = nccl.unique_id(), nccl.unique_id()
    assert len(a) == len(b) == nccl.UNIQUE_ID_BYTES == 128
    assert a != b


def test_errors_carry_the_result_name_and_nccl_text(lib):
    with pytest.raises(nccl.NcclError, match=r"ncclFoo failed: ncclInvalidArgument \(invalid argument") as e:
        nccl._check("ncclFoo", 4)
    assert (e.value.call, e.value.code) == ("ncclFoo", 4)
    with pytest.raises(nccl.NcclError, match="NCCL_DEBUG=WARN"):
        nccl._check("ncclFoo", 5)


def test_enum_values_match_nccl_h():
    # ncclUint8=1, ncclInt32=2, ncclFloat32=7, ncclBfloat16=9; ncclSum=0 ... ncclAvg=4
    assert nccl.DTYPES == {"uint8": 1, "int32": 2, "fp32": 7, "bf16": 9}
    assert nccl.OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


def test_unknown_dtype_or_op_lists_the_known_ones():
    with pytest.raises(ValueError, match="'fp8' is not one of uint8, int32, fp32, bf16"):
        nccl._lookup(nccl.DTYPES, "fp8", "dtype")
    with pytest.raises(ValueError, match="'mean' is not one of sum"):
        nccl._lookup(nccl.OPS, "mean", "op")


def test_comm_checks_its_arguments_before_nccl():
    with pytest.raises(ValueError, match="128 bytes, got 3"):
        nccl.Comm(b"abc", world=1, rank=0)
    with pytest.raises(ValueError, match=r"rank 1 is not in \[0, world 1\)"):
        nccl.Comm(bytes(128), world=1, rank=1)


def test_a_bad_explicit_path_is_not_silently_replaced(monkeypatch, fresh_load):
    monkeypatch.setenv("LLMQGEN_NCCL_LIBRARY", "/nonexistent/libnccl.so.2")
    monkeypatch.setattr(nccl, "_search", lambda: pytest.fail("searched despite LLMQGEN_NCCL_LIBRARY"))
    with pytest.raises(nccl.NcclUnavailable, match=r"LLMQGEN_NCCL_LIBRARY=/nonexistent/libnccl.so.2 cannot be "
                                                   r"loaded: pip install nvidia-nccl-cu13"):
        nccl.load_library()


def test_nothing_found_says_what_to_install(monkeypatch, fresh_load):
    monkeypatch.delenv("LLMQGEN_NCCL_LIBRARY", raising=False)
    monkeypatch.setattr(nccl, "_search", lambda: ["/nonexistent/libnccl.so.2"])
    with pytest.raises(nccl.NcclUnavailable) as e:
        nccl.load_library()
    message = str(e.value)
    assert "pip install nvidia-nccl-cu13" in message and "nvidia-nccl-cu12" in message
    assert "LLMQGEN_NCCL_LIBRARY" in message and "/nonexistent/libnccl.so.2" in message


def test_search_puts_the_wheel_first_without_duplicates(monkeypatch, tmp_path):
    wheel_lib = tmp_path / "libnccl.so.2"
    monkeypatch.setattr(nccl, "_wheel_libraries", lambda: [wheel_lib])
    monkeypatch.setattr(nccl.ctypes.util, "find_library", lambda name: "libnccl.so.2")
    assert nccl._search() == [str(wheel_lib), "libnccl.so.2"]
