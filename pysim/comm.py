"""The comm layer of a node: collectives whose real packets cross between nodes, charged to a virtual clock.

A collective on a node (:class:`Comm`) does three things:

1. its own work before the start, charged to the node as compute: packing what
   it sends (its ring chunk, its packet);
2. it meets the other nodes of its process (:meth:`pysim.host.Host.meet`); the
   last to arrive runs the collective once for all of them: every node's
   metadata row (its clock, compute since its last segment, packet bytes:
   simulator bookkeeping, whose real counterpart is the packet header) is
   gathered from every process, each node's clock is charged (the same
   :class:`pysim.clock.Clock` that :func:`pysim.clock.replay` runs), and the real
   packets move along the schedule of :mod:`pysim.schedule` (in memory between
   nodes of a process, over gloo between processes: :mod:`pysim.transport`);
3. the node gets its result. Work that needs the result (decoding all-gathered
   packets) runs after the collective and is charged there, after its Wait.

The reductions and re-encodings at each ring hop happen inside the collective,
as they do inside gloo or NCCL, and are part of its network time (which the
calibration fits against gloo's), not the node's compute.

One ring. A ring all-reduce of a summable codec moves each member's chunk hop by
hop (reduce-scatter, then all-gather) and is written once (:func:`_ring`); how a
chunk's packet is built and read is its codec's (:class:`DensePieces`: dense
packets encoded, reduced and decoded piece by piece, so that between processes
piece i+1 is on the wire while piece i is reduced; :class:`WholePackets`: any
other summable codec, packet by packet). Every receive from another process is
posted before the first send.

Non-blocking collectives. ``allreduce_mean_async(x, codec, stream)`` returns a
:class:`Pending`; ``Pending.wait()`` returns the mean. The real packets move at
once; only the simulated clock overlaps: the trace records ``Start`` when the
call is made and ``Wait`` when ``wait()`` is called, and compute measured in
between runs while the collective is in flight. Collectives on one stream run
one after the other in call order; on different streams they share the links
(see :mod:`pysim.clock`). Every node must issue the same collectives and waits
in the same order. ``allreduce_mean`` is the blocking form (stream 0). A
DDP-style bucketed reduce::

    pending = []
    for bucket in buckets_in_backward_order:
        with comm.meter.measure():
            grads = backward_until(bucket)          # compute that overlaps earlier buckets
        pending.append(comm.allreduce_mean_async(grads))
    means = [p.wait() for p in pending]

Parameter server (asynchronous methods). ``server_round(update, ...)``: every
node calls it at once, each with its update packet or None; the server (an
object on node ``server_node``, passed by that node) receives every update,
applies the pending ones the clock says have arrived (:meth:`pysim.clock.Clock.server_order`)
and answers each with a reply packet; the round is one
:class:`pysim.trace.ServerRound` on the clock. It also tells each node whether
it computes the next step: a node awaiting a reply does not, and of the others
those whose clock is within one step of the earliest clock do (a discrete-event
simulation in steps of the fastest node, so that faster nodes train more steps).

Grouped all-reduce. ``allreduce_mean(x, groups=[[0, 2], [1, 3]])`` gives each
node the mean over its own group (FedAvg's islands): every group runs its own
ring (or star, root = its first member) at once, along the grouped schedule of
:mod:`pysim.schedule`, and the trace records one collective with its groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from pysim import _C
from pysim.clock import Clock, ComputeScaling
from pysim.compress import Codec, DenseCodec, split_packets
from pysim.compute import ComputeMeter
from pysim.host import current_host, solo_host
from pysim.network import Network
from pysim.pieces import PIECE_BYTES, BufferPool, DenseLayout, add_encode_piece, decode_piece, encode_piece
from pysim.schedule import Groups, Phase, check_groups, group_of, phases, ring_hop
from pysim.trace import Collective, Event, ServerRound, Start, Wait
from pysim.transport import Transport

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


class ParameterServer:
    """What a server round hands the server, on the server's node: every update packet as it
    comes (``receive``), then ``apply(node)`` for each update it applies now, in order, which
    returns the reply packet for that node."""

    def receive(self, node: int, packet: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, node: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class ServerReply:
    """A node's outcome of a server round: the server's reply (None: it did not apply this
    node's update in this round) and whether the node computes the next step."""

    packet: torch.Tensor | None
    trains_next: bool


@dataclass
class _Part:
    """One node's part in a collective: what the executor needs from it."""

    comm: Comm
    row: np.ndarray                      # (clock, compute s, flops, bytes of its packet)
    x: torch.Tensor | None = None        # its input, flat float32 (all-reduce)
    packet: torch.Tensor | None = None   # what it sends first, packed before the Start
    settings: tuple = ()                 # what every node must agree on (op, codec, groups, stream, ...)
    result: object = None
    extra: dict = field(default_factory=dict)

    @property
    def node(self) -> int:
        return self.comm.rank


class Comm:
    """Collectives for node ``rank`` of a ``world``-node run on ``network``.

    ``algorithm`` is the all-reduce algorithm: "ring" (default) or "star"
    (parameter server at each group's first member). All-gathers use a ring.
    ``scaling``: compute speed factors and jitter the clock applies
    (:class:`pysim.clock.ComputeScaling`; give :func:`pysim.clock.replay` the same one).
    Runs inside a :class:`pysim.host.Host` node thread, or alone in a process (one node per
    process, torch.distributed initialised for more than one).
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
        self.bytes_sent = 0              # real packet bytes this node sent (counted by the transport)
        self.bytes_received = 0
        self.compute_total_s = 0.0       # measured compute (before scaling)
        # this node's view of the trace: per segment (compute_s, flops, event)
        self.segments: list[tuple[float, float, Event]] = []
        self.step_ends: list[int] = []
        self._next_handle = 0
        self._tick_s = 0.0               # the latest step time of the fastest node (server rounds)
        self._dense = DenseCodec()
        self.piece_bytes = PIECE_BYTES   # dense ring packets travel between processes in pieces of this size
        self._attach()

    def _attach(self) -> None:
        host = current_host()
        self.host = host if host is not None and self.rank in host.nodes else solo_host(self.rank, self.world)
        self.transport: Transport = self.host.transport

    def __getstate__(self) -> dict:   # a checkpoint keeps the node's state, not its process's machinery
        return {k: v for k, v in self.__dict__.items() if k not in ("host", "transport")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

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

    def _row(self, my_bytes: int) -> np.ndarray:
        """This node's metadata row: its clock, the compute since its last segment, and the
        bytes of the packet it reports (see :mod:`pysim.schedule`)."""
        comp, flops = self.meter.take()
        return np.array([self.clock_s, comp, flops, my_bytes], dtype=np.float64)

    def _charge(self, coll: Collective, table: np.ndarray, stream: int | None) -> int:
        """Records a collective given every node's metadata row: blocking (``stream`` None) or
        started on ``stream``. Returns its handle."""
        comp, flops = float(table[self.rank, 1]), float(table[self.rank, 2])
        handle = self._next_handle
        self._next_handle += 1
        event: Event = coll if stream is None else Start(handle, coll, stream)
        self.clock.t = table[:, 0].copy()   # every node's clock before its compute
        self.clock.advance(table[:, 1].copy(), event)
        self.compute_total_s += comp
        self.segments.append((comp, flops, event))
        return handle

    def _record(self, event: Event, table: np.ndarray) -> None:
        """Records a segment ending in ``event`` given every node's metadata row."""
        comp, flops = float(table[self.rank, 1]), float(table[self.rank, 2])
        self.clock.t = table[:, 0].copy()
        self.clock.advance(table[:, 1].copy(), event)
        self.compute_total_s += comp
        self.segments.append((comp, flops, event))

    def _collective(self, op: str, part: _Part, execute: Callable[[list[_Part], np.ndarray], None],
                    algo: str, stream: int | None, groups: Groups | None) -> _Part:
        """Meets the local nodes; the last runs the collective: gathers every node's row, charges
        every local node's clock, then ``execute(parts, table)`` moves the packets and sets each
        part's ``result``. Returns this node's part, with its ``result`` and ``extra["handle"]``."""
        def run(requests: dict[int, _Part]) -> dict[int, _Part]:
            parts = [requests[n] for n in sorted(requests)]
            for p in parts[1:]:
                if p.settings != parts[0].settings:
                    raise RuntimeError(f"nodes {parts[0].node} and {p.node} disagree on a collective: "
                                       f"{parts[0].settings} vs {p.settings}")
            t = self.transport
            table = t.gather_rows({p.node: p.row for p in parts})
            coll = Collective(op, algo, tuple(int(b) for b in table[:, 3]), groups)
            for p in parts:
                p.extra["handle"] = p.comm._charge(coll, table, stream)
            sent = {p.node: t.sent[p.node] for p in parts}
            received = {p.node: t.received[p.node] for p in parts}
            execute(parts, table)
            t.flush()
            for p in parts:
                p.comm.bytes_sent += t.sent[p.node] - sent[p.node]
                p.comm.bytes_received += t.received[p.node] - received[p.node]
            return {p.node: p for p in parts}

        return self.host.meet(op, part, run)

    # ------------------------------------------------------------ all-reduce

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
        settings = ("allreduce", self.algorithm, codec.name, norm, stream, flat.numel())
        if self.algorithm == "star":
            size = codec.nbytes((flat.numel(),))
            packet = None
            if len(members) > 1 and members[0] != self.rank:
                with self.meter.measure(native=True):   # a worker packs its values for the server
                    packet = codec.pack(flat)
            part = _Part(self, self._row(size), flat, packet, settings)
            execute = lambda parts, table: _star(self.transport, parts, codec, norm, table)  # noqa: E731
        elif isinstance(codec, DenseCodec) and len(self.host.nodes) > 1 \
                and (norm is None or any(len(g) > 1 for g in norm)):   # several nodes here, a ring somewhere
            plan = self.host.shared(("ring plan", flat.numel(), codec.dtype, norm, self.piece_bytes),
                                    lambda: RingPlan(self.transport, self.host.nodes, flat.numel(), codec.dtype, norm,
                                                     self.piece_bytes))
            own = plan.own_packet(self.rank)
            if own is not None:
                with self.meter.measure(native=True):   # its own chunk, packed before the collective starts
                    plan.encode_own(self.rank, flat)
            part = _Part(self, self._row(plan.own_bytes(self.rank)), flat, own, settings)
            execute = lambda parts, table: plan.run(parts)  # noqa: E731
        else:
            ops = DensePieces(codec, self.piece_bytes, self.transport.pool) if isinstance(codec, DenseCodec) \
                else WholePackets(codec)
            k, j = len(members), members.index(self.rank)
            lo, hi = flat.numel() * j // k, flat.numel() * (j + 1) // k
            packet = None
            if k > 1:
                packet = ops.new_packet(hi - lo)   # a buffer (taking one is not the node's compute)
                with self.meter.measure(native=True):   # its own chunk, packed before the collective starts
                    packet = ops.encode(flat[lo:hi], packet)
            part = _Part(self, self._row(ops.nbytes(hi - lo)), flat, packet, settings)
            execute = lambda parts, table: _ring(self.transport, parts, ops, norm)  # noqa: E731
        done = self._collective("allreduce", part, execute, self.algorithm, stream, norm)
        return done.result.reshape(x.shape).to(x.dtype), done.extra["handle"]

    # ------------------------------------------------------------ parameter server

    def server_round(self, update: torch.Tensor | None, reply_bytes: int, final: bool = False,
                     server_node: int = 0, server: ParameterServer | None = None) -> ServerReply:
        """One round with the parameter server on ``server_node`` (see the module docstring):
        ``update``: this node's packet for the server, or None; ``reply_bytes``: the size of
        every reply packet (the same on every node); ``final``: the server applies everything
        pending. The server's node passes ``server``. Blocking for the nodes the server answers."""
        if update is not None and (update.dtype != torch.uint8 or update.dim() != 1):
            raise ValueError("server_round sends packets: 1-D torch.uint8 tensors from a codec")
        if (server is not None) != (self.rank == server_node):
            raise ValueError(f"the server's node (node {server_node}) and only it passes the server")
        sends = update is not None
        row = np.append(self._row(update.numel() if sends and self.rank != server_node else 0), float(sends))
        part = _Part(self, row, packet=update, settings=("server", final, server_node, reply_bytes))
        part.extra["server"] = server

        def run(requests: dict[int, _Part]) -> dict[int, _Part]:
            parts = [requests[n] for n in sorted(requests)]
            for p in parts[1:]:
                if p.settings != parts[0].settings:
                    raise RuntimeError(f"nodes {parts[0].node} and {p.node} disagree on a server round: "
                                       f"{parts[0].settings} vs {p.settings}")
            t = self.transport
            table = t.gather_rows({p.node: p.row for p in parts})
            event, trains = _plan_server_round(parts[0].comm, table, final, server_node, reply_bytes)
            sent = {p.node: t.sent[p.node] for p in parts}
            received = {p.node: t.received[p.node] for p in parts}
            for p in parts:
                p.comm._record(event, table)
                p.comm._tick_s = parts[0].comm._tick_s
                p.extra["trains"] = bool(trains[p.node])
            _server_exchange(t, parts, event, requests.get(server_node))
            t.flush()
            for p in parts:
                p.comm.bytes_sent += t.sent[p.node] - sent[p.node]
                p.comm.bytes_received += t.received[p.node] - received[p.node]
            return {p.node: p for p in parts}

        done = self.host.meet("server", part, run)
        return ServerReply(done.result, done.extra["trains"])

    # ------------------------------------------------------------ broadcast

    def broadcast(self, x: torch.Tensor, groups: Sequence[Sequence[int]], codec: Codec | None = None) -> torch.Tensor:
        """Within each of ``groups`` (disjoint lists of ranks holding every node once), the
        group's first member sends ``x`` (packed with ``codec``, dense fp32 by default) to each of
        the others, at once (a star per group, every group at the same time); every member gets
        the root's values (the root its own ``x``). Blocking (stream 0)."""
        codec = codec or self._dense
        norm = check_groups(groups, self.world)
        members = group_of(norm, self.rank, self.world)
        flat = x.detach().reshape(-1).float()
        packet = None
        if members[0] == self.rank and len(members) > 1:
            with self.meter.measure(native=True):   # the root packs what it sends
                packet = codec.pack(flat)
        part = _Part(self, self._row(codec.nbytes((flat.numel(),))), flat, packet,
                     ("broadcast", codec.name, norm, flat.numel()))
        done = self._collective("broadcast", part, lambda parts, table: _broadcast(self.transport, parts, codec, norm),
                                "star", None, norm)
        return done.result.reshape(x.shape).to(x.dtype)

    # ------------------------------------------------------------ all-gather

    def allgather(self, packet: torch.Tensor) -> list[torch.Tensor]:
        """Every node's packet (index = rank), moved around a ring; packets may differ in size."""
        return self._allgather(packet, None)[0]

    def _allgather(self, packet: torch.Tensor, stream: int | None) -> tuple[list[torch.Tensor], int]:
        if packet.dtype != torch.uint8 or packet.dim() != 1:
            raise ValueError("allgather moves packets: 1-D torch.uint8 tensors from a codec")
        part = _Part(self, self._row(packet.numel()), packet=packet, settings=("allgather", stream))
        done = self._collective("allgather", part, lambda parts, table: _allgather(self.transport, parts, table),
                                "ring", stream, None)
        return done.result, done.extra["handle"]

    def allgather_mean(self, x: torch.Tensor, codec: Codec, key: str = "", step: int = 0) -> torch.Tensor:
        """Mean over nodes of ``codec``'s reconstruction of each node's ``x`` (for sparse and
        low-rank codecs, whose packets cannot be summed on the wire)."""
        return self.allgather_mean_many({key: x}, codec, step)[key]

    def allgather_mean_many(self, tensors: dict[str, torch.Tensor], codec: Codec | Mapping[str, Codec],
                            step: int = 0) -> dict[str, torch.Tensor]:
        """Like :meth:`allgather_mean` for several named tensors in one collective: each node
        sends one bundle, the concatenation of its packets (bytes = the sum of their lengths).
        ``codec``: one for every tensor, or a mapping from each tensor's name to its own (a
        sparse packet and a dense one in one bundle). The packets are decoded after the
        collective (that compute is charged after it)."""
        codecs = _codec_per_tensor(tensors, codec)
        bundles, _ = self._allgather(self._bundle(tensors, codecs, step), None)
        return self._mean_of_bundles(bundles, tensors, codecs)

    def allgather_mean_many_async(self, tensors: dict[str, torch.Tensor], codec: Codec | Mapping[str, Codec],
                                  step: int = 0, stream: int = 0) -> Pending[dict[str, torch.Tensor]]:
        """:meth:`allgather_mean_many` started on ``stream``; the packets are decoded in
        ``wait()`` (that compute is charged after the wait)."""
        _check_stream(stream)
        codecs = _codec_per_tensor(tensors, codec)
        bundles, handle = self._allgather(self._bundle(tensors, codecs, step), stream)
        return Pending(self, handle, finish=lambda: self._mean_of_bundles(bundles, tensors, codecs))

    def _bundle(self, tensors: dict[str, torch.Tensor], codecs: dict[str, Codec], step: int) -> torch.Tensor:
        with self.meter.measure(reuse=_codec_work("bundle", tensors, codecs)):
            return torch.cat([codecs[name].pack(t, key=name, step=step) for name, t in tensors.items()])

    def _mean_of_bundles(self, bundles: list[torch.Tensor], tensors: dict[str, torch.Tensor],
                         codecs: dict[str, Codec]) -> dict[str, torch.Tensor]:
        with self.meter.measure(reuse=_codec_work(f"mean of {len(bundles)} bundles", tensors, codecs)):
            totals = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in tensors.items()}
            for b in bundles:
                packets = split_packets(b)
                if len(packets) != len(totals):
                    raise ValueError(f"a node sent {len(packets)} packets, expected {len(totals)}")
                for name, p in zip(totals, packets, strict=True):
                    totals[name] += codecs[name].unpack(p, expect_shape=tensors[name].shape).float()
            return {name: (tot / self.world).to(tensors[name].dtype) for name, tot in totals.items()}


