"""Links, topologies and the alpha-beta cost of collectives.

Units: bandwidth in bits/s, latency in seconds, message sizes in bytes.

A collective is a sequence of *phases*; in one phase a set of messages
(src, dst, bytes) is in flight at once. A phase takes

    max over its messages of latency(src, dst)
  + max over network resources of 8 * (bytes crossing it) / (its bandwidth)

where the resources are each node's uplink and downlink (every message uses
its sender's uplink and receiver's downlink), and in a two-tier topology the
shared inter-group link of each group for messages that leave or enter it.
Every message also carries ``overhead_bytes`` (framing). On a uniform network
with bandwidth beta and latency alpha this gives the textbook formulas:

- ring all-reduce of chunk packets of c bytes:   2(n-1) * (alpha + 8c/beta)
  (c ~= S/n + header for a tensor of S bytes)
- ring reduce-scatter:                           (n-1) * (alpha + 8c/beta)
- ring all-gather of packets s_i:                sum over the n-1 steps of
  alpha + 8 max_i s_(i-t mod n) / beta; equal sizes: (n-1) * (alpha + 8s/beta)
- broadcast of S bytes, star (root sends to all): alpha + 8(n-1)S/beta
- broadcast, binomial tree:                       ceil(log2 n) * (alpha + 8S/beta)
- parameter server (star) all-reduce, root = node 0, packets of S bytes:
  2 * (alpha + 8(n-1)S/beta): the root's downlink takes n-1 packets, then its
  uplink sends n-1 results.

On heterogeneous links the slowest resource on each phase's path bounds it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

_BANDWIDTH_UNITS = {
    "bps": 1.0, "bit": 1.0, "b": 1.0, "bit/s": 1.0, "b/s": 1.0,
    "kbps": 1e3, "kbit": 1e3, "kb": 1e3, "kbit/s": 1e3, "kb/s": 1e3,
    "mbps": 1e6, "mbit": 1e6, "mb": 1e6, "mbit/s": 1e6, "mb/s": 1e6,
    "gbps": 1e9, "gbit": 1e9, "gb": 1e9, "gbit/s": 1e9, "gb/s": 1e9,
    "tbps": 1e12, "tbit": 1e12, "tb": 1e12, "tbit/s": 1e12, "tb/s": 1e12,
}
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def parse_bandwidth(value: str | float | int) -> float:
    """Bits per second from ``"100Mbit"``, ``"1Gbps"``, ``"25GB/s"`` (bytes: capital B + "/s")
    or a plain number of bits/s. Raises ValueError for zero, negative or unknown units."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bps = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([A-Za-z/]*)\s*", value)
        if not m:
            raise ValueError(f"bad bandwidth {value!r}: expected a number and a unit, "
                             "e.g. '100Mbit', '1Gbps', '25GB/s'")
        number, unit = float(m.group(1)), m.group(2)
        scale = 1.0
        if unit:
            byte_unit = unit.endswith("B") or unit.endswith("B/s")  # capital B: bytes
            key = unit.lower()
            if key not in _BANDWIDTH_UNITS:
                raise ValueError(f"bad bandwidth {value!r}: unknown unit {unit!r}; use bit/s units "
                                 "(Kbit, Mbit, Gbit, Gbps) or bytes/s (MB/s, GB/s)")
            scale = _BANDWIDTH_UNITS[key] * (8.0 if byte_unit else 1.0)
        bps = number * scale
    else:
        raise ValueError(f"bad bandwidth {value!r}: expected a string like '1Gbps' or a number of bits/s")
    if not math.isfinite(bps) or bps <= 0:
        raise ValueError(f"bad bandwidth {value!r}: must be a positive, finite rate")
    return bps


def parse_latency(value: str | float | int) -> float:
    """Seconds from ``"20ms"``, ``"150us"``, ``"0.1s"`` or a plain number of seconds (>= 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        s = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([a-zµ]*)\s*", value)
        if not m or (m.group(2) and m.group(2) not in _LATENCY_UNITS):
            raise ValueError(f"bad latency {value!r}: expected a number and a unit, e.g. '20ms', '150us', '0.1s'")
        s = float(m.group(1)) * _LATENCY_UNITS.get(m.group(2) or "s", 1.0)
    else:
        raise ValueError(f"bad latency {value!r}: expected a string like '20ms' or a number of seconds")
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"bad latency {value!r}: must be a finite number of seconds >= 0")
    return s


def format_bandwidth(bps: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("Kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


@dataclass(frozen=True)
class Link:
    """A node's access link: uplink and downlink bandwidth (bits/s), one-way latency (s)."""

    up_bps: float
    down_bps: float
    latency_s: float

    @classmethod
    def of(cls, bandwidth: str | float, latency: str | float = 0.0, down: str | float | None = None) -> Link:
        up = parse_bandwidth(bandwidth)
        return cls(up, parse_bandwidth(down) if down is not None else up, parse_latency(latency))


