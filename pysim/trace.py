"""Traces: what n nodes did during a run, independent of the network.

A trace is a sequence of *segments*, the same on every node: node i computes
``compute_s[s][i]`` seconds (``flops[s][i]`` FLOPs), then segment s ends with
the event ``events[s]``:

- ``None``: the end of a training step (``step_ends`` lists those segments);
- :class:`Collective`: a blocking collective (start, then wait at once);
- :class:`Start`: a non-blocking collective is issued on a stream and runs
  while the node goes on computing;
- :class:`Wait`: the node needs the result of the collective started with the
  same ``id``;
- :class:`ServerRound`: point-to-point messages to and from a parameter server
  (asynchronous methods): nodes send updates, the server answers those it applies.

A collective's ``sizes`` are its exact packet bytes per member and its
``groups``, if any, the disjoint groups it runs within (see
:mod:`pysim.schedule`). How long anything takes is the clock's business
(:mod:`pysim.clock`). JSON form (version 3): events are ``null``,
``[op, algo, sizes]`` (blocking), ``["start", id, stream, op, algo, sizes]``
``["wait", id]`` or ``["server", server, senders, update_bytes, order,
reply_bytes]``; a grouped collective appends its groups (a list of lists of
node indices) to its list. Versions 1 (blocking collectives only), 2 (no
groups) and 3 (no server rounds) still load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from pysim.network import Framing, Network, framing_bytes
from pysim.schedule import Groups, bytes_received, bytes_sent, check_collective, check_groups

TRACE_VERSION = 4
READS_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Collective:
    """One collective: op, algorithm, packet bytes per member and the groups it runs within
    (None: one group of all members; see :mod:`pysim.schedule`). ``groups`` is stored
    normalised (tuples; one group of all members in rank order is None)."""

    op: str
    algo: str
    sizes: tuple[int, ...]
    groups: Groups | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", check_groups(self.groups, len(self.sizes)))


@dataclass(frozen=True)
class Start:
    """A non-blocking collective issued on ``stream`` (collectives on one stream run in
    issue order); ``id`` is its handle for the matching :class:`Wait`."""

    id: int
    collective: Collective
    stream: int = 0


@dataclass(frozen=True)
class Wait:
    """The node blocks until the collective started with handle ``id`` has ended."""

    id: int


@dataclass(frozen=True)
class ServerRound:
    """One round of point-to-point messages with a parameter server that lives on node ``server``
    (asynchronous methods; the clock's semantics are in :mod:`pysim.clock`).

    ``senders``: the nodes sending the server an update now, of ``update_bytes[i]`` packet bytes
    (the server's own node hands its update over in memory: 0 bytes). ``order``: the nodes whose
    pending updates the server applies in this round, in the order it applies them (each update
    arrived by now); each gets a reply of ``reply_bytes[i]`` bytes (0 for the server's own node)."""

    server: int
    senders: tuple[int, ...]
    update_bytes: tuple[int, ...]
    order: tuple[int, ...]
    reply_bytes: tuple[int, ...]

    def messages(self) -> list[tuple[int, int, int]]:
        """(src, dst, bytes) of every message that crosses the network in this round."""
        ups = [(i, self.server, self.update_bytes[i]) for i in self.senders if i != self.server]
        return ups + [(self.server, i, self.reply_bytes[i]) for i in self.order if i != self.server]


Event = Union[Collective, Start, Wait, ServerRound, None]  # noqa: UP007 (a runtime alias)


def event_collective(event: Event) -> Collective | None:
    """The collective an event issues (blocking or started), else None."""
    if isinstance(event, Collective):
        return event
    if isinstance(event, Start):
        return event.collective
    return None


@dataclass
class Trace:
    """What n nodes did during a run, network-free (see the module docstring).

    ``compute_s[s][i]`` and ``flops[s][i]``: node i's compute before segment s ends.
    ``events[s]``: the event ending segment s. ``step_ends[k]``: the segment ending step k+1.
    """

    nodes: int
    compute_s: list[list[float]] = field(default_factory=list)
    flops: list[list[float]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)

    def collectives(self) -> list[Collective]:
        """Every collective of the run, blocking or started, in issue order."""
        return [c for c in map(event_collective, self.events) if c is not None]

    def server_rounds(self) -> list[ServerRound]:
        return [e for e in self.events if isinstance(e, ServerRound)]

    def streams(self) -> set[int]:
        """The streams collectives ran on (0: blocking collectives)."""
        return {e.stream if isinstance(e, Start) else 0 for e in self.events if event_collective(e) is not None}

    def check(self) -> None:
        """Raises ValueError unless every Wait follows its Start, handles are unique and the
        segment lists agree in length."""
        if not (len(self.compute_s) == len(self.flops) == len(self.events)):
            raise ValueError("trace is malformed: segment lists differ in length")
        started: set[int] = set()
        open_: set[int] = set()
        for s, e in enumerate(self.events):
            c = event_collective(e)
            if c is not None:
                check_collective(c.op, c.algo)
                if len(c.sizes) != self.nodes:
                    raise ValueError(f"segment {s}: collective over {len(c.sizes)} members in a {self.nodes}-node "
                                     "trace")
            if isinstance(e, ServerRound):
                _check_server_round(e, self.nodes, s)
            if isinstance(e, Start):
                if e.id in started:
                    raise ValueError(f"segment {s}: handle {e.id} started twice")
                started.add(e.id)
                open_.add(e.id)
            elif isinstance(e, Wait):
                if e.id not in open_:
                    raise ValueError(f"segment {s}: wait on handle {e.id}, which was not started or was "
                                     "already waited for")
                open_.remove(e.id)
        if any(not 0 <= k < len(self.events) or self.events[k] is not None for k in self.step_ends):
            raise ValueError("trace is malformed: a step end is not a step-end segment")

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        return {"version": TRACE_VERSION, "nodes": self.nodes, "compute_s": self.compute_s, "flops": self.flops,
                "events": [event_to_json(e) for e in self.events], "step_ends": self.step_ends}

    @classmethod
    def from_json(cls, d: dict) -> Trace:
        version = d.get("version") if isinstance(d, dict) else type(d).__name__
        if version not in READS_VERSIONS:
            raise ValueError(f"trace has format version {version!r}, this pysim reads versions "
                             f"{', '.join(map(str, READS_VERSIONS))}; re-record the run with this version")
        try:
            raw = d["collectives"] if version == 1 else d["events"]
            events = [event_from_json(e) for e in raw]
            t = cls(int(d["nodes"]), d["compute_s"], d["flops"], events, [int(s) for s in d["step_ends"]])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"trace is malformed ({e}); was it written by pysim?") from None
        t.check()
        return t

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON trace ({e})") from None

    # ------------------------------------------------------------ bytes

    def bytes_per_node(self) -> tuple[list[int], list[int]]:
        """Total packet bytes (sent, received) per node over the run."""
        sent = self._summed(lambda c: bytes_sent(c.op, c.algo, c.sizes, c.groups))
        recv = self._summed(lambda c: bytes_received(c.op, c.algo, c.sizes, c.groups))
        for e in self.server_rounds():
            for src, dst, b in e.messages():
                sent[src] += b
                recv[dst] += b
        return sent, recv

    def _summed(self, per_node: Callable[[Collective], Sequence[int]]) -> list[int]:
        """``per_node(c)`` summed over the trace's collectives, node by node; each distinct
        collective is computed once (a run repeats a few collectives many times)."""
        total = np.zeros(self.nodes, dtype=np.int64)
        made: dict[Collective, np.ndarray] = {}
        for c in self.collectives():
            if c not in made:
                made[c] = np.array(per_node(c), dtype=np.int64)
            total += made[c]
        return [int(b) for b in total]

    def framing_bytes_per_node(self, framing: Framing | Network) -> list[int]:
        """Total framing bytes each node sends over the run (on top of its packet bytes)."""
        out = self._summed(lambda c: framing_bytes(framing, c.op, c.algo, c.sizes, c.groups))
        f = framing.framing if isinstance(framing, Network) else framing
        for e in self.server_rounds():
            for src, dst, b in e.messages():
                out[src] += f.overhead(b)
                out[dst] += f.acks(b)
        return out


def _check_server_round(e: ServerRound, nodes: int, s: int) -> None:
    if not 0 <= e.server < nodes or len(e.update_bytes) != nodes or len(e.reply_bytes) != nodes:
        raise ValueError(f"segment {s}: a server round's node lists do not match a {nodes}-node trace")
    for name, members in (("senders", e.senders), ("order", e.order)):
        if len(set(members)) != len(members) or not all(0 <= i < nodes for i in members):
            raise ValueError(f"segment {s}: a server round's {name} are not distinct nodes")
    if any(b < 0 for b in e.update_bytes + e.reply_bytes):
        raise ValueError(f"segment {s}: a server round with negative bytes")


def _collective_to_json(c: Collective) -> list:
    out = [c.op, c.algo, list(c.sizes)]
    return out if c.groups is None else [*out, [list(g) for g in c.groups]]


def _collective_from_json(e: list) -> Collective:
    if len(e) not in (3, 4):
        raise ValueError(f"a collective is [op, algo, sizes] or [op, algo, sizes, groups], got {e!r}")
    return Collective(e[0], e[1], tuple(map(int, e[2])), None if len(e) == 3 else e[3])


def event_to_json(e: Event):
    if e is None:
        return None
    if isinstance(e, Collective):
        return _collective_to_json(e)
    if isinstance(e, Start):
        return ["start", e.id, e.stream, *_collective_to_json(e.collective)]
    if isinstance(e, ServerRound):
        return ["server", e.server, list(e.senders), list(e.update_bytes), list(e.order), list(e.reply_bytes)]
    return ["wait", e.id]


def event_from_json(e) -> Event:
    if e is None:
        return None
    if e[0] == "start":
        return Start(int(e[1]), _collective_from_json(e[3:]), int(e[2]))
    if e[0] == "wait":
        return Wait(int(e[1]))
    if e[0] == "server":
        ints = [tuple(int(v) for v in part) for part in e[2:6]]
        return ServerRound(int(e[1]), *ints)
    return _collective_from_json(e)


def segments_from_json(records: Sequence[Sequence[tuple[float, float, Any]]]) -> list[list[tuple[float, float, Event]]]:
    """Every node's segments (compute_s, flops, event as JSON) with their events read back; a
    JSON object several nodes share (a process's nodes send one object for a collective they
    ran together) is read once, and the nodes get the same event."""
    made: dict[int, tuple[Any, Event]] = {}   # id of a JSON object -> (the object, kept alive; its event)

    def event(e: Any) -> Event:
        if e is None:
            return None
        key = id(e)
        if key not in made:
            made[key] = (e, event_from_json(e))
        return made[key][1]

    return [[(c, f, event(e)) for c, f, e in segments] for segments in records]


def trace_from_nodes(segments: Sequence[Sequence[tuple[float, float, Event]]], step_ends: Sequence[int]) -> Trace:
    """Assembles a trace from each node's own record (``Comm.segments``: per segment
    (compute_s, flops, event))."""
    nodes = len(segments)
    lengths = {len(s) for s in segments}
    if len(lengths) != 1:
        raise ValueError(f"nodes recorded different numbers of segments {sorted(lengths)}: "
                         "the strategy did not run the same collectives on every node")
    trace = Trace(nodes, step_ends=list(step_ends))
    for parts in zip(*segments, strict=True):
        first = parts[0][2]
        if any(p[2] is not first and p[2] != first for p in parts):   # shared objects: no compare
            raise ValueError(f"nodes disagree on a collective: {set(p[2] for p in parts)}")
        trace.compute_s.append([p[0] for p in parts])
        trace.flops.append([p[1] for p in parts])
        trace.events.append(parts[0][2])
    trace.check()
    return trace