def _codec_per_tensor(tensors: dict[str, torch.Tensor], codec: Codec | Mapping[str, Codec]) -> dict[str, Codec]:
    """Each tensor's codec: ``codec`` for all of them, or the mapping's entry under its name."""
    if isinstance(codec, Codec):
        return dict.fromkeys(tensors, codec)
    if set(codec) != set(tensors):
        raise ValueError(f"one codec per tensor: got codecs for {sorted(codec)}, tensors {sorted(tensors)}")
    return {name: codec[name] for name in tensors}


def _codec_work(block: str, tensors: dict[str, torch.Tensor], codecs: dict[str, Codec]) -> str | None:
    """A name for a block that packs or unpacks ``tensors``, each with its codec, under which its
    counted work is reused (see :meth:`pysim.compute.ComputeMeter.measure`), where the codecs'
    work depends on shapes alone (``Codec.fixed_work``); else None: counted every time. The
    name holds everything the work depends on (shapes, layout, each codec and its state per
    tensor), so two blocks of one name do the same work whoever runs them."""
    if not all(c.fixed_work for c in codecs.values()):
        return None
    return f"{block} " + str([(name, codecs[name].name, tuple(t.shape), t.dtype, t.is_contiguous(),
                               codecs[name].state_of(name)) for name, t in tensors.items()])