@dataclass(frozen=True)
class Network:
    """A topology of n nodes.

    ``links[i]`` is node i's access link. With ``group_size`` set (two tiers),
    nodes [g*k, g*(k+1)) form group k; messages inside a group use the access
    links, messages between groups also cross both groups' shared ``inter``
    link (bandwidth per direction; the message's latency is the largest of the
    links it crosses). ``overhead_bytes`` is added to every message.
    """

    links: tuple[Link, ...]
    inter: Link | None = None
    group_size: int | None = None
    overhead_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError("a network needs at least one node")
        if self.overhead_bytes < 0:
            raise ValueError(f"overhead_bytes must be >= 0, got {self.overhead_bytes}")
        if (self.inter is None) != (self.group_size is None):
            raise ValueError("a two-tier network needs both an inter-group link and a group size")
        if self.group_size is not None and (self.group_size < 1 or len(self.links) % self.group_size):
            raise ValueError(f"group size {self.group_size} must divide the {len(self.links)} nodes")

    @property
    def n(self) -> int:
        return len(self.links)

    @classmethod
    def uniform(cls, n: int, bandwidth: str | float, latency: str | float = 0.0, overhead_bytes: int = 0) -> Network:
        """n nodes, each on the same link."""
        _check_nodes(n)
        return cls((Link.of(bandwidth, latency),) * n, overhead_bytes=overhead_bytes)

    @classmethod
    def per_node(cls, links: Sequence[Link], overhead_bytes: int = 0) -> Network:
        """Heterogeneous nodes: one (up, down, latency) link each."""
        return cls(tuple(links), overhead_bytes=overhead_bytes)

    @classmethod
    def two_tier(cls, n: int, group_size: int, intra_bandwidth: str | float, intra_latency: str | float,
                 inter_bandwidth: str | float, inter_latency: str | float, overhead_bytes: int = 0) -> Network:
        """Groups of ``group_size`` nodes on a fast link, joined by a slow inter-group link."""
        _check_nodes(n)
        return cls((Link.of(intra_bandwidth, intra_latency),) * n, Link.of(inter_bandwidth, inter_latency),
                   group_size, overhead_bytes)

    def with_nodes(self, n: int) -> Network:
        """The same kind of network for n nodes (uniform and two-tier only)."""
        if self.n == n:
            return self
        if len(set(self.links)) != 1:
            raise ValueError(f"this heterogeneous network describes {self.n} nodes, the run has {n}")
        return Network((self.links[0],) * n, self.inter, self.group_size, self.overhead_bytes)

    def describe(self) -> str:
        first = self.links[0]
        if self.inter is not None:
            return (f"two-tier, groups of {self.group_size}: intra {format_bandwidth(first.up_bps)} "
                    f"{first.latency_s * 1e3:g} ms, inter {format_bandwidth(self.inter.up_bps)} "
                    f"{self.inter.latency_s * 1e3:g} ms")
        if len(set(self.links)) == 1:
            return f"{format_bandwidth(first.up_bps)}, {first.latency_s * 1e3:g} ms"
        return "per-node: " + "; ".join(f"{format_bandwidth(lk.up_bps)}/{format_bandwidth(lk.down_bps)} "
                                        f"{lk.latency_s * 1e3:g} ms" for lk in self.links)

    def group(self, i: int) -> int:
        return 0 if self.group_size is None else i // self.group_size

    def phase_s(self, messages: Sequence[tuple[int, int, int]]) -> float:
        """Seconds for one phase of concurrent messages (src, dst, bytes)."""
        if not messages:
            return 0.0
        load: dict[tuple, float] = {}
        latency = 0.0
        for src, dst, nbytes in messages:
            bits = 8.0 * (nbytes + self.overhead_bytes)
            a, b = self.links[src], self.links[dst]
            lat = max(a.latency_s, b.latency_s)
            load[("up", src)] = load.get(("up", src), 0.0) + bits / a.up_bps
            load[("down", dst)] = load.get(("down", dst), 0.0) + bits / b.down_bps
            if self.inter is not None and self.group(src) != self.group(dst):
                lat = max(lat, self.inter.latency_s)
                gs, gd = self.group(src), self.group(dst)
                load[("out", gs)] = load.get(("out", gs), 0.0) + bits / self.inter.up_bps
                load[("in", gd)] = load.get(("in", gd), 0.0) + bits / self.inter.down_bps
            latency = max(latency, lat)
        return latency + max(load.values())


