"""Collectives over the GPUs of a run: copy engines in one process, or NCCL (one process per GPU).

A schedule's `collective` operation names whole parameter rows (every tensor padded to N equal
shards, rank r owning [r*S, (r+1)*S)) or a byte region; `buffers` turns it into (pointer, bytes)
per rank. Three kinds:
  reduce_scatter  bf16, in place: rank r's shard becomes the sum over ranks (or is added into `into`)
  all_gather      bytes, in place: every rank's shard is copied to every other rank
  all_reduce_max  fp32 region: elementwise max over ranks (FP8 weight amaxes)
Ordering: a collective starts on each rank's communication streams (one receives and reduces, one sends
to host memory, so that a PCIe link carries both directions at once) after every rank's compute stream
has reached it (it reads the others' buffers) and records a done event per rank; the compute stream
waits for all ranks' done events right away, or — for an `overlap` collective (ZeRO-2's per-layer
reduce-scatter, ZeRO-3's per-layer all-gather) — where the schedule awaits its tag (Trainer does this).

CopyEngine moves bytes with cuMemcpyAsync (no SMs): peer copies, or — where the GPUs cannot reach
each other's memory (GeForce cards) — staged through pinned host memory: the sender copies a piece
to its host buffer, the receiver copies it in (an all-gather piece leaves its GPU once for all).
Reductions run on the receiving GPU (the kernel table's `reduce_scatter` kernel over the pieces in
comm.recv, in rank order: deterministic; `all_reduce_max` for the amaxes). Nccl issues the same kinds to
NCCL on the communication stream (and adds a reduced shard into a ZeRO-2 gradient shard with the
`reduce_scatter_add` kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plan.refs import at
from . import driver
from .rank import Rank

EVENT_RING = 16       # done events are reused after this many collectives (a few are ever pending)
VEC = 32              # piece sizes are multiples of this many bytes (16 bf16, the kernels' grain)


@dataclass(frozen=True)
class Buffer:
    """One tensor (or region) of a collective on one rank: `full` holds all N parts of `part` bytes
    (rank r's at r*part); `mine` is this rank's part — inside `full`, or a separate row (the ZeRO-3
    weight shard an all-gather reads, the ZeRO-2 gradient shard a reduce-scatter adds into)."""
    full: int
    part: int
    mine: int
    separate: bool


def buffers(rank: Rank, op: dict, layer: int | None) -> list[Buffer]:
    """Every buffer of a collective on one rank."""
    N, r = rank.world, rank.rank
    if "region" in op:
        base = rank.ptr(op["region"], layer)
        part = op["bytes"] // N
        return [Buffer(base, part, base + r * part, False)]
    out = []
    into = op.get("into") or [None] * len(op["tensors"])
    for (ref, per_layer), dst in zip(op["tensors"], into):
        name = ref.split("[")[0].split("@")[0]
        part = rank.shard_bytes(name)
        for i in (range(rank.L) if per_layer else [None]):
            p = rank.ptr(ref if i is None else at(ref, i), layer)
            if dst is None:
                out.append(Buffer(p, part, p + r * part, False))
            elif op["kind"] == "all_gather":      # from this rank's shard row into a whole buffer
                out.append(Buffer(rank.ptr(dst, layer), part, p, True))
            else:                                 # reduce-scatter of a whole buffer, added into a shard row
                out.append(Buffer(p, part, rank.ptr(dst, layer), True))
    return out


class _Events:
    """Ordering between compute and communication streams; optionally the time each collective takes
    on the communication streams (from all inputs ready to the last rank done)."""

    def __init__(self, ranks: list[Rank]):
        self.ranks = ranks
        self.ring = [[_event(rk) for rk in ranks] for _ in range(EVENT_RING)]
        self.ready = [_event(rk) for rk in ranks]
        self.sent = [_event(rk) for rk in ranks]
        self.count = 0
        self.timed: list[tuple[int, list[int]]] | None = None

    def start(self) -> None:
        """Every communication stream waits until every compute stream reached the collective."""
        for rk, e in zip(self.ranks, self.ready):
            rk.dev.make_current()
            driver.event_record(e, rk.stream)
        for rk in self.ranks:
            rk.dev.make_current()
            for e in self.ready:
                driver.stream_wait(rk.comm_stream, e)
                driver.stream_wait(rk.send_stream, e)
        if self.timed is not None:          # per rank: events of different contexts cannot be compared
            starts = [_event(rk, timing=True) for rk in self.ranks]
            for rk, t0 in zip(self.ranks, starts):
                rk.dev.make_current()
                driver.event_record(t0, rk.comm_stream)
            self.timed.append((starts, []))

    def finish(self) -> list[int]:
        done = self.ring[self.count % EVENT_RING]
        self.count += 1
        for rk, e, sent in zip(self.ranks, done, self.sent):
            rk.dev.make_current()
            driver.event_record(sent, rk.send_stream)      # done = received, reduced and sent
            driver.stream_wait(rk.comm_stream, sent)
            driver.event_record(e, rk.comm_stream)
            if self.timed is not None:
                t1 = _event(rk, timing=True)
                driver.event_record(t1, rk.comm_stream)
                self.timed[-1][1].append(t1)
        return done

    def start_timing(self) -> None:
        self.timed = []

    def take_ms(self) -> float:
        """Milliseconds the collectives since the last call took (timing must be on); frees the events."""
        total = 0.0
        for starts, ends in self.timed or []:
            for e in ends:
                driver.event_synchronize(e)
            if len(ends) == len(starts):     # else a collective that failed half-way: nothing to time
                total += max(driver.event_elapsed_ms(t0, t1) for t0, t1 in zip(starts, ends))
            for e in [*starts, *ends]:
                driver.event_destroy(e)
        self.timed = [] if self.timed is not None else None
        return total

    def close(self) -> None:
        self.take_ms()
        for e in [e for evs in self.ring for e in evs] + self.ready + self.sent:
            driver.event_destroy(e)


class _Collectives:
    """What both transports share: the ranks, their ordering events, the buffers of each operation."""

    def __init__(self, ranks: list[Rank]):
        self.ranks = ranks
        self.events = _Events(ranks)
        self.moved = 0                                             # bytes over the links, for reports
        self._buffers: dict[tuple[int, int | None], list[list[Buffer]]] = {}

    def buffers(self, op: dict, layer: int | None) -> list[list[Buffer]]:
        """Per rank, the buffers of a schedule operation at a layer; resolved once (pointers are fixed,
        and the operations are the schedule's own objects for the trainer's life)."""
        key = (id(op), layer)
        if key not in self._buffers:
            self._buffers[key] = [buffers(rk, op, layer) for rk in self.ranks]
        return self._buffers[key]


class CopyEngine(_Collectives):
    """All ranks of this process, driven from one thread; peer copies or host-staged."""

    def __init__(self, ranks: list[Rank], peer: bool):
        super().__init__(ranks)
        self.N = len(ranks)
        self.peer = peer and _enable_peer_access(ranks)
        if peer and not self.peer and "comm.host" not in ranks[0].rows:
            raise ValueError("the plan counts on peer copies between the GPUs, which this machine does not allow: "
                             "plan again with --set peer_copies=false (copies through pinned host memory)")
        recv = ranks[0].rows["comm.recv"].bytes
        self.piece = recv // (2 * (self.N - 1)) // VEC * VEC       # bytes of one piece of one sender
        # host-staged pieces: sender s's pinned slots [half k][slot j]; read_done[s][k][r]: r's last copy-in
        # from s's half k; readers[s][k][j]: who last read slot j (the next write waits for them)
        self.read_done = [[[_event(rk) for rk in ranks] for _ in range(2)] for _ in ranks]
        self.d2h_done = [[_event(rk) for _ in range(2)] for rk in ranks]
        self.readers: list[list[dict[int, set[int]]]] = [[{}, {}] for _ in ranks]
        self.pieces = 0

    def run(self, op: dict, layer: int | None) -> list[int]:
        self.events.start()
        for per_rank in zip(*self.buffers(op, layer)):
            if op["kind"] == "reduce_scatter":
                self._reduce_scatter(per_rank)
            elif op["kind"] == "all_gather":
                self._all_gather(per_rank)
            elif op["kind"] == "all_reduce_max":
                self._all_reduce_max(per_rank)
            else:
                raise ValueError(f"collective {op['kind']!r} is unknown to this runtime")
        return self.events.finish()

    # --- moving one piece from rank s to rank r ------------------------------------------------------
    def _move(self, s: int, r: int, dst: int, src: int, nbytes: int, k: int) -> None:
        """Copy on r's communication stream (peer), or s -> host -> r (staged; s's host slot for r)."""
        self.moved += nbytes
        if self.peer:
            rr = self.ranks[r]
            rr.dev.make_current()
            driver.memcpy_dtod(dst, src, nbytes, rr.comm_stream)
            return
        self._through_host(s, {r: dst}, src, nbytes, k, _slot(r, s))

    def _through_host(self, s: int, dsts: dict[int, int], src: int, n: int, k: int, j: int) -> None:
        """s's piece into its pinned slot j of half k once; every rank in dsts copies it in."""
        rs = self.ranks[s]
        host = rs.host.ptr("comm.host") + (k * (self.N - 1) + j) * self.piece
        rs.dev.make_current()
        for r in self.readers[s][k].get(j, ()):        # the slot's last readers are done with it
            driver.stream_wait(rs.send_stream, self.read_done[s][k][r])
        driver.memcpy_dtoh(host, src, n, rs.send_stream)
        driver.event_record(self.d2h_done[s][k], rs.send_stream)
        for r, dst in dsts.items():
            rr = self.ranks[r]
            rr.dev.make_current()
            driver.stream_wait(rr.comm_stream, self.d2h_done[s][k])
            driver.memcpy_htod(dst, host, n, rr.comm_stream)
            driver.event_record(self.read_done[s][k][r], rr.comm_stream)
        self.readers[s][k][j] = set(dsts)

    def _next_piece(self) -> int:
        """The double-buffer half (staging and host slots) the next piece uses."""
        self.pieces += 1
        return (self.pieces - 1) % 2

    def _stage(self, r: int, srcs: list[int], n: int, k: int) -> int:
        """n bytes at srcs[s] of every other rank s into r's staging slots (half k); their base."""
        recv = self.ranks[r].mem.ptr("comm.recv") + k * (self.N - 1) * self.piece
        for s, src in enumerate(srcs):
            if s != r:
                self._move(s, r, recv + _slot(s, r) * self.piece, src, n, k)
        self.ranks[r].dev.make_current()
        return recv

    def _reduce_scatter(self, per_rank: list[Buffer]) -> None:
        part = per_rank[0].part
        for off in range(0, part, self.piece):
            n, k = min(self.piece, part - off), self._next_piece()
            for r, b in enumerate(per_rank):
                rr = self.ranks[r]
                recv = self._stage(r, [src.full + r * part + off for src in per_rank], n, k)
                kern = rr.build.kernel("reduce_scatter")
                reduce = rr.launcher(kern, rr.comm_stream)
                reduce(kern.grid, b.mine + off, b.full + r * part + off, recv,
                       self.piece // 2, n // 2, r, int(b.separate))

    def _all_gather(self, per_rank: list[Buffer]) -> None:
        part = per_rank[0].part
        step = part if self.peer else self.piece
        for r, b in enumerate(per_rank):          # a separate shard row: this rank's part, copied locally
            if b.separate:
                rr = self.ranks[r]
                rr.dev.make_current()
                driver.memcpy_dtod(b.full + r * part, b.mine, part, rr.comm_stream)
        for off in range(0, part, step):
            n, k = min(step, part - off), self._next_piece()
            for s, src in enumerate(per_rank):
                dsts = {r: dst.full + s * part + off for r, dst in enumerate(per_rank) if r != s}
                if self.peer:
                    for r, dst in dsts.items():
                        self._move(s, r, dst, src.mine + off, n, k)
                else:
                    self._broadcast(s, dsts, src.mine + off, n, k)

    def _broadcast(self, s: int, dsts: dict[int, int], src: int, n: int, k: int) -> None:
        """Host-staged all-gather piece: it leaves s's GPU once, every other rank copies it in."""
        self._through_host(s, dsts, src, n, k, 0)
        self.moved += n * len(dsts)

    def _all_reduce_max(self, per_rank: list[Buffer]) -> None:
        nbytes = per_rank[0].part * self.N
        if nbytes > self.piece:
            raise ValueError(f"all_reduce_max of {nbytes} bytes exceeds one piece ({self.piece}): it is meant "
                             f"for the FP8 weight amaxes")
        k = self._next_piece()
        for r, b in enumerate(per_rank):
            rr = self.ranks[r]
            recv = self._stage(r, [src.full for src in per_rank], nbytes, k)
            kern = rr.build.kernel("all_reduce_max")
            reduce = rr.launcher(kern, rr.comm_stream)
            reduce(kern.grid, b.full, recv, self.piece // 4, nbytes // 4)

    def close(self) -> None:
        self.events.close()
        for e in [e for per_s in self.read_done for half in per_s for e in half] + \
                [e for evs in self.d2h_done for e in evs]:
            driver.event_destroy(e)


class Nccl(_Collectives):
    """This process's rank(s) through NCCL communicators (one process per GPU across machines)."""

    def __init__(self, ranks: list[Rank], comms: list):
        super().__init__(ranks)
        self.comms = comms

    def run(self, op: dict, layer: int | None) -> list[int]:
        from . import nccl
        self.events.start()
        kind = op["kind"]
        bufs = self.buffers(op, layer)
        nccl.group_start()
        for rk, comm, rank_bufs in zip(self.ranks, self.comms, bufs):
            cs = rk.comm_stream
            for b in rank_bufs:
                if kind == "reduce_scatter":          # in place; a separate shard row is added to below
                    comm.reduce_scatter(b.full, b.full + rk.rank * b.part, b.part // 2, "bf16", "sum", cs)
                elif kind == "all_gather":
                    comm.all_gather(b.mine, b.full, b.part, "uint8", cs)
                elif kind == "all_reduce_max":
                    comm.all_reduce(b.full, b.full, b.part * rk.world // 4, "fp32", "max", cs)
                else:
                    raise ValueError(f"collective {kind!r} is unknown to this runtime")
                self.moved += b.part * rk.world
        nccl.group_end()
        if kind == "reduce_scatter" and op.get("into"):     # ZeRO-2: add the reduced shard to the gradients
            for rk, rank_bufs in zip(self.ranks, bufs):
                rk.dev.make_current()
                k = rk.build.kernel("reduce_scatter_add")
                add = rk.launcher(k, rk.comm_stream)
                for b in rank_bufs:
                    add(k.grid, b.mine, b.full + rk.rank * b.part, b.part // 2)
        return self.events.finish()

    def gather_part(self, rank: Rank, ptr: int, part: int) -> bytes:
        """All processes' `part`-byte shards at `ptr`, end to end (checkpoints, exports)."""
        rank.dev.make_current()
        tmp = driver.alloc(part * rank.world)
        try:
            comm = self.comms[self.ranks.index(rank)]
            comm.all_gather(ptr, tmp, part, "uint8", rank.stream)
            return rank.download(tmp, np.uint8, (part * rank.world,)).tobytes()
        finally:
            driver.stream_synchronize(rank.stream)
            driver.free(tmp)

    def sum_floats(self, ptrs: list[int], count: int) -> None:
        """In-place sum over all processes of `count` floats at each rank's pointer (e.g. the loss)."""
        from . import nccl
        nccl.group_start()
        for rk, comm, p in zip(self.ranks, self.comms, ptrs):
            comm.all_reduce(p, p, count, "fp32", "sum", rk.stream)
        nccl.group_end()

    def close(self) -> None:
        self.events.close()
        for c in self.comms:
            c.close()


def _event(rank: Rank, timing: bool = False) -> int:
    """An event of the rank's context (an event is recorded only on streams of its own context)."""
    rank.dev.make_current()
    return driver.event_create(timing)


def _slot(sender: int, receiver: int) -> int:
    """The staging slot of `sender`'s piece at `receiver`: the other ranks in rank order."""
    return sender - (sender > receiver)


def _enable_peer_access(ranks: list[Rank]) -> bool:
    """Peer access between every pair of distinct GPUs (ranks sharing a GPU need none); False if any
    pair cannot, so that the caller stages through host memory instead."""
    from cuda.bindings import driver as cu
    devices = {rk.dev.ordinal: rk.dev for rk in ranks}
    for a in devices.values():
        for b in devices.values():
            if a.ordinal == b.ordinal:
                continue
            if not driver.check("cuDeviceCanAccessPeer", cu.cuDeviceCanAccessPeer(a.handle, b.handle)):
                return False
    for a in devices.values():
        a.make_current()
        for b in devices.values():
            if a.ordinal != b.ordinal:
                status, = cu.cuCtxEnablePeerAccess(cu.CUcontext(b.context), 0)
                if status not in (cu.CUresult.CUDA_SUCCESS,
                                  cu.CUresult.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED):
                    raise driver.CudaError("cuCtxEnablePeerAccess", status)
    return True
