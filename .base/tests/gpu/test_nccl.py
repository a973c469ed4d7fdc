"""The NCCL binding on one GPU (one process, world 1): each collective moves the right bytes.

With one rank every reduction is the identity and a gather is a copy, so the values show that the
binding passes pointers, counts, dtypes, ops, the communicator and the stream in the right places.
Several ranks need several processes (see runtime/dist.py); this file checks the binding only.
"""
import ml_dtypes
import numpy as np
import pytest

from llmqgen.runtime import driver, nccl

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def comm():
    try:
        nccl.load_library()
    except nccl.NcclUnavailable as e:
        pytest.skip(str(e))
    driver.open_device(0)  # NCCL binds the communicator to the device current now
    c = nccl.Comm(nccl.unique_id(), world=1, rank=0)
    yield c
    c.close()


@pytest.fixture
def stream(comm):
    s = driver.stream_create()
    yield s
    driver.stream_destroy(s)


@pytest.fixture
def gpu_mem(comm):
    """alloc(nbytes) -> device pointer, all freed after the test."""
    ptrs = []

    def alloc(nbytes):
        ptrs.append(driver.alloc(nbytes))
        return ptrs[-1]

    yield alloc
    for p in ptrs:
        driver.free(p)


def upload(ptr: int, a: np.ndarray, stream: int) -> None:
    driver.memcpy_htod(ptr, a.ctypes.data, a.nbytes, stream)
    driver.stream_synchronize(stream)  # `a` is pageable memory: done with it before returning


def download(ptr: int, like: np.ndarray, stream: int) -> np.ndarray:
    out = np.empty_like(like)
    driver.memcpy_dtoh(out.ctypes.data, ptr, out.nbytes, stream)
    driver.stream_synchronize(stream)
    return out


def test_version_is_a_release(comm):
    assert nccl.version() >= 21800  # 2.18.0; NCCL_VERSION_CODE is major*10000 + minor*100 + patch


def test_all_reduce_fp32_sum(comm, stream, gpu_mem):
    x = np.linspace(-3.0, 5.0, 4099, dtype=np.float32)
    send, recv = gpu_mem(x.nbytes), gpu_mem(x.nbytes)
    upload(send, x, stream)
    driver.memset_d8(recv, 0xFF, x.nbytes, stream)  # NaN until written
    comm.all_reduce(send, recv, x.size, "fp32", "sum", stream)
    np.testing.assert_array_equal(download(recv, x, stream), x)
    comm.all_reduce(send, send, x.size, "fp32", "max", stream)  # in place
    np.testing.assert_array_equal(download(send, x, stream), x)


def test_all_gather_uint8(comm, stream, gpu_mem):
    x = (np.arange(1003) % 256).astype(np.uint8)
    send, recv = gpu_mem(x.nbytes), gpu_mem(x.nbytes * comm.world)
    upload(send, x, stream)
    driver.memset_d8(recv, 0xAA, x.nbytes * comm.world, stream)
    comm.all_gather(send, recv, x.size, "uint8", stream)
    np.testing.assert_array_equal(download(recv, x, stream), x)


def test_reduce_scatter_bf16_in_place_inside_a_group(comm, stream, gpu_mem):
    recv_count = 2048
    x = (np.arange(recv_count * comm.world) % 256 - 128).astype(np.float32) / 4  # exact in bf16
    x = x.astype(ml_dtypes.bfloat16)
    buf = gpu_mem(x.nbytes)
    upload(buf, x, stream)
    elem = x.itemsize
    recv = buf + comm.rank * recv_count * elem  # NCCL's in-place form: our slot of the send buffer
    nccl.group_start()
    comm.reduce_scatter(buf, recv, recv_count, "bf16", "sum", stream)
    nccl.group_end()
    got = download(recv, x[:recv_count], stream)
    np.testing.assert_array_equal(got.view(np.uint16), x[comm.rank * recv_count:][:recv_count].view(np.uint16))


def test_close_is_idempotent_and_a_closed_comm_refuses_work(stream):
    c = nccl.Comm(nccl.unique_id(), world=1, rank=0)
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed NCCL communicator"):
        c.all_reduce(0, 0, 0, "fp32", "sum", stream)
