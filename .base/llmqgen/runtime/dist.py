"""Where this process sits in a multi-GPU job (one process per GPU), and one value shared by all.

The launcher (torchrun, mpirun or SLURM's srun) tells each process its rank in its own environment
variables; `dist_env` reads whichever set is there into one DistEnv. `share_bytes` then hands a value
made once by rank 0 (NCCL's unique id) to every other rank over a plain TCP socket: NCCL needs that
id before it can talk at all, so it cannot carry it itself.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500  # torchrun's default, so that one MASTER_PORT serves both
_CONNECT_RETRY_S = 0.2


class DistError(RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str                  # "torchrun" | "mpirun" | "slurm"


@dataclass(frozen=True)
class _Vars:
    launcher: str
    detect: tuple[str, ...]        # all present: this launcher started us
    rank: str
    world: str
    local_rank: str
    local_world: str


# Checked in this order. torchrun inside a SLURM job sets RANK next to SLURM_PROCID: torchrun wins.
# Open MPI's mpirun inside a SLURM job starts its daemons with srun, so its ranks inherit SLURM_PROCID
# (the daemon's node index): MPI wins over SLURM. MPICH's mpiexec sets PMI_RANK and MPI_LOCALRANKID;
# srun --mpi=pmi2 sets PMI_RANK alone, so that case falls through to SLURM.
_LAUNCHERS = (
    _Vars("torchrun", ("RANK", "WORLD_SIZE"), "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    _Vars("mpirun", ("OMPI_COMM_WORLD_RANK",), "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
          "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    _Vars("mpirun", ("PMI_RANK", "MPI_LOCALRANKID"), "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    _Vars("slurm", ("SLURM_PROCID",), "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)
_SLURM_PER_NODE = ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_GPUS_ON_NODE")


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    if name not in environ:
        raise DistError(f"{launcher} set some of its variables but not {name}: set {name} or launch again")
    try:
        return int(environ[name])
    except ValueError:
        raise DistError(f"{name}={environ[name]!r} is not an integer") from None


def _slurm_local_world(environ: Mapping[str, str]) -> tuple[int, str]:
    """Tasks on this node, and the variable that said so. SLURM writes per-node counts compressed:
    "4(x2),3" is 4, 4, 3 for nodes 0, 1, 2; SLURM_NODEID picks ours when they differ."""
    name = next((n for n in _SLURM_PER_NODE if environ.get(n)), None)
    if name is None:
        raise DistError(f"srun set SLURM_PROCID but none of {', '.join(_SLURM_PER_NODE)}: "
                        f"launch with srun --ntasks-per-node=<GPUs per node>")
    counts: list[int] = []
    try:
        for part in environ[name].split(","):
            n, _, times = part.partition("(x")
            counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    except ValueError:
        raise DistError(f"{name}={environ[name]!r} is not a task count like '4' or '4(x2),3'") from None
    if len(set(counts)) == 1:
        return counts[0], name
    node = _int(environ, "SLURM_NODEID", "srun")
    if not 0 <= node < len(counts):
        raise DistError(f"SLURM_NODEID={node} has no entry in {name}={environ[name]!r}")
    return counts[node], name


def dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv | None:
    """This process's place in the job, or None when no launcher variables are set (a single process)."""
    v = next((v for v in _LAUNCHERS if all(n in environ for n in v.detect)), None)
    if v is None:
        return None
    rank, world = _int(environ, v.rank, v.launcher), _int(environ, v.world, v.launcher)
    local_rank = _int(environ, v.local_rank, v.launcher)
    if v.launcher == "slurm":
        local_world, local_world_name = _slurm_local_world(environ)
    else:
        local_world, local_world_name = _int(environ, v.local_world, v.launcher), v.local_world
    if world < 1 or not 0 <= rank < world:
        raise DistError(f"{v.rank}={rank} is not in [0, {v.world}={world})")
    if not 0 <= local_rank < local_world:
        raise DistError(f"{v.local_rank}={local_rank} is not in [0, {local_world_name}={local_world})")

    addr = environ.get("MASTER_ADDR") or (environ.get("SLURM_LAUNCH_NODE_IPADDR") if v.launcher == "slurm" else None)
    if not addr and world == 1:
        addr = "127.0.0.1"  # nothing to reach: share_bytes opens no socket for one rank
    if not addr:
        raise DistError(f"{v.launcher} does not say where rank 0 runs: export MASTER_ADDR=<rank 0's host> and "
                        f"MASTER_PORT=<a free TCP port, default {DEFAULT_MASTER_PORT}> to every rank "
                        f"(Open MPI: mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...)")
    port = _int(environ, "MASTER_PORT", v.launcher) if environ.get("MASTER_PORT") else DEFAULT_MASTER_PORT
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=addr, master_port=port, launcher=v.launcher)


