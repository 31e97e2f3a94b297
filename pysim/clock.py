"""The virtual clock: a pure function from (trace, network, compute scaling) to time.

State: each node's clock t_i, and per stream the time it is free. Segment s
of a trace (:mod:`pysim.trace`) is timed as

    c_i      = compute_i / speed_i * exp(jitter * z_(k,i))    (scaled compute, k = the step)
    arrive_i = t_i + c_i

and then, by its event:

- step end (None):          t_i = arrive_i
- Start(h, C, stream):      issue = max_i arrive_i; the collective C starts at
                            start = max(issue, free(stream)) (FIFO per stream, as NCCL/gloo
                            run one stream); t_i = arrive_i (nodes keep computing)
- Wait(h):                  t_i = max(arrive_i, end(h))
- blocking collective C:    Start on stream 0 followed at once by Wait: t_i = end(C)

A collective's time on its own is ``collective_s`` = L + W
(:func:`pysim.network.collective_parts`: L its latency part, W its transfer
part), so end = start + L + W. A grouped collective (disjoint groups, e.g.
FedAvg's islands, each running the collective among its members) is one
collective: its phases hold every group's messages at once, it starts when the
last node of any group arrives and ends for every node at the same time.
Collectives on *different* streams in flight at the same time share the links
(every collective here spans all nodes, so any two share every node's link):
fluid processor sharing, where a collective first
spends its latency L (not shared) and then its transfer work W progresses at
rate 1/k while k collectives are in their transfer part. Then

    end = start + (L + W) + delay,   delay = integral over its transfer of (1 - 1/k(t)) dt

and delay is exactly 0.0 for a collective that never overlaps another, so the
result equals the overlap-free formula bit for bit.

A node only blocks at a Wait or a blocking collective, and every node runs the
same sequence of events; so a collective issued after Wait(h) starts no
earlier than end(h), and end(h) is final once computed at Wait(h). The live
clock in :mod:`pysim.comm` and :func:`replay` drive the same :class:`Clock`
with the same calls in the same order, so they agree bit for bit; the
vectorised replay (many networks at once, for traces with no cross-stream
overlap) performs the same floating-point operations, and networks on which
collectives of different streams overlap are re-timed by :class:`Clock`.

Server rounds (:class:`pysim.trace.ServerRound`, asynchronous methods): a
parameter server lives on node ``server`` with its own timeline (its arithmetic
is not charged); its link is that node's. A node's update of b bytes leaves at
its arrive_i and queues FIFO (in order of leaving, then node) on the server's
downlink: tx = max(arrive_i, down_free), down_free = tx + X, arrives at
a_i = tx + X + L, with L and X = the latency and transfer parts of the lone
message i -> server (:meth:`pysim.network.Network.phase_parts`); the server's
own node hands its update over in memory (a_i = arrive_i). The round's ``order``
lists the pending updates the server applies now (by the frontier rule of
:meth:`Clock.server_order`: in arrival order, those no later message can
precede); the reply to node i leaves at max(a_i, up_free) on the server's
uplink, FIFO in that order, and node i's clock becomes max(arrive_i, reply
arrival). Other nodes: t_i = arrive_i. Messages of server rounds do not share
bandwidth with collectives (async methods here use no collectives).

TCP windows (a network with ``tcp`` set, :mod:`pysim.tcp`): a collective's cost is computed
when it starts, message by message on each connection's window (persistent per directed pair
of nodes, restarted after idle), and the windows change as it runs
(:func:`pysim.network.tcp_collective_parts`); server-round messages likewise at the time they
leave. Under cross-stream sharing a connection's last send is taken as the unshared schedule
has it. Live clock and replay make the same calls in the same order, so they still agree bit
for bit; the vectorised replay leaves such networks to :class:`Clock`.

Compute scaling (:class:`ComputeScaling`): node i's recorded compute is
divided by ``speed[i]`` and multiplied by a lognormal factor exp(jitter * z)
with z ~ N(0, 1) (median 1; sigma = jitter), one z per node and training step
drawn from ``numpy.random.default_rng([seed, step])``: every segment of step k
of node i gets the same factor. A node's waiting time is the time its clock
advances beyond its own scaled compute (in blocking collectives and Waits).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pysim.network import Network, collective_parts, tcp_collective_parts, tcp_message
from pysim.tcp import Connection
from pysim.trace import Collective, Event, ServerRound, Start, Trace, Wait, event_collective

SPEED_RANGE = (1e-3, 1e3)  # relative compute speeds a run may give (beyond them a run's times overflow)
MAX_JITTER = 3.0           # largest lognormal sigma of per-step compute


@dataclass(frozen=True)
class ComputeScaling:
    """Per-node compute speed factors and seeded per-step lognormal jitter (see the module
    docstring). ``speed=(1, 1, 1, 0.5)``: node 3 computes at half speed (twice the time);
    ``speed=()``: all 1."""

    speed: tuple[float, ...] = ()
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "speed", tuple(float(s) for s in self.speed))
        lo, hi = SPEED_RANGE
        if any(not lo <= s <= hi for s in self.speed):  # also refuses NaN
            raise ValueError(f"compute speeds must lie in [{lo:g}, {hi:g}] (relative to the profile), "
                             f"got {self.speed}")
        if not 0 <= self.jitter <= MAX_JITTER:
            raise ValueError(f"jitter (lognormal sigma) must lie in [0, {MAX_JITTER:g}], got {self.jitter}: "
                             f"at {MAX_JITTER:g} one step in a thousand is already "
                             f"{math.exp(3.09 * MAX_JITTER):.0f}x its median; stragglers are usually 0.05-0.5")

    @property
    def identity(self) -> bool:
        return self.jitter == 0 and all(s == 1.0 for s in self.speed)

    def speeds(self, nodes: int) -> np.ndarray:
        if not self.speed:
            return np.ones(nodes)
        if len(self.speed) != nodes:
            raise ValueError(f"compute scaling gives {len(self.speed)} speeds for a {nodes}-node run")
        return np.array(self.speed)

    def factors(self, step: int, nodes: int) -> np.ndarray:
        """The jitter factor of each node in training step ``step`` (0-based)."""
        return _jitter_row(self.jitter, self.seed, step, nodes)

    def scale(self, compute_s: np.ndarray, step: int) -> np.ndarray:
        """Scaled compute of one segment of step ``step``: a (nodes,) or (nodes, networks) array."""
        if self.identity:
            return compute_s
        nodes = compute_s.shape[0]
        shape = (nodes,) + (1,) * (compute_s.ndim - 1)
        return compute_s / self.speeds(nodes).reshape(shape) * self.factors(step, nodes).reshape(shape)


@functools.lru_cache(maxsize=4096)
def _jitter_row(jitter: float, seed: int, step: int, nodes: int) -> np.ndarray:
    if jitter == 0:
        return np.ones(nodes)
    row = np.exp(jitter * np.random.default_rng([seed, step]).standard_normal(nodes))
    row.flags.writeable = False
    return row


NO_SCALING = ComputeScaling()


class _Flight:
    """One collective from issue to end (times in s)."""

    __slots__ = ("issue", "stream", "cost", "latency", "cost_at", "start", "rem", "delay", "end")

    def __init__(self, issue: float, stream: int, cost: float, latency: float,
                 cost_at: Callable[[float], tuple[float, float]] | None = None) -> None:
        self.issue, self.stream, self.cost, self.latency = issue, stream, cost, latency
        self.cost_at = cost_at      # (cost, latency) from the start time, if they depend on it (TCP)
        self.start: float | None = None
        self.rem = cost - latency   # transfer work left (seconds at the full rate)
        self.delay = 0.0            # time lost to sharing
        self.end: float | None = None


class Links:
    """Collectives in flight on one network: FIFO per stream, fluid sharing across streams
    (see the module docstring). :meth:`issue` adds one; :meth:`finish` runs the shared
    timeline until it ends and returns its end time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.flights: list[_Flight] = []
        self.queue: dict[int, list[_Flight]] = {}    # issued, not started, per stream
        self.running: dict[int, _Flight] = {}        # started, not ended, per stream
        self.free: dict[int, float] = {}             # end of the last collective per stream

    def issue(self, issue_s: float, stream: int, cost_s: float, latency_s: float,
              cost_at: Callable[[float], tuple[float, float]] | None = None) -> int:
        """Adds a collective issued at ``issue_s``; ``cost_at``, if given, replaces ``cost_s`` and
        ``latency_s`` by what it returns for the collective's start time, once that is known."""
        f = _Flight(issue_s, stream, cost_s, latency_s, cost_at)
        self.flights.append(f)
        self.queue.setdefault(stream, []).append(f)
        return len(self.flights) - 1

    def finish(self, k: int) -> float:
        f = self.flights[k]
        while f.end is None:
            self._next_event()
        return f.end

    def _next_event(self) -> None:
        best_t, action = np.inf, None
        for s, q in self.queue.items():
            if q and s not in self.running:
                t = max(q[0].issue, self.free.get(s, 0.0))
                if t < best_t:
                    best_t, action = t, ("start", s)
        moving = [f for f in self.running.values() if self.now >= f.start + f.latency]
        for f in self.running.values():
            begin = f.start + f.latency
            if self.now < begin:
                if begin < best_t:
                    best_t, action = begin, ("transfer", f)
            elif self.now + f.rem * len(moving) < best_t:
                best_t, action = self.now + f.rem * len(moving), ("end", f)
        if action is None:
            raise RuntimeError("clock: a collective was waited for that can never end")
        dt = max(best_t - self.now, 0.0)
        k = len(moving)
        for f in moving:
            progress = dt / k
            f.rem = max(f.rem - progress, 0.0)
            if k > 1:
                f.delay += dt - progress
        self.now = max(self.now, best_t)
        kind, obj = action
        if kind == "start":
            f = self.queue[obj].pop(0)
            f.start = max(f.issue, self.free.get(obj, 0.0))
            if f.cost_at is not None:
                f.cost, f.latency = f.cost_at(f.start)
                f.rem = f.cost - f.latency
            self.running[obj] = f
        elif kind == "end":
            obj.end = obj.start + obj.cost + obj.delay
            self.free[obj.stream] = obj.end
            del self.running[obj.stream]