def _check_stream(stream: int) -> None:
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise ValueError(f"stream must be an integer >= 0, got {stream!r}")


# ---------------------------------------------------------------- how a ring chunk's packets are made


class _Outgoing:
    """A packet on its way from ``src`` to ``dst`` (None: nowhere, the last hop): between
    processes a streamed dense packet leaves piece by piece as it is written; otherwise the
    whole packet leaves once complete."""

    def __init__(self, t: Transport, src: int, dst: int | None, layout: DenseLayout | None = None) -> None:
        self.t, self.src, self.dst, self.layout = t, src, dst, layout
        self.streamed = dst is not None and layout is not None and layout.streamed and not t.local(dst)

    def piece(self, packet: torch.Tensor, i: int) -> None:
        if self.streamed:
            self.t.send(self.src, self.dst, self.layout.piece(packet, i))

    def done(self, packet: torch.Tensor) -> None:
        if self.dst is not None:
            self.t.send(self.src, self.dst, self.layout.last_message(packet) if self.streamed else packet)

    def whole(self, packet: torch.Tensor) -> None:
        """Sends a packet written beforehand, in its wire order."""
        if self.dst is None:
            return
        if self.streamed:
            for m in self.layout.messages(packet):
                self.t.send(self.src, self.dst, m)
        else:
            self.t.send(self.src, self.dst, packet)