def _check_nodes(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be an integer >= 1, got {n!r}")


# ---------------------------------------------------------------- collectives

ALGORITHMS = {
    "allreduce": ("ring", "star"),
    "allgather": ("ring",),
    "reduce_scatter": ("ring",),
    "broadcast": ("star", "tree"),
}


def ring_allreduce_s(net: Network, chunk_bytes: Sequence[int]) -> float:
    """Ring all-reduce: n-1 reduce-scatter steps, then n-1 all-gather steps. In step t
    node i sends chunk (i - t) mod n (reduce-scatter) or (i + 1 - t) mod n (all-gather)
    to node i+1. Uniform: 2(n-1)(alpha + 8c/beta)."""
    n = len(chunk_bytes)
    return ring_reduce_scatter_s(net, chunk_bytes) + sum(
        net.phase_s([(i, (i + 1) % n, chunk_bytes[(i + 1 - t) % n]) for i in range(n)]) for t in range(n - 1)
    )


def ring_reduce_scatter_s(net: Network, chunk_bytes: Sequence[int]) -> float:
    """Ring reduce-scatter: n-1 steps; in step t node i sends chunk (i - t) mod n to i+1.
    Uniform: (n-1)(alpha + 8c/beta)."""
    n = len(chunk_bytes)
    return sum(net.phase_s([(i, (i + 1) % n, chunk_bytes[(i - t) % n]) for i in range(n)]) for t in range(n - 1))


def ring_allgather_s(net: Network, packet_bytes: Sequence[int]) -> float:
    """Ring all-gather of unequal packets: n-1 steps; in step t node i forwards packet
    (i - t) mod n to i+1. Each step waits for its largest message on its slowest link."""
    return ring_reduce_scatter_s(net, packet_bytes)


def star_allreduce_s(net: Network, packet_bytes: Sequence[int]) -> float:
    """Parameter server at node 0: every other node sends its packet to node 0, which
    sends the reduced packet (node 0's size) back to each. Uniform: 2(alpha + 8(n-1)S/beta)."""
    n = len(packet_bytes)
    gather = net.phase_s([(j, 0, packet_bytes[j]) for j in range(1, n)])
    return gather + star_broadcast_s(net, packet_bytes[0], n)


def star_broadcast_s(net: Network, nbytes: int, n: int, root: int = 0) -> float:
    """Root sends the whole message to each other node at once. Uniform: alpha + 8(n-1)S/beta."""
    return net.phase_s([(root, j, nbytes) for j in range(n) if j != root])


def tree_broadcast_s(net: Network, nbytes: int, n: int, root: int = 0) -> float:
    """Binomial tree: in round r every node that has the message sends it to the node
    2^r further on. Uniform: ceil(log2 n)(alpha + 8S/beta)."""
    total, have = 0.0, 1
    while have < n:
        total += net.phase_s([((root + i) % n, (root + i + have) % n, nbytes) for i in range(min(have, n - have))])
        have *= 2
    return total


@functools.lru_cache(maxsize=65536)
def collective_s(net: Network, op: str, algo: str, sizes: tuple[int, ...]) -> float:
    """Seconds one collective takes on ``net``. ``sizes`` are bytes per member: chunk
    packets for ring all-reduce and reduce-scatter, each member's packet otherwise (for
    broadcast, the root's message first). Cached: the replay of long traces calls this
    with few distinct arguments."""
    if len(sizes) != net.n:
        raise ValueError(f"collective over {len(sizes)} members on a network of {net.n} nodes")
    if op not in ALGORITHMS or algo not in ALGORITHMS[op]:
        raise ValueError(f"unknown collective {op}/{algo}; known: {ALGORITHMS}")
    if net.n == 1:
        return 0.0
    if op == "allreduce":
        return ring_allreduce_s(net, sizes) if algo == "ring" else star_allreduce_s(net, sizes)
    if op == "allgather":
        return ring_allgather_s(net, sizes)
    if op == "reduce_scatter":
        return ring_reduce_scatter_s(net, sizes)
    return star_broadcast_s(net, sizes[0], net.n) if algo == "star" else tree_broadcast_s(net, sizes[0], net.n)


def bytes_sent(op: str, algo: str, sizes: Sequence[int]) -> list[int]:
    """Bytes each member sends in one collective (the packets that really crossed)."""
    n = len(sizes)
    if n == 1:
        return [0]
    if op == "allreduce" and algo == "ring":
        return [sum(sizes[(i - t) % n] for t in range(n - 1)) + sum(sizes[(i + 1 - t) % n] for t in range(n - 1))
                for i in range(n)]
    if op == "allreduce" and algo == "star":
        return [(n - 1) * sizes[0]] + list(sizes[1:])
    if op in ("allgather", "reduce_scatter"):
        return [sum(sizes[(i - t) % n] for t in range(n - 1)) for i in range(n)]
    if op == "broadcast":
        if algo == "star":
            return [(n - 1) * sizes[0]] + [0] * (n - 1)
        sent, have = [0] * n, 1
        while have < n:
            for i in range(min(have, n - have)):
                sent[i] += sizes[0]
            have *= 2
        return sent
    raise ValueError(f"unknown collective {op}/{algo}")


def bytes_received(op: str, algo: str, sizes: Sequence[int]) -> list[int]:
    """Bytes each member receives in one collective."""
    n = len(sizes)
    if n == 1:
        return [0]
    if op == "allreduce" and algo == "ring":
        return [sum(sizes[(i - 1 - t) % n] for t in range(n - 1)) + sum(sizes[(i - t) % n] for t in range(n - 1))
                for i in range(n)]
    if op == "allreduce" and algo == "star":
        return [sum(sizes[1:])] + [sizes[0]] * (n - 1)
    if op in ("allgather", "reduce_scatter"):
        return [sum(sizes[(i - 1 - t) % n] for t in range(n - 1)) for i in range(n)]
    if op == "broadcast":
        return [0] + [sizes[0]] * (n - 1)
    raise ValueError(f"unknown collective {op}/{algo}")


def parse_network(n: int, bandwidth: str | float = "100Mbit", latency: str | float = "20ms",
                  topology: str = "uniform", overhead_bytes: int = 0) -> Network:
    """A network from command-line style settings.

    ``topology``: ``uniform``; ``two-tier:G:BW:LAT`` (groups of G nodes on
    ``bandwidth``/``latency``, joined by a BW/LAT inter-group link); or
    ``slow-node:I:BW:LAT`` (node I on a slower link, the rest on the default).
    """
    _check_nodes(n)
    kind, *args = topology.split(":")
    if kind == "uniform" and not args:
        return Network.uniform(n, bandwidth, latency, overhead_bytes)
    if kind == "two-tier" and len(args) == 3:
        try:
            g = int(args[0])
        except ValueError:
            raise ValueError(f"bad topology {topology!r}: group size must be an integer") from None
        return Network.two_tier(n, g, bandwidth, latency, args[1], args[2], overhead_bytes)
    if kind == "slow-node" and len(args) == 3:
        try:
            i = int(args[0])
        except ValueError:
            raise ValueError(f"bad topology {topology!r}: node index must be an integer") from None
        if not 0 <= i < n:
            raise ValueError(f"bad topology {topology!r}: node {i} does not exist in a run of {n} nodes")
        links = [Link.of(bandwidth, latency)] * n
        links[i] = Link.of(args[1], args[2])
        return Network.per_node(links, overhead_bytes)
    raise ValueError(f"bad topology {topology!r}: use 'uniform', 'two-tier:G:BW:LAT' (e.g. two-tier:2:100Mbit:50ms) "
                     "or 'slow-node:I:BW:LAT' (e.g. slow-node:0:10Mbit:50ms)")


def network_to_json(net: Network) -> dict:
    return {"links": [[lk.up_bps, lk.down_bps, lk.latency_s] for lk in net.links],
            "inter": None if net.inter is None else [net.inter.up_bps, net.inter.down_bps, net.inter.latency_s],
            "group_size": net.group_size, "overhead_bytes": net.overhead_bytes}


def network_from_json(d: dict) -> Network:
    try:
        return Network(tuple(Link(*map(float, lk)) for lk in d["links"]),
                       None if d["inter"] is None else Link(*map(float, d["inter"])),
                       d["group_size"], int(d["overhead_bytes"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed network description ({e})") from None
