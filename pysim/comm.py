"""The comm layer of a node: real packets between processes, charged to a virtual clock.

Each collective (1) moves the real packets between the node processes with
point-to-point gloo messages along the schedule of :mod:`pysim.schedule`
(both directions of a ring hop at once: the receive and the send are posted
together), (2) shares an uncharged metadata row per node (its clock, compute
since its last segment and packet length: simulator bookkeeping, whose
real-network counterpart is the packet header) riding ahead of the
all-reduce's own messages, or for all-gathers, whose packet sizes the
receivers must learn first, in a small separate all-gather, and (3) records
the segment and advances this node's :class:`pysim.clock.Clock`, the same
clock :func:`pysim.clock.replay` runs.

Non-blocking collectives. ``allreduce_mean_async(x, codec, stream)`` returns a
:class:`Pending`; ``Pending.wait()`` returns the mean. The real packets move
at once (in real time the call blocks until they have); only the simulated
clock overlaps: the trace records ``Start`` when the call is made and ``Wait``
when ``wait()`` is called, and compute measured in between (the node's
compute meter) runs while the collective is in flight. Collectives on one
stream run one after the other in call order; collectives on different
streams share the links (see :mod:`pysim.clock`). Every node must issue the
same collectives and waits in the same order. ``allreduce_mean`` is the
blocking form (start and wait at once, on stream 0). A DDP-style bucketed
reduce::

    pending = []
    for bucket in buckets_in_backward_order:
        with comm.meter.measure():
            grads = backward_until(bucket)          # compute that overlaps earlier buckets
        pending.append(comm.allreduce_mean_async(grads))
    means = [p.wait() for p in pending]

and a streaming sync with delay tau: start at step k, ``wait()`` at step k+tau.

Grouped all-reduce. ``allreduce_mean(x, groups=[[0, 2], [1, 3]])`` gives each
node the mean over its own group (FedAvg's islands): every group runs its own
ring (or star, root = its first member) at once, along the grouped schedule of
:mod:`pysim.schedule`, and the trace records one collective with its groups.
The metadata rows then travel in the small separate all-gather (a ring within
a group would not carry the other groups' clocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pysim.clock import Clock, ComputeScaling
from pysim.compress import Codec, DenseCodec, split_packets
from pysim.compute import ComputeMeter
from pysim.network import Network
from pysim.pieces import PIECE_BYTES, BufferPool, DenseLayout, add_encode_piece, decode_piece, encode_piece
from pysim.schedule import Groups, check_groups, group_of, phases, ring_hop
from pysim.trace import Collective, Event, Start, Wait

T = TypeVar("T")


class Pending(Generic[T]):
    """The result of a non-blocking collective. ``wait()`` charges the wait to the simulated
    clock (the first time only) and returns the result; work that needs the result (such as
    decoding all-gathered packets) runs inside ``wait()`` and is metered after the wait."""

    def __init__(self, comm: Comm, handle: int, result: T | None = None,
                 finish: Callable[[], T] | None = None) -> None:
        self._comm, self._handle, self._result, self._finish = comm, handle, result, finish
        self._waited = False

    @property
    def waited(self) -> bool:
        return self._waited

    def wait(self) -> T:
        if not self._waited:
            self._comm._wait(self._handle)
            self._waited = True
            if self._finish is not None:
                self._result, self._finish = self._finish(), None
        return self._result  # type: ignore[return-value]


class Comm:
    """Collectives for one node of a ``world``-node run on ``network``.

    ``algorithm`` is the all-reduce algorithm: "ring" (default) or "star"
    (parameter server at node 0). All-gathers use a ring. ``scaling``: compute
    speed factors and jitter the clock applies (:class:`pysim.clock.ComputeScaling`;
    give :func:`pysim.clock.replay` the same one).
    """

    def __init__(self, rank: int, world: int, network: Network, meter: ComputeMeter | None = None,
                 algorithm: str = "ring", scaling: ComputeScaling | None = None) -> None:
        if algorithm not in ("ring", "star"):
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; use 'ring' or 'star'")
        self.rank, self.world = rank, world
        self.network = network.with_nodes(world)
        self.meter = meter or ComputeMeter()
        self.algorithm = algorithm
        self.clock = Clock(self.network, world, scaling)
        self.bytes_sent = 0              # real packet bytes this node sent
        self.bytes_received = 0
        self.compute_total_s = 0.0       # measured compute (before scaling)
        # this node's view of the trace: per segment (compute_s, flops, event)
        self.segments: list[tuple[float, float, Event]] = []
        self.step_ends: list[int] = []
        self._next_handle = 0
        self._dense = DenseCodec()
        self.piece_bytes = PIECE_BYTES   # dense ring packets travel in pieces of this many payload bytes
        self._pool = BufferPool()        # their buffers, reused from one collective to the next

    # ------------------------------------------------------------ clock

    @property
    def clock_s(self) -> float:
        """This node's virtual time (s)."""
        return float(self.clock.t[self.rank])

    @property
    def comm_s(self) -> float:
        """Virtual time this node spent waiting in collectives and Waits beyond its own compute (s)."""
        return float(self.clock.waited_s[self.rank])

    def _record_local(self, event: Event) -> None:
        """A segment whose event needs no other node's clock (a step end or a Wait)."""
        comp, flops = self.meter.take()
        row = np.zeros(self.world)
        row[self.rank] = comp
        self.clock.advance(row, event)
        self.compute_total_s += comp
        self.segments.append((comp, flops, event))

    def end_step(self) -> float:
        """Closes a training step: the compute since the last segment is added to this
        node's clock. Returns the node's virtual time (s)."""
        self._record_local(None)
        self.step_ends.append(len(self.segments) - 1)
        return self.clock_s

    def _wait(self, handle: int) -> None:
        self._record_local(Wait(handle))

    def _my_row(self, my_bytes: int) -> np.ndarray:
        """This node's metadata row (clock, compute s, flops, bytes) in a (nodes x 4)
        float64 table whose unknown rows are NaN. NumPy: these are tiny arrays on the
        hot path, where torch's per-op dispatch would cost more than the data."""
        comp, flops = self.meter.take()
        table = np.full((self.world, 4), np.nan)
        table[self.rank] = (self.clock_s, comp, flops, my_bytes)
        return table

    def _charge(self, op: str, algo: str, sizes: list[int], table: np.ndarray, stream: int | None = None,
                groups: Groups | None = None) -> int:
        """Records a collective, given every node's metadata row: blocking (``stream`` None)
        or started on ``stream``, within ``groups`` if given. Returns its handle."""
        comp, flops = float(table[self.rank, 1]), float(table[self.rank, 2])
        coll = Collective(op, algo, tuple(sizes), groups)
        handle = self._next_handle
        self._next_handle += 1
        event: Event = coll if stream is None else Start(handle, coll, stream)
        self.clock.t = table[:, 0].copy()   # every node's clock before its compute
        self.clock.advance(table[:, 1].copy(), event)
        self.compute_total_s += comp
        self.segments.append((comp, flops, event))
        return handle

    def _begin(self, op: str, algo: str, my_bytes: int, stream: int | None = None,
               groups: Groups | None = None) -> tuple[list[int], int]:
        """Exchanges metadata in a separate small collective (for packets whose sizes the
        receivers cannot know in advance, and for grouped collectives) and charges the
        clock; returns the member sizes and the collective's handle."""
        table = self._my_row(my_bytes)
        if self.world > 1:
            rows = [torch.empty(4, dtype=torch.float64) for _ in range(self.world)]
            dist.all_gather(rows, torch.from_numpy(table[self.rank].copy()))
            table = torch.stack(rows).numpy()
        sizes = [int(v) for v in table[:, 3]]
        return sizes, self._charge(op, algo, sizes, table, stream, groups)

    # ------------------------------------------------------------ transport

    def _exchange(self, send: torch.Tensor | None, dst: int, recv_bytes: int | None, src: int,
                  table: np.ndarray | None = None) -> torch.Tensor | None:
        """Sends ``send`` to dst while receiving ``recv_bytes`` from src (either may be None):
        the receive and the send are posted together, so both directions move at once.
        With ``table``, the metadata table rides along, uncharged, ahead of the packet and
        the rows the sender knew are merged into ``table`` in place."""
        reqs = []
        buf = theirs = None
        if recv_bytes is not None:
            if table is not None:  # a message of its own ahead of the packet: the packet is not copied
                theirs = np.empty_like(table)
                reqs.append(dist.irecv(torch.from_numpy(theirs.reshape(-1)), src))
            buf = torch.empty(recv_bytes, dtype=torch.uint8)
            reqs.append(dist.irecv(buf, src))
        if send is not None:
            if table is not None:
                reqs.append(dist.isend(torch.from_numpy(table.reshape(-1)), dst))
            reqs.append(dist.isend(send, dst))
            self.bytes_sent += send.numel()
        for req in reqs:
            req.wait()
        if buf is None:
            return None
        self.bytes_received += recv_bytes
        if theirs is not None:
            unknown = np.isnan(table[:, 0])
            table[unknown] = theirs[unknown]
        return buf

    # ------------------------------------------------------------ collectives

    def allreduce_mean(self, x: torch.Tensor, codec: Codec | None = None,
                       groups: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Mean of ``x`` over all nodes, blocking (stream 0). Values travel as packets of a
        summable ``codec`` (dense fp32 default; fp16/bf16/int8/int4 quantise every hop, as on a
        real wire). With ``groups`` (disjoint lists of ranks holding every node once, the
        same on every node), the mean over this node's group only: see the module docstring."""
        return self._allreduce(x, codec, None, groups)[0]

    def allreduce_mean_async(self, x: torch.Tensor, codec: Codec | None = None, stream: int = 0,
                             groups: Sequence[Sequence[int]] | None = None) -> Pending[torch.Tensor]:
        """Starts the mean of ``x`` over all nodes (or over this node's group of ``groups``)
        on ``stream`` (an int >= 0) and returns a :class:`Pending`; its ``wait()`` gives the
        mean. See the module docstring."""
        _check_stream(stream)
        result, handle = self._allreduce(x, codec, stream, groups)
        return Pending(self, handle, result)

    def _allreduce(self, x: torch.Tensor, codec: Codec | None, stream: int | None,
                   groups: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, int]:
        codec = codec or self._dense
        if not codec.summable:
            raise ValueError(f"allreduce_mean takes a summable codec (dense, int8, int4); "
                             f"use allgather_mean for {codec.name}")
        norm = check_groups(groups, self.world)
        members = group_of(norm, self.rank, self.world)
        flat = x.detach().reshape(-1).float()
        if self.algorithm == "ring" and isinstance(codec, DenseCodec):  # x is only read: no copy
            out, handle = self._ring_allreduce_in_pieces(flat.contiguous(), codec, stream, norm, members)
        elif self.algorithm == "star":
            out, handle = self._star_allreduce(flat.clone(), codec, stream, norm, members)
        else:
            out, handle = self._ring_allreduce(flat.clone(), codec, stream, norm, members)
        return out.reshape(x.shape).to(x.dtype), handle

    def _ring_allreduce(self, flat: torch.Tensor, codec: Codec, stream: int | None, groups: Groups | None,
                        members: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """Ring all-reduce among ``members`` (this node's group; every group at once)."""
        n, r = self.world, self.rank
        k, j = len(members), members.index(r)   # ring size, this node's place in it
        bounds = [flat.numel() * c // k for c in range(k + 1)]
        chunks = [flat[bounds[c]:bounds[c + 1]] for c in range(k)]
        local = {m: c for c, m in enumerate(members)}   # member -> its chunk
        handle: int | None = None
        table: np.ndarray | None = None
        if groups is None:  # the metadata rows ride the reduce-scatter
            sizes = [codec.nbytes((bounds[c + 1] - bounds[c],)) for c in range(n)]
            table = self._my_row(sizes[r])
        else:
            sizes, handle = self._begin("allreduce", "ring", codec.nbytes((bounds[j + 1] - bounds[j],)), stream,
                                        groups)
        if k == 1:
            if handle is None:
                handle = self._charge("allreduce", "ring", sizes, table, stream)
            return flat, handle
        schedule = phases("allreduce", "ring", tuple(sizes), groups)
        with self.meter.measure():
            packet = codec.pack(chunks[j])
        # reduce-scatter; ungrouped, the metadata rows travel with it: after n-1 hops every node has all
        for phase in schedule[:k - 1]:
            out, into = ring_hop(phase, r)
            got = self._exchange(packet, out.dst, into.nbytes, into.src, table)
            with self.meter.measure():
                chunks[local[into.item]] += codec.unpack(got)
                packet = codec.pack(chunks[local[into.item]])
        if handle is None:
            handle = self._charge("allreduce", "ring", sizes, table, stream)
        # this node now owns the full sum of chunk j+1; everyone keeps the wire version of it
        if codec.lossy:
            chunks[(j + 1) % k].copy_(codec.unpack(packet))
        for phase in schedule[k - 1:2 * (k - 1)]:  # all-gather
            out, into = ring_hop(phase, r)
            got = self._exchange(packet, out.dst, into.nbytes, into.src)
            chunks[local[into.item]].copy_(codec.unpack(got))
            packet = got
        return flat.div_(k), handle

    def _ring_allreduce_in_pieces(self, x: torch.Tensor, codec: DenseCodec, stream: int | None,
                                  groups: Groups | None, members: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """The ring all-reduce of :meth:`_ring_allreduce` for dense packets, each sent as pieces
        (:mod:`pysim.pieces`) so that decoding, reducing and re-encoding piece i overlaps the
        transfer of piece i+1. Same packets, bytes, schedule and float32 arithmetic. Every
        receive is posted before anything is sent (gloo matches a pair's messages in order),
        so no sender waits for its receiver to get ready. ``x`` is read, never written."""
        n, r = self.world, self.rank
        k, j = len(members), members.index(r)
        bounds = [x.numel() * c // k for c in range(k + 1)]
        layouts = [DenseLayout(bounds[c + 1] - bounds[c], codec.dtype, self.piece_bytes) for c in range(k)]
        local = {m: c for c, m in enumerate(members)}
        handle: int | None = None
        table: np.ndarray | None = None
        if groups is None:  # the metadata rows ride the reduce-scatter, one message ahead of each packet
            sizes = [layouts[c].nbytes for c in range(n)]
            table = self._my_row(sizes[r])
        else:
            sizes, handle = self._begin("allreduce", "ring", layouts[j].nbytes, stream, groups)
        if k == 1:
            if handle is None:
                handle = self._charge("allreduce", "ring", sizes, table, stream)
            return x.clone(), handle
        hops = [ring_hop(phase, r) for phase in phases("allreduce", "ring", tuple(sizes), groups)[:2 * (k - 1)]]
        mean = torch.empty(x.numel(), dtype=torch.float32)
        # post every receive of the collective: per hop its table (reduce-scatter, ungrouped), pieces, header
        inbox: list[tuple[DenseLayout, torch.Tensor, list[dist.Work]]] = []
        tables: list[tuple[np.ndarray, dist.Work]] = []
        for h, (_, into) in enumerate(hops):
            lay = layouts[local[into.item]]
            buf = self._pool.take(lay.nbytes)
            if table is not None and h < k - 1:
                theirs = np.empty_like(table)
                tables.append((theirs, dist.irecv(torch.from_numpy(theirs.reshape(-1)), into.src)))
            inbox.append((lay, buf, [dist.irecv(m, into.src) for m in lay.messages(buf)]))
        sends: list[tuple[dist.Work, torch.Tensor]] = []   # kept with their buffers until sent

        def send(t: torch.Tensor, dst: int) -> None:
            sends.append((dist.isend(t, dst), t))

        # hop 0 sends this node's own chunk, encoded piece by piece
        dst = hops[0][0].dst
        if table is not None:
            send(torch.from_numpy(table.reshape(-1).copy()), dst)
        lay, own = layouts[j], x[bounds[j]:bounds[j + 1]]
        packet, crc = lay.new_packet(self._pool), lay.start_crc
        packets = [packet]
        for i, (a, b) in enumerate(lay.pieces):
            with self.meter.measure():
                crc = encode_piece(own[a:b], lay.piece(packet, i), codec.dtype, crc)
            if lay.streamed:
                send(lay.piece(packet, i), dst)
        lay.seal(packet, crc)
        send(lay.last_message(packet), dst)
        self.bytes_sent += lay.nbytes
        for h, (lay, buf, msgs) in enumerate(inbox):
            item = local[hops[h][1].item]
            a0 = bounds[item]
            forward = h + 1 < len(hops)
            dst = hops[h + 1][0].dst if forward else -1
            crc_in = lay.start_crc
            if h < k - 1:  # reduce-scatter: add this node's values, re-encode, send on
                if table is not None:
                    theirs, req = tables[h]
                    req.wait()
                    unknown = np.isnan(table[:, 0])
                    table[unknown] = theirs[unknown]
                    if h + 1 < k - 1:
                        send(torch.from_numpy(table.reshape(-1).copy()), dst)
                owned = h == k - 2   # this hop completes the sum of the chunk this node owns
                packet, crc_out = lay.new_packet(self._pool), lay.start_crc
                packets.append(packet)
                for i in lay.arrivals(msgs):
                    a, b = lay.pieces[i]
                    with self.meter.measure():
                        crc_in, crc_out = add_encode_piece(lay.piece(buf, i), x[a0 + a:a0 + b], lay.piece(packet, i),
                                                           codec.dtype, crc_in, crc_out)
                    if lay.streamed:
                        send(lay.piece(packet, i), dst)
                    if owned:  # everyone keeps the wire version of the sum
                        decode_piece(lay.piece(packet, i), mean[a0 + a:a0 + b], codec.dtype, float(k), 0)
                lay.check(buf, crc_in)
                lay.seal(packet, crc_out)
                send(lay.last_message(packet), dst)
                self.bytes_sent += lay.nbytes
            else:  # all-gather: decode into the result, forward the same bytes
                for i in lay.arrivals(msgs):
                    a, b = lay.pieces[i]
                    crc_in = decode_piece(lay.piece(buf, i), mean[a0 + a:a0 + b], codec.dtype, float(k), crc_in)
                    if forward and lay.streamed:
                        send(lay.piece(buf, i), dst)
                lay.check(buf, crc_in)
                if forward:
                    send(lay.last_message(buf), dst)
                    self.bytes_sent += lay.nbytes
            self.bytes_received += lay.nbytes
            if h == k - 2 and handle is None:
                handle = self._charge("allreduce", "ring", sizes, table, stream)
        for req, _ in sends:
            req.wait()
        self._pool.give([buf for _, buf, _ in inbox] + packets)
        return mean, handle  # type: ignore[return-value]

    def _star_allreduce(self, flat: torch.Tensor, codec: Codec, stream: int | None, groups: Groups | None,
                        members: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """Parameter-server all-reduce among ``members``, root = members[0] (every group at once)."""
        n, r, root, k = self.world, self.rank, members[0], len(members)
        size = codec.nbytes((flat.numel(),))
        handle: int | None = None
        table: np.ndarray | None = None
        if groups is None:  # workers' rows arrive with their packets, the full table goes back
            sizes = [size] * n
            table = self._my_row(size)
        else:
            sizes, handle = self._begin("allreduce", "star", size, stream, groups)

        def charged() -> int:
            return handle if handle is not None else self._charge("allreduce", "star", sizes, table, stream)

        if k == 1:
            return flat, charged()
        gather, scatter = phases("allreduce", "star", tuple(sizes), groups)
        if r == root:
            total = flat.clone()
            for m in gather:
                if m.dst == r:
                    total += codec.unpack(self._exchange(None, r, m.nbytes, m.src, table))
            packet = codec.pack(total / k)
            for m in scatter:
                if m.src == r:
                    self._exchange(packet, m.dst, None, r, table)
            return codec.unpack(packet).float(), charged()
        self._exchange(codec.pack(flat), root, None, root, table)
        result = codec.unpack(self._exchange(None, root, size, root, table)).float()
        return result, charged()

    def allgather(self, packet: torch.Tensor) -> list[torch.Tensor]:
        """Every node's packet (index = rank), moved around a ring; packets may differ in size."""
        return self._allgather(packet, None)[0]

    def _allgather(self, packet: torch.Tensor, stream: int | None) -> tuple[list[torch.Tensor], int]:
        if packet.dtype != torch.uint8 or packet.dim() != 1:
            raise ValueError("allgather moves packets: 1-D torch.uint8 tensors from a codec")
        sizes, handle = self._begin("allgather", "ring", packet.numel(), stream)
        n, r = self.world, self.rank
        out: list[torch.Tensor | None] = [None] * n
        out[r] = packet
        current = packet
        for phase in phases("allgather", "ring", tuple(sizes)):  # forward what arrived last
            _, into = ring_hop(phase, r)
            current = self._exchange(current, (r + 1) % n, into.nbytes, (r - 1) % n)
            out[into.item] = current
        return out, handle  # type: ignore[return-value]

    def allgather_mean(self, x: torch.Tensor, codec: Codec, key: str = "", step: int = 0) -> torch.Tensor:
        """Mean over nodes of ``codec``'s reconstruction of each node's ``x`` (for sparse and
        low-rank codecs, whose packets cannot be summed on the wire)."""
        return self.allgather_mean_many({key: x}, codec, step)[key]

    def allgather_mean_many(self, tensors: dict[str, torch.Tensor], codec: Codec, step: int = 0
                            ) -> dict[str, torch.Tensor]:
        """Like :meth:`allgather_mean` for several named tensors in one collective: each node
        sends one bundle, the concatenation of its packets (bytes = the sum of their lengths)."""
        bundles, _ = self._allgather(self._bundle(tensors, codec, step), None)
        return self._mean_of_bundles(bundles, tensors, codec)

    def allgather_mean_many_async(self, tensors: dict[str, torch.Tensor], codec: Codec, step: int = 0,
                                  stream: int = 0) -> Pending[dict[str, torch.Tensor]]:
        """:meth:`allgather_mean_many` started on ``stream``; the packets are decoded in
        ``wait()`` (that compute is charged after the wait)."""
        _check_stream(stream)
        bundles, handle = self._allgather(self._bundle(tensors, codec, step), stream)
        return Pending(self, handle, finish=lambda: self._mean_of_bundles(bundles, tensors, codec))

    def _bundle(self, tensors: dict[str, torch.Tensor], codec: Codec, step: int) -> torch.Tensor:
        with self.meter.measure():
            return torch.cat([codec.pack(t, key=name, step=step) for name, t in tensors.items()])

    def _mean_of_bundles(self, bundles: list[torch.Tensor], tensors: dict[str, torch.Tensor], codec: Codec
                         ) -> dict[str, torch.Tensor]:
        with self.meter.measure():
            totals = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in tensors.items()}
            for b in bundles:
                packets = split_packets(b)
                if len(packets) != len(totals):
                    raise ValueError(f"a node sent {len(packets)} packets, expected {len(totals)}")
                for name, p in zip(totals, packets, strict=True):
                    totals[name] += codec.unpack(p).float()
            return {name: (tot / self.world).to(tensors[name].dtype) for name, tot in totals.items()}


def _check_stream(stream: int) -> None:
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise ValueError(f"stream must be an integer >= 0, got {stream!r}")