class _Incoming:
    """A packet arriving at ``dst`` from ``src``: from this process, whole and at once; from
    another, into a buffer (from ``pool`` if given) whose receives are posted at once, piece by
    piece as it arrives. ``nbytes``: its size; ``layout``: its pieces (None: one message)."""

    def __init__(self, t: Transport, dst: int, src: int, nbytes: int, layout: DenseLayout | None = None,
                 pool: BufferPool | None = None) -> None:
        self.t, self.dst, self.src, self.layout = t, dst, src, layout
        self.remote = not t.local(src)
        self.packet: torch.Tensor | None = None
        self.receives: list = []
        if self.remote:
            self.packet = pool.take(nbytes) if pool is not None else torch.empty(nbytes, dtype=torch.uint8)
            messages = layout.messages(self.packet) if layout is not None else [self.packet]
            self.receives = [t.post_receive(dst, src, m) for m in messages]

    def arrive(self) -> torch.Tensor:
        """The packet, once it is whole (a message of this process is taken from its mailbox)."""
        if not self.remote:
            if self.packet is None:
                self.packet = self.t.take(self.dst, self.src)
            return self.packet
        for r in self.receives:
            r.wait()
        self.receives = []
        return self.packet

    def arrivals(self) -> Iterator[int]:
        """The indices of the pieces as they arrive (all at once from this process)."""
        lay = self.layout
        if not self.remote:
            self.arrive()
            yield from range(len(lay.pieces))
            return
        yield from lay.arrivals(self.receives)
        self.receives = []


class DensePieces:
    """A ring chunk's dense packet (:mod:`pysim.pieces`), encoded, reduced and decoded piece by
    piece with its CRC chained over the pieces; checked whole before the collective returns."""

    def __init__(self, codec: DenseCodec, piece_bytes: int, pool: BufferPool) -> None:
        self.codec, self.piece_bytes, self.pool = codec, piece_bytes, pool
        self._layouts: dict[int, DenseLayout] = {}

    def layout(self, numel: int) -> DenseLayout:
        if numel not in self._layouts:
            self._layouts[numel] = DenseLayout(numel, self.codec.dtype, self.piece_bytes)
        return self._layouts[numel]

    def nbytes(self, numel: int) -> int:
        return self.layout(numel).nbytes

    def new_packet(self, numel: int) -> torch.Tensor:
        """A buffer for a chunk's packet, its header written."""
        return self.layout(numel).new_packet(self.pool)

    def encode(self, x: torch.Tensor, packet: torch.Tensor) -> torch.Tensor:
        """``packet`` (from :meth:`new_packet`) holding ``x`` encoded."""
        lay = self.layout(x.numel())
        crc = lay.start_crc
        for i, (a, b) in enumerate(lay.pieces):
            crc = encode_piece(x[a:b], lay.piece(packet, i), lay.dtype, crc)
        lay.seal(packet, crc)
        return packet

    def add_encode(self, got: _Incoming, x: torch.Tensor, out: _Outgoing) -> torch.Tensor:
        """decode(got) + x, encoded: the packet a reduce-scatter hop sends on."""
        lay = self.layout(x.numel())
        packet, crc_in, crc_out = lay.new_packet(self.pool), lay.start_crc, lay.start_crc
        out.layout = lay
        for i in got.arrivals():
            a, b = lay.pieces[i]
            crc_in, crc_out = add_encode_piece(lay.piece(got.packet, i), x[a:b], lay.piece(packet, i), lay.dtype,
                                               crc_in, crc_out)
            out.piece(packet, i)
        lay.check(got.packet, crc_in)
        lay.seal(packet, crc_out)
        out.done(packet)
        return packet

    def decode(self, got: _Incoming, into: torch.Tensor, divisor: float, forward: _Outgoing) -> None:
        """``into`` = decode(got) / divisor, forwarding the same bytes (an all-gather hop)."""
        lay = self.layout(into.numel())
        crc = lay.start_crc
        for i in got.arrivals():
            a, b = lay.pieces[i]
            crc = decode_piece(lay.piece(got.packet, i), into[a:b], lay.dtype, divisor, crc)
            forward.piece(got.packet, i)
        lay.check(got.packet, crc)
        forward.done(got.packet)

    def decode_own(self, packet: torch.Tensor, into: torch.Tensor, divisor: float) -> None:
        """The owner of a reduced chunk keeps what it sends: decode(packet) / divisor."""
        lay = self.layout(into.numel())
        crc = lay.start_crc
        for i, (a, b) in enumerate(lay.pieces):
            crc = decode_piece(lay.piece(packet, i), into[a:b], lay.dtype, divisor, crc)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        self.pool.give(buffers)