def is_rank_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process prints and writes logs: no launcher (a single process) or rank 0 of one.
    Launcher variables that do not parse count as rank 0 here (the run itself reports them)."""
    try:
        env = dist_env(environ)
    except DistError:
        return True
    return env is None or env.rank == 0


def rendezvous_port(env: DistEnv, environ: Mapping[str, str] = os.environ) -> int:
    """The TCP port rank 0 listens on for share_bytes."""
    if environ.get("LLMQGEN_RENDEZVOUS_PORT"):
        port = _int(environ, "LLMQGEN_RENDEZVOUS_PORT", "llmqgen")
    else:
        # Not MASTER_PORT itself: under torchrun the elastic agent already listens there (its TCPStore).
        port = env.master_port + 1
    if not 0 < port < 65536:
        raise DistError(f"rendezvous port {port} is not a TCP port: set LLMQGEN_RENDEZVOUS_PORT to one in 1..65535")
    return port


def share_bytes(env: DistEnv, make: Callable[[], bytes], *, timeout_s: float = 300.0,
                environ: Mapping[str, str] = os.environ) -> bytes:
    """make() run once on rank 0; every rank returns its bytes. Blocks until all ranks have them
    (rank 0) or until they arrived (others), at most timeout_s."""
    if env.world_size == 1:
        return make()
    port = rendezvous_port(env, environ)
    if env.rank == 0:
        value = make()
        _serve(value, env, port, timeout_s)
        return value
    return _fetch(env, port, timeout_s)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _serve(value: bytes, env: DistEnv, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    # Every interface, not MASTER_ADDR: a host name can resolve to 127.0.1.1 on its own host
    # (Debian's /etc/hosts), which other nodes cannot reach.
    try:
        server = socket.create_server(("", port), backlog=env.world_size)
    except OSError as e:
        raise DistError(f"rank 0 cannot listen on TCP port {port} ({e}): another job may hold it; set "
                        f"LLMQGEN_RENDEZVOUS_PORT (or MASTER_PORT) to a free port on every rank") from e
    waiting = set(range(1, env.world_size))
    with server:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(map(str, sorted(waiting)))
                raise DistError(
                    f"rank 0 waited {timeout_s:g}s on port {port} but rank(s) {missing} never connected: check that "
                    f"they started (under SLURM: through srun), that MASTER_ADDR={env.master_addr} reaches this "
                    f"host from their nodes, and that no firewall blocks TCP port {port}")
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(max(1.0, left))
                    (rank,) = struct.unpack("!I", _recv_exact(conn, 4))
                    conn.sendall(struct.pack("!Q", len(value)) + value)
                except OSError:
                    continue  # that rank retries; anything else that connected is ignored
                waiting.discard(rank)


def _fetch(env: DistEnv, port: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((env.master_addr, port), timeout=max(0.1, min(left, 10.0))) as conn:
                conn.settimeout(max(1.0, left))
                conn.sendall(struct.pack("!I", env.rank))
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                return _recv_exact(conn, n)
        except OSError as e:  # refused until rank 0 listens; a fresh node's DNS may lag too
            if time.monotonic() + _CONNECT_RETRY_S >= deadline:
                raise DistError(
                    f"rank {env.rank} got nothing from rank 0 at {env.master_addr}:{port} within {timeout_s:g}s "
                    f"(last error: {e}): check that rank 0 started, that MASTER_ADDR is rank 0's host as seen "
                    f"from this node, and that no firewall blocks TCP port {port} "
                    f"(LLMQGEN_RENDEZVOUS_PORT picks another)") from e
            time.sleep(_CONNECT_RETRY_S)
