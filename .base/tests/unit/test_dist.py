"""Launcher variables -> DistEnv, and rank 0's bytes reaching every rank over a local socket."""
import socket
import threading

import pytest

from llmqgen.runtime.dist import (
    DistEnv,
    DistError,
    dist_env,
    rendezvous_port,
    share_bytes,
)

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "10.0.0.1"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h0"}
SLURM = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4",
         "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"}


def test_no_launcher_is_a_single_process():
    assert dist_env({"PATH": "/usr/bin", "SLURM_JOB_ID": "7"}) is None


def test_torchrun():
    assert dist_env(TORCHRUN) == DistEnv(rank=5, world_size=16, local_rank=1, local_world_size=8,
                                         master_addr="node0", master_port=29400, launcher="torchrun")


def test_open_mpi_and_mpich():
    e = dist_env(OPEN_MPI)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("mpirun", 3, 8, 3, 4)
    assert (e.master_addr, e.master_port) == ("10.0.0.1", 29500)
    e = dist_env(MPICH)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("mpirun", 2, 4, 0, 2)


def test_slurm_takes_the_launch_node_unless_master_addr_is_set():
    e = dist_env(SLURM)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("slurm", 6, 8, 2, 4)
    assert (e.master_addr, e.master_port) == ("10.1.2.3", 29500)
    assert dist_env({**SLURM, "MASTER_ADDR": "gpu001", "MASTER_PORT": "1234"}).master_addr == "gpu001"


@pytest.mark.parametrize("per_node, extra, expected", [
    ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, {}, 4),
    ({"SLURM_TASKS_PER_NODE": "4(x2)"}, {}, 4),
    ({"SLURM_TASKS_PER_NODE": "2(x3),4"}, {"SLURM_NODEID": "3"}, 4),  # uneven nodes: ours by SLURM_NODEID
    ({"SLURM_GPUS_ON_NODE": "8"}, {}, 8),
])
def test_slurm_tasks_per_node_forms(per_node, extra, expected):
    env = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"} | per_node | extra
    assert dist_env(env).local_world_size == expected


def test_slurm_without_any_per_node_count_says_how_to_launch():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"}
    with pytest.raises(DistError, match="--ntasks-per-node"):
        dist_env(env)


def test_precedence_torchrun_then_mpi_then_slurm():
    assert dist_env({**SLURM, **OPEN_MPI, **TORCHRUN}).launcher == "torchrun"
    assert dist_env({**SLURM, **OPEN_MPI}).rank == 3
    assert dist_env({**SLURM, **MPICH}).rank == 2
    # srun --mpi=pmi2 sets PMI_RANK without MPICH's MPI_LOCALRANKID: still SLURM
    assert dist_env({**SLURM, "PMI_RANK": "6", "PMI_SIZE": "8"}).launcher == "slurm"


def test_mpirun_without_master_addr_says_what_to_export():
    env = {k: v for k, v in OPEN_MPI.items() if k != "MASTER_ADDR"}
    with pytest.raises(DistError, match="export MASTER_ADDR=.*MASTER_PORT"):
        dist_env(env)
    # one rank needs no address
    one = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    assert dist_env(one).world_size == 1


@pytest.mark.parametrize("change, message", [
    ({"RANK": "16"}, r"RANK=16 is not in \[0, WORLD_SIZE=16\)"),
    ({"RANK": "-1"}, r"RANK=-1 is not in"),
    ({"LOCAL_RANK": "8"}, r"LOCAL_RANK=8 is not in \[0, LOCAL_WORLD_SIZE=8\)"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ({"MASTER_PORT": "x"}, r"MASTER_PORT='x' is not an integer"),
])
def test_bad_values_name_the_variable(change, message):
    with pytest.raises(DistError, match=message):
        dist_env({**TORCHRUN, **change})


def test_missing_local_variable_is_named():
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    with pytest.raises(DistError, match="LOCAL_WORLD_SIZE"):
        dist_env(env)
    with pytest.raises(DistError, match=r"SLURM_LOCALID=4 is not in \[0, SLURM_NTASKS_PER_NODE=4\)"):
        dist_env({**SLURM, "SLURM_LOCALID": "4"})


def test_rendezvous_port_is_next_to_master_port_unless_set():
    e = dist_env(TORCHRUN)
    assert rendezvous_port(e, {}) == 29401
    assert rendezvous_port(e, {"LLMQGEN_RENDEZVOUS_PORT": "40000"}) == 40000
    with pytest.raises(DistError, match="LLMQGEN_RENDEZVOUS_PORT"):
        rendezvous_port(e, {"LLMQGEN_RENDEZVOUS_PORT": "70000"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                   master_addr="127.0.0.1", master_port=1, launcher="torchrun")


def test_share_bytes_reaches_every_rank_and_makes_once():
    environ = {"LLMQGEN_RENDEZVOUS_PORT": str(free_port())}
    calls, results, errors = [], {}, []

    def make():
        calls.append(1)
        return bytes(range(256)) * 3

    def rank_main(rank):
        try:
            results[rank] = share_bytes(local_env(rank, 3), make, timeout_s=20, environ=environ)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    # Non-zero ranks start first: they must retry until rank 0 listens.
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert calls == [1]
    assert results == {r: bytes(range(256)) * 3 for r in range(3)}


def test_share_bytes_with_one_rank_opens_no_socket(monkeypatch):
    def no_socket(*a, **k):
        raise AssertionError("opened a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert share_bytes(local_env(0, 1), lambda: b"uid") == b"uid"


def test_unreachable_rank0_names_address_and_what_to_check():
    environ = {"LLMQGEN_RENDEZVOUS_PORT": str(free_port())}  # nobody listens there
    with pytest.raises(DistError, match=r"127\.0\.0\.1:\d+.*MASTER_ADDR.*firewall"):
        share_bytes(local_env(1, 2), lambda: b"", timeout_s=0.5, environ=environ)


def test_rank0_names_the_ranks_that_never_came():
    environ = {"LLMQGEN_RENDEZVOUS_PORT": str(free_port())}
    with pytest.raises(DistError, match=r"rank\(s\) 1, 2 never connected"):
        share_bytes(local_env(0, 3), lambda: b"x", timeout_s=0.3, environ=environ)


def test_rank0_port_in_use_says_to_pick_another():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        environ = {"LLMQGEN_RENDEZVOUS_PORT": str(busy.getsockname()[1])}
        with pytest.raises(DistError, match="LLMQGEN_RENDEZVOUS_PORT"):
            share_bytes(local_env(0, 2), lambda: b"x", timeout_s=0.3, environ=environ)