class WholePackets:
    """A ring chunk's packet of any other summable codec (int8, int4), packed and unpacked whole."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def layout(self, numel: int) -> None:
        return None

    def nbytes(self, numel: int) -> int:
        return self.codec.nbytes((numel,))

    def new_packet(self, numel: int) -> None:
        return None

    def encode(self, x: torch.Tensor, packet: None = None) -> torch.Tensor:
        return self.codec.pack(x)

    def add_encode(self, got: _Incoming, x: torch.Tensor, out: _Outgoing) -> torch.Tensor:
        packet = self.codec.pack(x + self.codec.unpack(got.arrive(), expect_shape=x.shape))
        out.done(packet)
        return packet

    def decode(self, got: _Incoming, into: torch.Tensor, divisor: float, forward: _Outgoing) -> None:
        packet = got.arrive()
        into.copy_(self.codec.unpack(packet, expect_shape=into.shape)).div_(divisor)
        forward.done(packet)

    def decode_own(self, packet: torch.Tensor, into: torch.Tensor, divisor: float) -> None:
        into.copy_(self.codec.unpack(packet, expect_shape=into.shape)).div_(divisor)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        pass


# ---------------------------------------------------------------- a ring between the members of one process


class RingPlan:
    """A dense ring all-reduce (within each group at once) among the nodes of one process, with
    every packet in a slot of one arena: made once per collective shape and run every time the
    shape recurs (training repeats its collectives every step).

    The hops are the schedule's (:mod:`pysim.schedule`), member by member and phase by phase;
    they run in C++ (``_C.RingBatch``, ``csrc/ring.hpp``): a reduce-scatter hop checks the
    packet it received, adds its member's chunk and writes the packet it sends on; an
    all-gather hop decodes the packet and passes it on by its slot. They run in *rounds*: a
    hop's round is how often the chain of packets that leads to it (from the own chunk it
    started as, member to member) crossed between processes, so round r needs only packets
    that other processes made in their rounds before r. Before round r a process waits for the
    packets of round r; after it, it sends what the round made for other processes. To another
    process that hosts several nodes (and so runs a plan too) a round's packets leave as one
    message, their bytes back to back (:meth:`Transport.send_bundle`); a process of one node
    runs the collective hop by hop (:func:`_ring`) and gets each packet as its own message, in
    pieces if large (:class:`pysim.pieces.DenseLayout`), as it sends them. A ring through P
    processes in blocks of consecutive nodes takes at most 2P + 1 rounds, the last one sending
    nothing: a ring of 64 (or 256) nodes over two processes sends 4 messages each way per
    all-reduce instead of one per phase (126, or 510).

    Every receive is posted before the first send, each into a slot of its own (a bundle's
    packets, one region). A member's reduce-scatter packets alternate between two slots (the
    next member has read one before it is written again); the packets that complete a chunk,
    and those that cross between processes, have their own slots."""

    def __init__(self, t: Transport, nodes: list[int], numel: int, dtype: int, groups: Groups | None,
                 piece_bytes: int = PIECE_BYTES) -> None:
        self.t, self.nodes, self.numel, self.dtype, self.piece_bytes = t, list(nodes), numel, dtype, piece_bytes
        n = t.nodes
        sched = phases("allreduce", "ring", (0,) * n, groups)
        self.row = {m: i for i, m in enumerate(self.nodes)}
        self.position = _positions(groups, self.nodes, n)   # node -> {member: its place in the node's group}
        rounds = _crossings(self.position, t.placement.process_of)   # node -> its hop's round, per phase
        self._bytes = 0
        self.own: dict[int, tuple[int, int, int, int]] = {}      # node -> (offset, bytes, a, b) of its packet
        self.receives: list[tuple[int, int, int, int, int, int]] = []  # (node, src, phase, bytes, values, round)
        self.moved = {m: [0, 0] for m in self.nodes}              # node -> bytes it hands over / takes in memory
        parity = {m: [self._slot(self._chunk_bytes(m)), self._slot(self._chunk_bytes(m))] for m in self.nodes}
        holding: dict[int, tuple[int, int]] = {}    # node -> (slot, round) of the packet it sends next
        hops: dict[int, list[tuple]] = {}           # round -> hops in phase order
        sends: dict[int, list[tuple]] = {0: self._own_packets(sched[0], parity, holding)}   # round -> see _sends
        for h in range(len(sched)):
            sending = dict(holding)
            for m in self.nodes:
                k = len(self.position[m])
                if h >= 2 * (k - 1):
                    continue
                into = ring_hop(sched[h], m)[1]
                a, b = self._bounds(m, into.item)
                nb = _C.dense_packet_bytes(b - a, dtype)
                r = int(rounds[m][h])
                if t.local(into.src):   # handed over in memory: the bytes cross all the same
                    in_off, made = sending[into.src]
                    if made != r:
                        raise RuntimeError(f"ring plan: node {m}'s hop {h} is in round {r}, its packet in {made}")
                    self.moved[into.src][0] += nb
                    self.moved[m][1] += nb
                else:                   # its slot is laid out with the round's other packets (_lay_out)
                    in_off = _PENDING + len(self.receives)
                    self.receives.append((m, into.src, h, nb, b - a, r))
                onward = ring_hop(sched[h + 1], m)[0].dst if h + 1 < 2 * (k - 1) else None
                if h < k - 1:    # reduce-scatter
                    owned = h == k - 2
                    out_off = self._slot(nb) if owned or (onward is not None and not t.local(onward)) \
                        else parity[m][h % 2]
                    hops.setdefault(r, []).append((2 if owned else 1, in_off, out_off, self.row[m], a, b, k))
                    holding[m] = (out_off, r)
                else:            # all-gather: decoded, and passed on by its slot
                    hops.setdefault(r, []).append((3, in_off, -1, self.row[m], a, b, k))
                    holding[m] = (in_off, r)
                if onward is not None and not t.local(onward):
                    sends.setdefault(r, []).append((m, onward, holding[m][0], nb, b - a, h + 1))
        self._lay_out(hops, sends)

    def _own_packets(self, first: Phase, parity: dict[int, list[int]], holding: dict[int, tuple[int, int]]
                     ) -> list[tuple]:
        """Gives every member its own chunk's packet slot (its ``holding``, round 0); returns the
        sends of those bound for another process."""
        sends = []
        for m in self.nodes:
            if len(self.position[m]) == 1:
                continue
            dst = ring_hop(first, m)[0].dst
            a, b = self._bounds(m, m)
            nb = _C.dense_packet_bytes(b - a, self.dtype)
            off = parity[m][1] if self.t.local(dst) else self._slot(nb)
            self.own[m] = (off, nb, a, b)
            holding[m] = (off, 0)
            if not self.t.local(dst):
                sends.append((m, dst, off, nb, b - a, 0))
        return sends

    def _bundled(self, process: int) -> bool:
        """Whether packets to and from ``process`` travel as one message per round: it hosts
        several nodes, so it runs a plan too (see :meth:`Comm._allreduce`)."""
        return len(self.t.placement.hosted(process)) > 1

    def _lay_out(self, hops: dict[int, list[tuple]], sends: dict[int, list[tuple]]) -> None:
        """Slots for the packets from other processes (a region per round and process for a
        bundle, in (phase, receiving node) order: the order its sender writes them in); makes
        the arena, then the hops, receives and sends of every round."""
        process_of = self.t.placement.process_of
        arrivals: dict[tuple[int, int], list[int]] = {}   # (round, source process) -> its receives
        for i, (_, src, _, _, _, r) in enumerate(self.receives):
            arrivals.setdefault((r, process_of(src)), []).append(i)
        slot = np.zeros(len(self.receives), dtype=np.int64)
        for key in sorted(arrivals):   # a bundle's receives in its order; the others (one each) in phase order
            arrivals[key].sort(key=lambda i: (self.receives[i][2], self.receives[i][0]))
            for i in arrivals[key]:
                slot[i] = self._slot(self.receives[i][3])
        self.arena = torch.empty(self._bytes, dtype=torch.uint8)
        self.raw = self.arena.numpy()
        self._headers: dict[int, tuple[np.ndarray, int]] = {}
        rounds = range(max([*hops, *sends, *(r for r, _ in arrivals)], default=0) + 1)
        self.hops = []
        for r in rounds:
            table = np.array(hops.get(r, []), dtype=np.int64).reshape(-1, 7)
            table[:, 1] = _laid_out(table[:, 1], slot)
            self.hops.append(table)
        self.posts: list[tuple] = []              # in posting order: ("bundle", process, ...) or ("pieces", ...)
        self.waits: dict[int, list[int]] = {}     # round -> the posts it waits for
        for r, p in sorted(arrivals):
            got = [(self.receives[i], int(slot[i])) for i in arrivals[(r, p)]]
            if self._bundled(p):
                off, nb = got[0][1], sum(rec[3] for rec, _ in got)
                self.waits.setdefault(r, []).append(len(self.posts))
                self.posts.append(("bundle", p, self.arena[off:off + nb], self.raw[off:off + nb],
                                   [(rec[0], rec[3]) for rec, _ in got]))
            else:
                for (m, src, _, nb, values, _), off in got:
                    self.waits.setdefault(r, []).append(len(self.posts))
                    self.posts.append(("pieces", m, src, self._pieces(off, nb, values)))
        self.sends = [self._sends(sends.get(r, []), slot) for r in rounds]

    def _pieces(self, off: int, nbytes: int, values: int) -> list[tuple[torch.Tensor, np.ndarray]]:
        """The messages that carry the packet in slot ``off`` to or from a process of one node,
        as :func:`_ring` sends them (:meth:`pysim.pieces.DenseLayout.messages`)."""
        packet = self.arena[off:off + nbytes]
        return [(m, m.numpy()) for m in DenseLayout(values, self.dtype, self.piece_bytes).messages(packet)]

    def _sends(self, sends: list[tuple], slot: np.ndarray) -> list[tuple]:
        """One round's sends (node, destination, slot, bytes, values, phase received): a bundle
        per process that runs a plan, ("bundle", process, [(node, packet, bytes)...]) in
        (phase, receiving node) order; ("pieces", node, destination, messages) for the others."""
        process_of = self.t.placement.process_of
        out: list[tuple] = []
        bundles: dict[int, list] = {}
        ordered = sorted(sends, key=lambda s: (s[5], s[1]))
        offsets = _laid_out(np.array([s[2] for s in ordered], dtype=np.int64), slot).tolist()
        for (m, dst, _, nb, values, _), at in zip(ordered, offsets, strict=True):
            if self._bundled(process_of(dst)):
                bundles.setdefault(process_of(dst), []).append((m, self.arena[at:at + nb], self.raw[at:at + nb]))
            else:
                out.append(("pieces", m, dst, self._pieces(at, nb, values)))
        return out + [("bundle", p, packets) for p, packets in sorted(bundles.items())]

    def _slot(self, nbytes: int) -> int:
        off = self._bytes
        self._bytes += nbytes
        return off

    def _bounds(self, m: int, item: int) -> tuple[int, int]:
        """The values of chunk ``item`` of member ``m``'s group."""
        c, k = self.position[m][item], len(self.position[m])
        return self.numel * c // k, self.numel * (c + 1) // k

    def _chunk_bytes(self, m: int) -> int:
        """The largest packet member ``m``'s ring moves (chunks differ by at most one value)."""
        return _C.dense_packet_bytes(-(-self.numel // len(self.position[m])), self.dtype)

    def own_packet(self, node: int) -> torch.Tensor | None:
        """Where ``node`` writes the packet of its own chunk (None: its group is itself alone)."""
        if node not in self.own:
            return None
        off, nb, _, _ = self.own[node]
        return self.arena[off:off + nb]

    def own_bytes(self, node: int) -> int:
        if node in self.own:
            return self.own[node][1]
        return _C.dense_packet_bytes(self.numel, self.dtype)

    def encode_own(self, node: int, x: torch.Tensor) -> None:
        """Writes ``node``'s own chunk of ``x`` as its packet (header, payload, CRC)."""
        off, nb, a, b = self.own[node]
        header, header_crc = self._own_header(b - a)
        raw = self.raw[off:off + nb]
        raw[:header.size] = header
        crc = encode_piece(x[a:b], self.arena[off + header.size:off + nb], self.dtype, header_crc)
        _C.seal_header(raw[:header.size], crc)

    def _own_header(self, n: int) -> tuple[np.ndarray, int]:
        """The header (checksum field zero) of an own chunk of ``n`` values, and its CRC: made once."""
        made = self._headers.get(n)
        if made is None:
            header = _C.dense_header([n], 0, self.dtype)
            made = self._headers[n] = (header, _C.crc32c(header))
        return made

    def run(self, parts: list[_Part]) -> None:
        """The collective: sets each part's ``result`` to the mean over its group."""
        t = self.t
        results = {p.node: torch.empty(self.numel, dtype=torch.float32) for p in parts}
        batch = _C.RingBatch(self.raw, [p.x.numpy() for p in parts],
                             [results[p.node].numpy() for p in parts], self.numel, self.dtype)
        posted = [self._post(post) for post in self.posts]
        for r, (hops, sends) in enumerate(zip(self.hops, self.sends, strict=True)):
            for i in self.waits.get(r, ()):
                for handle in posted[i]:
                    handle.wait()
            if len(hops):
                batch.run(hops)
            for send in sends:
                if send[0] == "bundle":
                    t.send_bundle(send[1], send[2])
                else:
                    _, m, dst, messages = send
                    for message, raw in messages:
                        t.send(m, dst, message, raw)
        for p in parts:
            p.result = results[p.node] if p.node in self.own else p.x.clone()
            t.sent[p.node] += self.moved[p.node][0]
            t.received[p.node] += self.moved[p.node][1]

    def _post(self, post: tuple) -> list:
        """Posts the receive(s) of one entry of ``posts``; returns their handles, to wait on once each."""
        if post[0] == "bundle":
            _, process, into, raw, shares = post
            return [self.t.post_bundle(process, into, raw, shares)]
        _, m, src, messages = post
        return [self.t.post_receive(m, src, into, raw) for into, raw in messages]


_PENDING = 1 << 62   # a hop's incoming slot before RingPlan lays out the messages: _PENDING + its receive


def _laid_out(offsets: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Arena offsets (bytes) with each pending one (``_PENDING`` + receive ``i``) replaced by
    receive ``i``'s laid-out slot ``slot[i]``."""
    out = offsets.copy()
    pending = out >= _PENDING
    out[pending] = slot[out[pending] - _PENDING]
    return out


def _crossings(positions: dict[int, dict[int, int]], process_of: Callable[[int], int]) -> dict[int, np.ndarray]:
    """Per node of ``positions`` (:func:`_positions`): for each phase h of its group's ring
    all-reduce, how often the chain of packets its hop continues crossed between processes:
    the chain starts as the own chunk of the member h + 1 places before it and passes every
    member up to it, so it is the count of consecutive members in other processes along those
    h + 1 hops (its round in :class:`RingPlan`)."""
    sums: dict[int, np.ndarray] = {}   # id of a group's positions -> prefix sums of crossings, three laps
    out = {}
    for m, position in positions.items():
        k = len(position)
        if id(position) not in sums:
            procs = np.array([process_of(member) for member in position], dtype=np.int64)  # in ring order
            crosses = (procs != np.roll(procs, 1)).astype(np.int64)   # [i]: the hop from member i-1 to i
            sums[id(position)] = np.concatenate([[0], np.cumsum(np.tile(crosses, 3))])
        s, i = sums[id(position)], position[m]
        out[m] = s[i + 2 * k + 1] - s[i + 2 * k - np.arange(max(0, 2 * (k - 1)))]
    return out


def _positions(groups: Groups | None, nodes: list[int], n: int) -> dict[int, dict[int, int]]:
    """Per node of ``nodes``: where each member of its group stands in the group's ring order
    (one dict per group, shared by its members)."""
    made: dict[tuple[int, ...], dict[int, int]] = {}
    out = {}
    for m in nodes:
        g = group_of(groups, m, n)
        if g not in made:
            made[g] = {member: c for c, member in enumerate(g)}
        out[m] = made[g]
    return out


# ---------------------------------------------------------------- the collectives


def _ring_plans(n: int, parts: list[_Part], groups: Groups | None) -> dict[int, tuple]:
    """Per local member: (ring size k, chunk bounds, position of each member, its hops (out, in)
    per phase); sets each part's ``result`` buffer (a copy of ``x`` for a ring of one)."""
    sizes = tuple(0 for _ in range(n))  # the ring's hops depend on the groups only, not on the sizes
    sched = phases("allreduce", "ring", sizes, groups)
    plans = {}
    positions = _positions(groups, [p.node for p in parts], n)
    for p in parts:
        position = positions[p.node]
        k = len(position)
        bounds = [p.x.numel() * c // k for c in range(k + 1)]
        hops = [ring_hop(sched[h], p.node) for h in range(2 * (k - 1))]
        plans[p.node] = (k, bounds, position, hops)
        p.result = p.x.clone() if k == 1 else torch.empty(p.x.numel(), dtype=torch.float32)
    return plans


def _ring(t: Transport, parts: list[_Part], ops: DensePieces | WholePackets, groups: Groups | None) -> None:
    """Ring all-reduce (within each group at once) of every local part's ``x``; sets each part's
    ``result`` to the mean over its group. Phase by phase, every local member receives the
    packet of its hop (posted first when it comes from another process), reduces or decodes
    it, and sends the next hop's packet on."""
    plans = _ring_plans(t.nodes, parts, groups)

    def chunk(node: int, item: int) -> tuple[int, int]:
        _, bounds, position, _ = plans[node]
        c = position[item]
        return bounds[c], bounds[c + 1]

    pool = t.pool if isinstance(ops, DensePieces) else None
    buffers = [p.packet for p in parts if p.packet is not None]

    def receive(node: int, src: int, item: int) -> _Incoming:
        a, b = chunk(node, item)
        got = _Incoming(t, node, src, ops.nbytes(b - a), ops.layout(b - a), pool)
        if got.remote:
            buffers.append(got.packet)
        return got

    incoming: dict[tuple[int, int], _Incoming] = {}
    for p in parts:   # every receive from another process, posted before anything is sent
        for h, (_, into) in enumerate(plans[p.node][3]):
            if not t.local(into.src):
                incoming[(p.node, h)] = receive(p.node, into.src, into.item)
    for p in parts:   # hop 0: each member's own chunk
        k, bounds, _, hops = plans[p.node]
        if k > 1:
            a, b = chunk(p.node, p.node)
            _Outgoing(t, p.node, hops[0][0].dst, ops.layout(b - a)).whole(p.packet)
    for h in range(max(len(plans[p.node][3]) for p in parts)):
        for p in parts:
            k, _, _, hops = plans[p.node]
            if h >= len(hops):
                continue
            into = hops[h][1]
            got = incoming.pop((p.node, h), None) or receive(p.node, into.src, into.item)
            a, b = chunk(p.node, into.item)
            onward = _Outgoing(t, p.node, hops[h + 1][0].dst if h + 1 < len(hops) else None, ops.layout(b - a))
            if h < k - 1:   # reduce-scatter: this member's values added, re-encoded, sent on
                p.packet = ops.add_encode(got, p.x[a:b], onward)
                buffers.append(p.packet)
                if h == k - 2:   # the hop that completes the chunk this member owns
                    ops.decode_own(p.packet, p.result[a:b], float(k))
            else:           # all-gather: decoded into the result, the same bytes forwarded
                ops.decode(got, p.result[a:b], float(k), onward)
    t.flush()
    ops.give_back(buffers)


def _star(t: Transport, parts: list[_Part], codec: Codec, groups: Groups | None, table: np.ndarray) -> None:
    """Parameter-server all-reduce within each group (root = its first member) of every local
    part's ``x``: the workers' packets go to the root, which sums them (in the order of the
    schedule) with its own values and sends the packed mean back to each."""
    n = t.nodes
    sizes = tuple(int(s) for s in table[:, 3])
    sched = phases("allreduce", "star", sizes, groups)
    gather, scatter = sched if sched else ((), ())
    mine = {p.node: p for p in parts}
    incoming = {}
    for m in (*gather, *scatter):   # receives from other processes first
        if m.dst in mine and not t.local(m.src):
            incoming[(m.src, m.dst)] = _Incoming(t, m.dst, m.src, m.nbytes)
    for m in gather:     # workers send their packets to their root
        if m.src in mine:
            t.send(m.src, m.dst, mine[m.src].packet)
    for p in parts:
        members = group_of(groups, p.node, n)
        if len(members) == 1:
            p.result = p.x.clone()
        elif members[0] == p.node:   # a root: sum, pack the mean, send it to every member
            total = p.x.clone()
            for m in gather:
                if m.dst == p.node:
                    got = incoming.pop((m.src, m.dst), None) or _Incoming(t, m.dst, m.src, m.nbytes)
                    total += codec.unpack(got.arrive(), expect_shape=total.shape)
            packet = codec.pack(total / len(members))
            for m in scatter:
                if m.src == p.node:
                    t.send(p.node, m.dst, packet)
            p.result = codec.unpack(packet, expect_shape=p.x.shape).float()
    for p in parts:
        members = group_of(groups, p.node, n)
        if len(members) > 1 and members[0] != p.node:
            got = incoming.pop((members[0], p.node), None) or _Incoming(t, p.node, members[0], 0)
            p.result = codec.unpack(got.arrive(), expect_shape=p.x.shape).float()


def _plan_server_round(comm: Comm, table: np.ndarray, final: bool, server_node: int, reply_bytes: int
                       ) -> tuple[ServerRound, np.ndarray]:
    """The round's event (which pending updates the server applies: the clock decides) and which
    nodes compute the next step: those not awaiting a reply whose clock after the round is
    within one step time (the fastest node's latest) of the earliest such clock. Updates
    ``comm._tick_s``."""
    clock, n = comm.clock, comm.world
    scaled = clock.scaled(table[:, 1])
    arrive = table[:, 0] + scaled
    senders = tuple(i for i in range(n) if table[i, 4] > 0)
    update_bytes = tuple(int(table[i, 3]) for i in range(n))
    order = clock.server_order(arrive, server_node, senders, update_bytes, final)
    replies = tuple(reply_bytes if i in order and i != server_node else 0 for i in range(n))
    event = ServerRound(server_node, senders, update_bytes, order, replies)
    if (scaled > 0).any():
        comm._tick_s = float(scaled[scaled > 0].min())
    after = Clock(clock.network, n, clock.scaling)   # the clocks after the round, on a copy
    after.t, after.step, after.server.pending = table[:, 0].copy(), clock.step, dict(clock.server.pending)
    after.server.down_free, after.server.up_free = clock.server.down_free, clock.server.up_free
    t = after.advance(table[:, 1].copy(), event)
    free = np.array([i not in after.server.pending for i in range(n)])
    earliest = t[free].min() if free.any() else np.inf
    return event, free & (t < earliest + comm._tick_s * (1 - 1e-9))


def _server_exchange(t: Transport, parts: list[_Part], event: ServerRound, server_part: _Part | None) -> None:
    """Moves a server round's packets: every update to the server's node (in memory when local),
    then, in the server's order, each reply to its node. Sets each part's ``result`` to its reply
    packet or None."""
    s = event.server
    incoming = {i: _Incoming(t, s, i, event.update_bytes[i]) for i in event.senders
                if t.local(s) and i != s and not t.local(i)}
    replies = {p.node: _Incoming(t, p.node, s, event.reply_bytes[p.node]) for p in parts
               if p.node in event.order and p.node != s and not t.local(s)}
    for p in parts:
        p.result = None
        if p.node in event.senders and p.node != s:
            t.send(p.node, s, p.packet)
    if server_part is not None:
        server = server_part.extra["server"]
        for i in event.senders:
            packet = server_part.packet if i == s else incoming[i].arrive() if i in incoming else t.take(s, i)
            server.receive(i, packet)
        for i in event.order:
            reply = server.apply(i)
            if i == s:
                server_part.result = reply
            else:
                t.send(s, i, reply)
    for p in parts:
        if p.node in event.order and p.node != s:
            p.result = replies.pop(p.node).arrive() if p.node in replies else t.take(p.node, s)


def _broadcast(t: Transport, parts: list[_Part], codec: Codec, groups: Groups | None) -> None:
    """Star broadcast within each group: the root's packet to every other member; each part's
    ``result`` is the root's values."""
    n = t.nodes
    incoming = {}
    for p in parts:
        root = group_of(groups, p.node, n)[0]
        if root != p.node and not t.local(root):
            incoming[p.node] = _Incoming(t, p.node, root, codec.nbytes((p.x.numel(),)))
    for p in parts:
        members = group_of(groups, p.node, n)
        if members[0] == p.node:
            for m in members[1:]:
                t.send(p.node, m, p.packet)
            p.result = p.x.clone()
    for p in parts:
        root = group_of(groups, p.node, n)[0]
        if root != p.node:
            got = incoming.pop(p.node, None) or _Incoming(t, p.node, root, 0)
            p.result = codec.unpack(got.arrive(), expect_shape=p.x.shape).float()


def _allgather(t: Transport, parts: list[_Part], table: np.ndarray) -> None:
    """Ring all-gather of every node's packet (sizes from the metadata table): in phase t each
    member forwards the packet that reached it last. Sets each part's ``result`` to the list
    of packets by node."""
    sizes = tuple(int(s) for s in table[:, 3])
    sched = phases("allgather", "ring", sizes)
    out = {p.node: [None] * t.nodes for p in parts}
    current = {}
    for p in parts:
        out[p.node][p.node] = current[p.node] = p.packet
    incoming = {}
    for h, phase in enumerate(sched):
        for p in parts:
            into = ring_hop(phase, p.node)[1]
            if not t.local(into.src):
                incoming[(p.node, h)] = _Incoming(t, p.node, into.src, into.nbytes)
    for h, phase in enumerate(sched):
        for p in parts:
            t.send(p.node, ring_hop(phase, p.node)[0].dst, current[p.node])
        for p in parts:
            into = ring_hop(phase, p.node)[1]
            got = incoming.pop((p.node, h), None) or _Incoming(t, p.node, into.src, into.nbytes)
            out[p.node][into.item] = current[p.node] = got.arrive()
    for p in parts:
        p.result = out[p.node]