class ServerLinks:
    """A parameter server's state on the clock: when its downlink and uplink are free and the
    arrival time of every update it holds but has not applied (see the module docstring)."""

    def __init__(self) -> None:
        self.down_free = self.up_free = 0.0
        self.pending: dict[int, float] = {}

    def arrivals(self, net: Network, arrive: np.ndarray, e: ServerRound,
                 conns: dict[tuple[int, int], Connection]) -> dict[int, float]:
        """Every pending update's arrival once ``e``'s senders' updates are added (changes nothing)."""
        pending, _ = self._receive(net, arrive, e, conns, commit=False)
        return pending

    def _receive(self, net: Network, arrive: np.ndarray, e: ServerRound, conns: dict[tuple[int, int], Connection],
                 commit: bool) -> tuple[dict[int, float], float]:
        pending, free = dict(self.pending), self.down_free
        for i in sorted(e.senders, key=lambda i: (arrive[i], i)):
            if i in pending:
                raise ValueError(f"node {i} sent the server an update before its last one was answered")
            if i == e.server:
                pending[i] = float(arrive[i])
                continue
            tx = max(float(arrive[i]), free)
            latency, transfer = _message_parts(net, i, e.server, e.update_bytes[i], conns, tx, commit)
            free = tx + transfer
            pending[i] = tx + transfer + latency
        return pending, free

    def round(self, net: Network, arrive: np.ndarray, e: ServerRound,
              conns: dict[tuple[int, int], Connection]) -> np.ndarray:
        """Node clocks after server round ``e`` (see the module docstring)."""
        self.pending, self.down_free = self._receive(net, arrive, e, conns, commit=True)
        t = arrive.copy()
        for i in e.order:
            if i not in self.pending:
                raise ValueError(f"the server answers node {i}, whose update it does not hold")
            a = self.pending.pop(i)
            if i == e.server:
                t[i] = max(t[i], a)
                continue
            tx = max(a, self.up_free)
            latency, transfer = _message_parts(net, e.server, i, e.reply_bytes[i], conns, tx, True)
            self.up_free = tx + transfer
            t[i] = max(t[i], tx + transfer + latency)
        return t


