"""Traces and the virtual clock: a pure function from (trace, network) to time.

A :class:`Trace` is what the nodes did, independent of the network: for each
*segment*, the compute each node spent before it (seconds, and FLOPs) and the
collective that ends it (op, algorithm, exact bytes per member). Timing is

    arrive_i = t_i + compute_i
    start    = max over members of arrive_i     (the last member to arrive)
    t_i      = start + collective_s(network, ...) for every member

:func:`advance` is that one step. The live clock in the comm layer and the
offline :func:`replay` both call it, so they agree bit for bit. Steps of
training end at recorded segments, so a replay yields simulated time per step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pysim.network import Network, bytes_received, bytes_sent, collective_s

TRACE_VERSION = 1


@dataclass(frozen=True)
class Collective:
    """One collective: op, algorithm, and bytes per member (see ``collective_s``)."""

    op: str
    algo: str
    sizes: tuple[int, ...]


@dataclass
class Trace:
    """What n nodes did during a run, network-free.

    ``compute_s[s][i]`` and ``flops[s][i]``: node i's compute before segment s.
    ``collectives[s]``: the collective ending segment s (None for the final one).
    ``step_ends[k]``: index of the segment whose end finishes training step k+1.
    """

    nodes: int
    compute_s: list[list[float]] = field(default_factory=list)
    flops: list[list[float]] = field(default_factory=list)
    collectives: list[Collective | None] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["collectives"] = [None if c is None else [c.op, c.algo, list(c.sizes)] for c in self.collectives]
        d["version"] = TRACE_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict) -> Trace:
        if not isinstance(d, dict) or d.get("version") != TRACE_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"trace has format version {got!r}, this pysim reads version {TRACE_VERSION}; "
                             "re-record the run with this version")
        try:
            colls = [None if c is None else Collective(c[0], c[1], tuple(int(b) for b in c[2]))
                     for c in d["collectives"]]
            t = cls(int(d["nodes"]), d["compute_s"], d["flops"], colls, [int(s) for s in d["step_ends"]])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"trace is malformed ({e}); was it written by pysim?") from None
        if not (len(t.compute_s) == len(t.flops) == len(t.collectives)):
            raise ValueError("trace is malformed: segment lists differ in length")
        return t

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON trace ({e})") from None

    def bytes_per_node(self) -> tuple[list[int], list[int]]:
        """Total bytes (sent, received) per node over the run."""
        sent, recv = [0] * self.nodes, [0] * self.nodes
        for c in self.collectives:
            if c is not None:
                for i, (s, r) in enumerate(zip(bytes_sent(c.op, c.algo, c.sizes),
                                               bytes_received(c.op, c.algo, c.sizes), strict=True)):
                    sent[i] += s
                    recv[i] += r
        return sent, recv


def advance(t: np.ndarray, compute_s: np.ndarray, cost_s: float | np.ndarray | None) -> np.ndarray:
    """One segment of the virtual clock: every node computes, then (if there is a
    collective of ``cost_s`` seconds) all wait for the last one and finish together.
    Works on a vector of nodes or a (nodes, networks) array."""
    arrive = t + compute_s
    if cost_s is None:
        return arrive
    return np.broadcast_to(arrive.max(axis=0) + cost_s, arrive.shape).copy()


@dataclass
class Timeline:
    """Result of a replay. Arrays are (segments, nodes) or, for many networks, (segments, nodes, networks)."""

    end_s: np.ndarray        # clock of each node at the end of each segment
    compute_s: np.ndarray    # compute of each node in each segment
    step_end_s: np.ndarray   # max over nodes of the clock at each step end: (steps,) or (steps, networks)

    @property
    def total_s(self):
        return self.end_s[-1].max(axis=0)


def compute_seconds(trace: Trace, device: str | None = None) -> np.ndarray:
    """Compute per segment and node: as recorded, or FLOPs on a device profile."""
    if device is None:
        return np.asarray(trace.compute_s, dtype=np.float64).reshape(len(trace.compute_s), trace.nodes)
    from pysim.compute import device_flops_per_s

    return np.asarray(trace.flops, dtype=np.float64).reshape(len(trace.flops), trace.nodes) / device_flops_per_s(
        device)


def replay(trace: Trace, networks: Network | Sequence[Network], device: str | None = None) -> Timeline:
    """Re-times a trace under one network or many at once (vectorised over networks)."""
    single = isinstance(networks, Network)
    nets = [networks] if single else list(networks)
    if not nets:
        raise ValueError("replay needs at least one network")
    nets = [net.with_nodes(trace.nodes) for net in nets]
    comp = compute_seconds(trace, device)
    unique: dict[Collective, np.ndarray] = {}
    for c in trace.collectives:  # a run repeats few distinct collectives: cost each once per network
        if c is not None and c not in unique:
            unique[c] = np.array([collective_s(net, c.op, c.algo, c.sizes) for net in nets])
    costs = [None if c is None else unique[c] for c in trace.collectives]
    t = np.zeros((trace.nodes, len(nets)))
    ends = np.empty((len(costs), trace.nodes, len(nets)))
    for s, cost in enumerate(costs):
        t = advance(t, comp[s][:, None], cost)
        ends[s] = t
    step_end = ends[trace.step_ends].max(axis=1) if trace.step_ends else np.zeros((0, len(nets)))
    if single:
        return Timeline(ends[:, :, 0], comp, step_end[:, 0])
    return Timeline(ends, comp, step_end)


def trace_from_nodes(segments: Sequence[Sequence[tuple[float, float, Collective | None]]],
                     step_ends: Sequence[int]) -> Trace:
    """Assembles a trace from each node's own record (``Comm.segments``)."""
    nodes = len(segments)
    lengths = {len(s) for s in segments}
    if len(lengths) != 1:
        raise ValueError(f"nodes recorded different numbers of segments {sorted(lengths)}: "
                         "the strategy did not run the same collectives on every node")
    trace = Trace(nodes, step_ends=list(step_ends))
    for parts in zip(*segments, strict=True):
        colls = {p[2] for p in parts}
        if len(colls) != 1:
            raise ValueError(f"nodes disagree on a collective: {colls}")
        trace.compute_s.append([p[0] for p in parts])
        trace.flops.append([p[1] for p in parts])
        trace.collectives.append(parts[0][2])
    return trace