def _message_parts(net: Network, src: int, dst: int, nbytes: int, conns: dict[tuple[int, int], Connection],
                   start_s: float, commit: bool) -> tuple[float, float]:
    """(latency, transfer) seconds of one message on its own, sent at ``start_s``; with a TCP
    model the transfer is the connection's (:func:`pysim.network.tcp_message`)."""
    if nbytes <= 0:
        return 0.0, 0.0
    seconds, latency = net.phase_parts([(src, dst, int(nbytes))])
    transfer = seconds - latency
    if net.tcp is None:
        return latency, transfer
    mss = net.framing.mss or net.tcp.mss
    segments = max(1, -(-(int(nbytes) + net.framing.per_message) // mss))
    return latency, tcp_message(net.tcp, conns, (src, dst), segments, latency, transfer, start_s,
                                net.tcp.cap_segments(mss), commit)


class Clock:
    """The clocks of ``nodes`` nodes on one network (see the module docstring). The live
    clock of a node process and :func:`replay` both call :meth:`advance` once per segment."""

    def __init__(self, network: Network, nodes: int, scaling: ComputeScaling | None = None) -> None:
        self.network = network.with_nodes(nodes)
        self.scaling = scaling or NO_SCALING
        self.scaling.speeds(nodes)        # checks the number of speeds
        self.nodes = nodes
        self.t = np.zeros(nodes)          # each node's clock (s)
        self.waited_s = np.zeros(nodes)   # time each node's clock advanced beyond its own compute
        self.step = 0                     # training steps ended so far
        self.links = Links()
        self._handles: dict[int, int] = {}    # Start handle -> index in self.links
        self.server = ServerLinks()
        self.conns: dict[tuple[int, int], Connection] = {}   # TCP windows per (src, dst), with a TCP model

    def scaled(self, compute_s: np.ndarray) -> np.ndarray:
        return self.scaling.scale(np.asarray(compute_s, dtype=np.float64), self.step)

    def advance(self, compute_s: np.ndarray, event: Event) -> np.ndarray:
        """One segment: raw compute per node (s), then ``event``. Returns the new clocks."""
        arrive = self.t + self.scaled(compute_s)
        if event is None:
            t = arrive
            self.step += 1
        elif isinstance(event, ServerRound):
            t = self.server.round(self.network, arrive, event, self.conns)
        elif isinstance(event, Wait):
            if event.id not in self._handles:
                raise ValueError(f"wait on handle {event.id}, which was not started or was already waited for")
            end = self.links.finish(self._handles.pop(event.id))
            t = np.maximum(arrive, end)
        else:
            coll = event_collective(event)
            if coll is None:
                raise ValueError(f"unknown trace event {event!r}")
            stream = event.stream if isinstance(event, Start) else 0
            k = self._issue(float(arrive.max()), stream, coll)
            if isinstance(event, Start):
                if event.id in self._handles:
                    raise ValueError(f"handle {event.id} started twice")
                self._handles[event.id] = k
                t = arrive
            else:
                t = np.full(self.nodes, self.links.finish(k))
        self.waited_s += t - arrive
        self.t = t
        return t

    def _issue(self, issue_s: float, stream: int, coll: Collective) -> int:
        if self.network.tcp is None:
            cost, latency = collective_parts(self.network, coll.op, coll.algo, coll.sizes, coll.groups)
            return self.links.issue(issue_s, stream, cost, latency)
        return self.links.issue(issue_s, stream, 0.0, 0.0, lambda start: tcp_collective_parts(
            self.network, self.conns, start, coll.op, coll.algo, coll.sizes, coll.groups))

    def server_order(self, arrive: np.ndarray, server: int, senders: Sequence[int], update_bytes: Sequence[int],
                     final: bool) -> tuple[int, ...]:
        """The pending updates (after ``senders``' arrive) the server applies in this round, in
        arrival order (ties: by node): those that arrived by the frontier F, the earliest time a
        node not awaiting a reply can send again (the earliest ``arrive`` among them); with
        ``final`` or when every node awaits a reply, all of them. Changes nothing."""
        pending = self.server.arrivals(self.network, arrive, ServerRound(server, tuple(senders),
                                                                         tuple(update_bytes), (), ()),
                                       self.conns)
        free = [i for i in range(self.nodes) if i not in pending]
        frontier = np.inf if final or not free else float(min(arrive[i] for i in free))
        return tuple(sorted((i for i, a in pending.items() if a <= frontier), key=lambda i: (pending[i], i)))


# ---------------------------------------------------------------- replay


@dataclass
class Timeline:
    """Result of a replay. Arrays are (segments, nodes) or, for many networks, (segments, nodes, networks)."""

    end_s: np.ndarray        # clock of each node at the end of each segment
    compute_s: np.ndarray    # scaled compute of each node in each segment
    step_end_s: np.ndarray   # max over nodes of the clock at each step end: (steps,) or (steps, networks)

    @property
    def total_s(self):
        return self.end_s[-1].max(axis=0)

    @property
    def wait_s(self) -> np.ndarray:
        """Per segment and node: time the node waited beyond its own compute (in blocking
        collectives and Waits)."""
        before = np.concatenate([np.zeros_like(self.end_s[:1]), self.end_s[:-1]])
        comp = self.compute_s if self.end_s.ndim == 2 else self.compute_s[..., None]
        return self.end_s - before - comp

    @property
    def waited_s(self) -> np.ndarray:
        """Total waiting time per node over the run: (nodes,) or (nodes, networks)."""
        return self.wait_s.sum(axis=0)


def compute_seconds(trace: Trace) -> np.ndarray:
    """Recorded compute per segment and node (s): measured, or costed by the run's compute profile."""
    return np.asarray(trace.compute_s, dtype=np.float64).reshape(len(trace.compute_s), trace.nodes)


def scaled_compute(trace: Trace, scaling: ComputeScaling) -> np.ndarray:
    """(segments, nodes) compute after :class:`ComputeScaling`, as the clock applies it."""
    comp = compute_seconds(trace)
    if scaling.identity:
        return comp
    out = np.empty_like(comp)
    step = 0
    for s, e in enumerate(trace.events):
        out[s] = scaling.scale(comp[s], step)
        if e is None:
            step += 1
    return out


def replay(trace: Trace, networks: Network | Sequence[Network], scaling: ComputeScaling | None = None
           ) -> Timeline:
    """Re-times a trace under one network or many at once (vectorised over networks; networks
    on which collectives of different streams overlap are re-timed one by one with the
    shared-bandwidth model)."""
    single = isinstance(networks, Network)
    nets = [networks] if single else list(networks)
    if not nets:
        raise ValueError("replay needs at least one network")
    nets = [net.with_nodes(trace.nodes) for net in nets]
    scaling = scaling or NO_SCALING
    scaling.speeds(trace.nodes)   # checks the number of speeds
    raw = compute_seconds(trace)
    comp = scaled_compute(trace, scaling)
    stateful = [j for j, net in enumerate(nets) if net.tcp is not None]   # TCP windows are state
    if trace.server_rounds() or len(stateful) == len(nets):   # so are a server's queues
        ends = np.empty((len(trace.events), trace.nodes, len(nets)))
        redo = range(len(nets))
    else:
        ends, starts_c, ends_c, streams = _replay_without_sharing(trace, nets, comp)
        redo = np.flatnonzero(_cross_stream_overlap(starts_c, ends_c)) if len(set(streams)) > 1 else []
        redo = sorted(set(redo) | set(stateful))
    for j in redo:
        clock = Clock(nets[j], trace.nodes, scaling)
        for s, e in enumerate(trace.events):
            ends[s, :, j] = clock.advance(raw[s], e)
    step_end = ends[trace.step_ends].max(axis=1) if trace.step_ends else np.zeros((0, len(nets)))
    if single:
        return Timeline(ends[:, :, 0], comp, step_end[:, 0])
    return Timeline(ends, comp, step_end)


def _replay_without_sharing(trace: Trace, nets: list[Network], comp: np.ndarray):
    """The clock vectorised over networks, every collective on its own (no sharing between
    streams): the same floating-point operations as :class:`Clock`. Returns the clocks
    (segments, nodes, networks), each collective's start and end (collectives, networks)
    and its stream."""
    nodes, m = trace.nodes, len(nets)
    unique: dict[Collective, np.ndarray] = {}   # a run repeats few distinct collectives
    for c in trace.collectives():
        if c not in unique:
            unique[c] = np.array([collective_parts(net, c.op, c.algo, c.sizes, c.groups)[0] for net in nets])
    t = np.zeros((nodes, m))
    ends = np.empty((len(trace.events), nodes, m))
    free: dict[int, np.ndarray] = {}
    handle_end: dict[int, np.ndarray] = {}
    starts_c, ends_c, streams = [], [], []
    zero = np.zeros(m)
    for s, e in enumerate(trace.events):
        arrive = t + comp[s][:, None]
        if e is None:
            t = arrive
        elif isinstance(e, Wait):
            t = np.maximum(arrive, handle_end.pop(e.id))
        else:
            coll = event_collective(e)
            stream = e.stream if isinstance(e, Start) else 0
            start = np.maximum(arrive.max(axis=0), free.get(stream, zero))
            end = start + unique[coll]
            free[stream] = end
            starts_c.append(start)
            ends_c.append(end)
            streams.append(stream)
            if isinstance(e, Start):
                handle_end[e.id] = end
                t = arrive
            else:
                t = np.broadcast_to(end, arrive.shape).copy()
        ends[s] = t
    if not starts_c:
        return ends, np.zeros((0, m)), np.zeros((0, m)), streams
    return ends, np.array(starts_c), np.array(ends_c), streams


def _cross_stream_overlap(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per network: do any two collectives overlap in time? (Collectives of one stream never
    do, so an overlap is between streams.) starts/ends: (collectives, networks)."""
    order = np.argsort(starts, axis=0, kind="stable")
    s = np.take_along_axis(starts, order, axis=0)
    e = np.take_along_axis(ends, order, axis=0)
    if len(s) < 2:
        return np.zeros(starts.shape[1], dtype=bool)
    reach = np.maximum.accumulate(e, axis=0)[:-1]
    return (s[1:] < reach).any(axis=0)
