"""Links, topologies, wire framing and the cost of collectives.

Units: bandwidth in bits/s, latency in seconds, message sizes in bytes.

A collective is the list of *phases* of :mod:`pysim.schedule`; the messages of
one phase are in flight at once. Message m (from src to dst) crosses a set of
resources R(m): its sender's uplink, its receiver's downlink and, in a
two-tier topology when it leaves its group, both groups' shared inter-group
link (out of the source group, into the destination group). On the wire it
occupies w_m = 8 * framed(bytes_m) bits (see :class:`Framing`), and its
receiver's acknowledgements, if the framing has them, load the reverse path
(the receiver's uplink, the sender's downlink) beside it. Resources
share their bandwidth B_r fairly between the messages crossing them
(processor sharing, all starting together), so message m ends at

    f_m = lat_m + max over r in R(m) of  sum over m' crossing r of min(w_m', w_m) / B_r

(a message on its own gets the whole link; one sharing a link with equal
messages gets 1/k of it; a small message leaves a shared link early, after
which the large ones speed up). lat_m is the largest latency of the links it
crosses. A phase ends when its slowest message ends: phase = max_m f_m. This
is exact processor sharing when the messages meet on one resource; where they
cross several, each resource is taken as if its messages were limited by it
alone (an approximation of max-min fair sharing). It replaces "max latency +
max load" taken separately, which overestimates a phase whose slowest-latency
message is not its largest.

On a uniform network (bandwidth beta, latency alpha, no framing) this gives the
textbook formulas:

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
- a grouped collective (disjoint groups, each running the collective among its
  members, phase t of every group at once; :mod:`pysim.schedule`) is timed as one
  collective whose phase t holds every group's phase-t messages. Groups share no
  access link, so on uniform links it costs what one group's collective costs
  (e.g. groups of g: ring all-reduce 2(g-1) * (alpha + 8c/beta)); on other links a
  phase waits for the slowest group's message.

:func:`collective_parts` also splits a collective's time into its latency part
(the latency of each phase's slowest message) and its transfer part (the
rest): the clock shares only the transfer part between concurrent collectives.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pysim import fair_share, schedule
from pysim.gloo_ring import gloo_ring, gloo_ring_segment
from pysim.schedule import ALGORITHMS, bytes_received, bytes_sent  # noqa: F401  (re-exported)
from pysim.tcp import (
    Connection,
    TcpModel,
    parse_tcp,
    srtt_after,
    tcp_from_json,
    tcp_to_json,
    window_after_idle,
)
from pysim.tcp import transfer as window_transfer

_PREFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "t": 1e12, "T": 1e12}
_BIT_UNITS = ("bit", "bits", "bit/s", "bits/s", "bps", "b/s")
_BYTE_UNITS = ("B", "Bps", "B/s", "byte/s", "bytes/s")
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _bandwidth_unit_bps(value: str, unit: str) -> float:
    """Bits/s per unit of ``unit``: bits for ``bit``/``bps``/``b/s`` (``Mbit``, ``Mbps``, ``mbit``),
    bytes (x8) where the unit has a capital B (``MB``, ``MBps``, ``MB/s``)."""
    for prefix, scale in _PREFIXES.items():
        if not unit.startswith(prefix):
            continue
        base = unit[len(prefix):]
        if base in _BIT_UNITS:
            return scale
        if base in _BYTE_UNITS:
            return 8.0 * scale
        if base == "b":
            raise ValueError(f"bad bandwidth {value!r}: {unit!r} is ambiguous; write {prefix.upper()}bit/s "
                             f"(bits) or {prefix.upper()}B/s (bytes)")
    raise ValueError(f"bad bandwidth {value!r}: unknown unit {unit!r}; use bits/s (Kbit, Mbit, Gbit/s, Gbps) "
                     "or bytes/s with a capital B (MB, MBps, GB/s)")


MIN_BANDWIDTH_BPS = 1.0  # slower links make simulated times of real packets overflow to inf


def parse_bandwidth(value: str | float | int) -> float:
    """Bits per second from ``"100Mbit"``, ``"1Gbps"``, ``"100MBps"`` / ``"25GB/s"`` (bytes:
    capital B, x8) or a Python number of bits/s. A string needs its unit: ``"100"`` is refused
    (100 bit/s is never what was meant). Raises ValueError for zero, negative, non-finite,
    unknown or ambiguous units (lower-case ``"mb"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bps = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([A-Za-z/]*)\s*", value)
        if not m:
            raise ValueError(f"bad bandwidth {value!r}: expected a number and a unit, "
                             "e.g. '100Mbit', '1Gbps', '25GB/s'")
        number, unit = float(m.group(1)), m.group(2)
        if not unit:
            raise ValueError(f"bad bandwidth {value!r}: give a unit, e.g. '{m.group(1)}Mbit' (bits/s) or "
                             f"'{m.group(1)}MB/s' (bytes/s)")
        bps = number * _bandwidth_unit_bps(value, unit)
    else:
        raise ValueError(f"bad bandwidth {value!r}: expected a string like '1Gbps' or a number of bits/s")
    if not math.isfinite(bps) or bps <= 0:
        raise ValueError(f"bad bandwidth {value!r}: must be a positive, finite rate")
    if bps < MIN_BANDWIDTH_BPS:
        raise ValueError(f"bad bandwidth {value!r}: below {MIN_BANDWIDTH_BPS:g} bit/s a run's times overflow; "
                         "give at least 1bit")
    return bps


def parse_latency(value: str | float | int) -> float:
    """Seconds from ``"20ms"``, ``"150us"``, ``"0.1s"`` or a Python number of seconds (>= 0). A
    string needs its unit, except ``"0"``: ``"20"`` is refused (is it 20 ms or 20 s?)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        s = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([a-zµ]*)\s*", value)
        if not m or (m.group(2) and m.group(2) not in _LATENCY_UNITS):
            raise ValueError(f"bad latency {value!r}: expected a number and a unit, e.g. '20ms', '150us', '0.1s'")
        if not m.group(2) and float(m.group(1)) != 0:
            raise ValueError(f"bad latency {value!r}: give a unit, e.g. '{m.group(1)}ms' or '{m.group(1)}s'")
        s = float(m.group(1)) * _LATENCY_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"bad latency {value!r}: expected a string like '20ms' or a number of seconds")
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"bad latency {value!r}: must be a finite number of seconds >= 0")
    return s


def format_bandwidth(bps: float) -> str:
    """Three significant digits in the largest unit that fits: 999.6e6 -> "1 Gbit/s"."""
    bps = float(f"{bps:.3g}")
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("Kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


# ---------------------------------------------------------------- framing


@dataclass(frozen=True)
class Framing:
    """Protocol bytes a link carries on top of the packet bytes: charged to time, reported apart.

    A message of b packet bytes occupies on the link

        wire(b) = b + per_message + per_segment * max(1, ceil((b + per_message) / mss))

    bytes (``mss`` = 0: no segmentation, ``per_segment`` unused). Presets (:data:`FRAMINGS`):

    - ``ideal``: none.
    - ``tcp``: TCP/IPv4 as a Linux qdisc (tc, tbf) counts it: an MTU of 1500 holds a 20-byte
      IPv4 header, a 20-byte TCP header and 12 bytes of TCP timestamp option, leaving an MSS
      of 1448 payload bytes; with the 14-byte Ethernet header a full frame is 1514 bytes,
      so per_segment = 14 + 20 + 20 + 12 = 66 bytes (4.6% of 1448).
    - ``tcp-ethernet``: the same on a physical Ethernet wire, which also carries the 4-byte
      FCS, the 8-byte preamble/SFD and the 12-byte inter-frame gap: 66 + 24 = 90 bytes per
      segment (1538 on the wire per 1448 of payload, 6.2%).

    The receiver of a segmented message also sends acknowledgements back: ``ack_bytes``
    per ``segments_per_ack`` segments (``acks(b)`` bytes), on the reverse path (its uplink,
    the sender's downlink). They cost nothing on an idle reverse path, but a collective
    whose messages go both ways at once (a ring all-reduce) carries them beside its data:
    the ``tcp`` presets send a 66-byte ACK (a bare TCP/IPv4 frame with timestamps; 90 on a
    physical wire) per 2 segments, as Linux's delayed ACK does, 2.3% more on the reverse
    path. Measured over a 100 Mbit/s tbf link, a 2-rank gloo all-reduce of 1-4 MB took
    within 1% of the time this predicts from the nominal rate, and 4-5% more than data
    framing alone (``bench/RESULTS.md``).

    A simple per-message constant is ``Framing(per_message=k)``. The transport's own
    per-message header (gloo's) is what ``per_message`` fits in a calibration.
    """

    per_message: int = 0
    mss: int = 0
    per_segment: int = 0
    ack_bytes: int = 0
    segments_per_ack: int = 2

    def __post_init__(self) -> None:
        if min(self.per_message, self.mss, self.per_segment, self.ack_bytes) < 0:
            raise ValueError(f"framing bytes must be >= 0, got {self}")
        if (self.per_segment or self.ack_bytes) and not self.mss:
            raise ValueError("framing with per-segment or ACK bytes needs an MSS > 0 (payload bytes per segment)")
        if self.segments_per_ack < 1:
            raise ValueError(f"segments_per_ack must be >= 1, got {self.segments_per_ack}")

    def segments(self, nbytes: int) -> int:
        """Segments a message of ``nbytes`` packet bytes is cut into (0 without an MSS)."""
        return max(1, -(-(nbytes + self.per_message) // self.mss)) if self.mss else 0

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes a message of ``nbytes`` packet bytes occupies on the link."""
        return nbytes + self.per_message + self.per_segment * self.segments(nbytes)

    def overhead(self, nbytes: int) -> int:
        """Framing bytes of one message of ``nbytes`` packet bytes."""
        return self.wire_bytes(nbytes) - nbytes

    def acks(self, nbytes: int) -> int:
        """Bytes of acknowledgements the receiver of a message of ``nbytes`` sends back."""
        return self.ack_bytes * -(-self.segments(nbytes) // self.segments_per_ack)

    def bits(self, nbytes: int) -> tuple[float, float]:
        """(bits on the link, bits of its acknowledgements) of a message of ``nbytes`` packet
        bytes: what it loads the forward and the reverse path with."""
        return 8.0 * self.wire_bytes(nbytes), 8.0 * self.acks(nbytes)


FRAMINGS = {
    "ideal": Framing(),
    "tcp": Framing(0, 1448, 66, 66),
    "tcp-ethernet": Framing(0, 1448, 90, 90),
}


def parse_framing(spec: str | Framing) -> Framing:
    """A :class:`Framing` from a preset name (``ideal``, ``tcp``, ``tcp-ethernet``) or
    ``"PER_MESSAGE,MSS,PER_SEGMENT[,ACK_BYTES]"`` bytes (e.g. ``"40,1448,66,66"``; one ACK
    per 2 segments)."""
    if isinstance(spec, Framing):
        return spec
    if isinstance(spec, str) and spec in FRAMINGS:
        return FRAMINGS[spec]
    try:
        values = [int(v) for v in str(spec).split(",")]
        if len(values) not in (3, 4):
            raise ValueError
    except ValueError:
        raise ValueError(f"bad framing {spec!r}: use {', '.join(FRAMINGS)} or 'PER_MESSAGE,MSS,PER_SEGMENT"
                         "[,ACK_BYTES]' bytes, e.g. '40,1448,66,66'") from None
    return Framing(*values)


# ---------------------------------------------------------------- topology


@dataclass(frozen=True)
class Link:
    """A node's access link: uplink and downlink bandwidth (bits/s), one-way latency (s)."""

    up_bps: float
    down_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < MIN_BANDWIDTH_BPS:
                raise ValueError(f"bad link: {name} = {v!r}; a rate must be a finite number of bits/s "
                                 f">= {MIN_BANDWIDTH_BPS:g}")
        v = self.latency_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"bad link: latency_s = {v!r}; a latency must be a finite number of seconds >= 0")

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
    links it crosses). ``framing`` is charged on every link (see :class:`Framing`).
    """

    links: tuple[Link, ...]
    inter: Link | None = None
    group_size: int | None = None
    framing: Framing = Framing()
    tcp: TcpModel | None = None

    def __hash__(self) -> int:   # computed once: a run's clock looks its collectives up by network
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.links, self.inter, self.group_size, self.framing, self.tcp))

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError("a network needs at least one node")
        if not isinstance(self.framing, Framing):
            object.__setattr__(self, "framing", parse_framing(self.framing))
        if self.tcp is not None and not isinstance(self.tcp, TcpModel):
            object.__setattr__(self, "tcp", parse_tcp(self.tcp))
        if (self.inter is None) != (self.group_size is None):
            raise ValueError("a two-tier network needs both an inter-group link and a group size")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"a two-tier network's groups need at least one node each, got group size "
                             f"{self.group_size}")
        if self.group_size is not None and len(self.links) % self.group_size:
            raise ValueError(f"group size {self.group_size} must divide the {len(self.links)} nodes")

    @property
    def n(self) -> int:
        return len(self.links)

    @classmethod
    def uniform(cls, n: int, bandwidth: str | float, latency: str | float = 0.0,
                framing: str | Framing = "ideal") -> Network:
        """n nodes, each on the same link."""
        _check_nodes(n)
        return cls((Link.of(bandwidth, latency),) * n, framing=parse_framing(framing))

    @classmethod
    def per_node(cls, links: Sequence[Link], framing: str | Framing = "ideal") -> Network:
        """Heterogeneous nodes: one (up, down, latency) link each."""
        return cls(tuple(links), framing=parse_framing(framing))

    @classmethod
    def two_tier(cls, n: int, group_size: int, intra_bandwidth: str | float, intra_latency: str | float,
                 inter_bandwidth: str | float, inter_latency: str | float,
                 framing: str | Framing = "ideal") -> Network:
        """Groups of ``group_size`` nodes on a fast link, joined by a slow inter-group link."""
        _check_nodes(n)
        return cls((Link.of(intra_bandwidth, intra_latency),) * n, Link.of(inter_bandwidth, inter_latency),
                   group_size, parse_framing(framing))

    def with_nodes(self, n: int) -> Network:
        """The same kind of network for n nodes (uniform and two-tier only)."""
        if self.n == n:
            return self
        if len(set(self.links)) != 1:
            raise ValueError(f"this heterogeneous network describes {self.n} nodes, the run has {n}")
        return Network((self.links[0],) * n, self.inter, self.group_size, self.framing, self.tcp)

    def with_tcp(self, tcp: str | TcpModel | None) -> Network:
        """The same network with TCP window model ``tcp`` (:func:`pysim.tcp.parse_tcp`; None: off)."""
        return Network(self.links, self.inter, self.group_size, self.framing, parse_tcp(tcp))

    def describe(self) -> str:
        first = self.links[0]
        framing = "" if self.framing == Framing() else f", framing {self.framing_name()}"
        if self.tcp is not None:
            framing += f", {self.tcp.describe()}"
        if self.inter is not None:
            return (f"two-tier, groups of {self.group_size}: intra {format_bandwidth(first.up_bps)} "
                    f"{first.latency_s * 1e3:g} ms, inter {format_bandwidth(self.inter.up_bps)} "
                    f"{self.inter.latency_s * 1e3:g} ms{framing}")
        if len(set(self.links)) == 1:
            return f"{format_bandwidth(first.up_bps)}, {first.latency_s * 1e3:g} ms{framing}"
        return "per-node: " + "; ".join(f"{format_bandwidth(lk.up_bps)}/{format_bandwidth(lk.down_bps)} "
                                        f"{lk.latency_s * 1e3:g} ms" for lk in self.links) + framing

    def framing_name(self) -> str:
        for name, f in FRAMINGS.items():
            if f == self.framing:
                return name
        f = self.framing
        acks = f",{f.ack_bytes}" + (f" per {f.segments_per_ack}" if f.segments_per_ack != 2 else "") \
            if f.ack_bytes else ""
        return f"{f.per_message},{f.mss},{f.per_segment}{acks}"

    def group(self, i: int) -> int:
        return 0 if self.group_size is None else i // self.group_size

    def _resources(self, src: int, dst: int) -> tuple[float, list[tuple[tuple, float]]]:
        """A message's latency and the (resource, bandwidth) pairs it crosses."""
        a, b = self.links[src], self.links[dst]
        lat = max(a.latency_s, b.latency_s)
        res = [(("up", src), a.up_bps), (("down", dst), b.down_bps)]
        if self.inter is not None and self.group(src) != self.group(dst):
            lat = max(lat, self.inter.latency_s)
            res += [(("out", self.group(src)), self.inter.up_bps), (("in", self.group(dst)), self.inter.down_bps)]
        return lat, res

    def phase_parts(self, messages: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
        """(seconds, latency part) of one phase of concurrent messages (src, dst, bytes):
        the phase ends with its slowest message (see the module docstring); the latency
        part is that message's latency. Phases of many messages are costed in NumPy
        (:mod:`pysim.fair_share`, the same floats)."""
        if len(messages) >= fair_share.MIN_MESSAGES:
            return fair_share.phase_parts(_link_arrays(self), fair_share.as_array(messages))
        return _slowest(self._each_message(messages))

    def message_parts(self, messages: Sequence[tuple[int, int, int]]) -> list[tuple[float, float]]:
        """(latency, transfer) seconds of each of one phase's concurrent messages (src, dst,
        bytes): the transfer at its fair share of every link it crosses. Phases of many
        messages are costed in NumPy (:mod:`pysim.fair_share`, the same floats)."""
        if len(messages) >= fair_share.MIN_MESSAGES:
            lat, transfer = fair_share.message_parts(_link_arrays(self), fair_share.as_array(messages))
            return list(zip(lat.tolist(), transfer.tolist(), strict=True))
        return self._each_message(messages)

    def _each_message(self, messages: Sequence[tuple[int, int, int]]) -> list[tuple[float, float]]:
        """:meth:`message_parts` message by message: the rule as written, which
        :mod:`pysim.fair_share` is tested against."""
        if not messages:
            return []
        info = []
        sharing: dict[tuple, list[float]] = {}
        wire: dict[int, tuple[float, float]] = {}   # bytes -> (bits on the wire, bits of ACKs): a phase repeats sizes
        for src, dst, nbytes, *_ in messages:   # a Message has an item field too
            n = int(nbytes)
            if n not in wire:
                wire[n] = self.framing.bits(n)
            bits, acks = wire[n]
            lat, res = self._resources(src, dst)
            info.append((lat, bits, res))
            for key, _ in res:
                sharing.setdefault(key, []).append(bits)
            if acks:  # the receiver's ACKs load the reverse path while the message flows
                for key, _ in self._resources(dst, src)[1]:
                    sharing.setdefault(key, []).append(acks)
        return [(lat, max(_shared_bits(sharing[key], bits) / bps for key, bps in res)) for lat, bits, res in info]

    def phase_s(self, messages: Sequence[tuple[int, int, int]]) -> float:
        """Seconds for one phase of concurrent messages (src, dst, bytes)."""
        return self.phase_parts(messages)[0]


def _slowest(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds, latency part) of the slowest of a phase's messages (latency, transfer): the
    first of equals; (0, 0) for none."""
    best, best_lat = -1.0, 0.0
    for lat, transfer in parts:
        if lat + transfer > best:
            best, best_lat = lat + transfer, lat
    return (best, best_lat) if parts else (0.0, 0.0)


def _shared_bits(loads: list[float], bits: float) -> float:
    """sum(min(w, bits) for w in loads), the same float: what a message's fair share of a link
    it crosses amounts to (one load, the common case, without a generator)."""
    if len(loads) == 1:
        return 0 + min(loads[0], bits)
    return sum(min(w, bits) for w in loads)


def _check_nodes(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be an integer >= 1, got {n!r}")


# ---------------------------------------------------------------- collectives


def collective_parts(net: Network, op: str, algo: str, sizes: Sequence[int],
                     groups: Sequence[Sequence[int]] | None = None) -> tuple[float, float]:
    """(seconds, latency part) of one collective on ``net`` (schedule: :mod:`pysim.schedule`;
    ``sizes`` are bytes per member; ``groups``: run within each group at once, see
    :func:`pysim.schedule.phases`): the sum over phases of :meth:`Network.phase_parts`."""
    sizes = tuple(map(int, sizes))
    return _collective_parts(net, op, algo, sizes, schedule.check_groups(groups, len(sizes)))


@functools.lru_cache(maxsize=65536)
def _collective_parts(net: Network, op: str, algo: str, sizes: tuple[int, ...],
                      groups: schedule.Groups | None) -> tuple[float, float]:
    """:func:`collective_parts` on normalised arguments. Cached: the replay of long traces
    calls this with few distinct arguments."""
    if len(sizes) != net.n:
        raise ValueError(f"collective over {len(sizes)} members on a network of {net.n} nodes")
    total = latency = 0.0
    for phase in schedule.phases(op, algo, sizes, groups):
        s, lat = net.phase_parts(phase)   # a Message's first three fields: src, dst, bytes
        total += s
        latency += lat
    return total, latency


@functools.lru_cache(maxsize=16)
def _link_arrays(net: Network) -> fair_share.LinkArrays:
    """``net`` as :class:`pysim.fair_share.LinkArrays`, made once per network."""
    n, links = net.n, net.links
    two_tier = net.inter is not None
    groups = n // net.group_size if two_tier else 1
    inter = net.inter if two_tier else Link(1.0, 1.0, 0.0)   # one tier: no message crosses it
    bps = np.array([lk.up_bps for lk in links] + [lk.down_bps for lk in links]
                   + [inter.up_bps] * groups + [inter.down_bps] * groups, dtype=np.float64)
    group = np.arange(n) // net.group_size if two_tier else np.zeros(n, dtype=np.int64)
    return fair_share.LinkArrays(np.array([lk.latency_s for lk in links], dtype=np.float64), group,
                                 net.inter.latency_s if two_tier else None, bps, net.framing.bits)


class _PhaseTable(tuple):
    """Per phase, per message: (src, dst, segments, latency, transfer) without a window model;
    ``keys`` and ``symmetric`` as :func:`_table_shape` says, worked out once (hashing a large
    table costs more than the arithmetic it would save)."""

    keys: tuple[tuple[int, int], ...]
    symmetric: bool


@functools.lru_cache(maxsize=4096)
def _phase_table(net: Network, op: str, algo: str, sizes: tuple[int, ...], groups: schedule.Groups | None
                 ) -> _PhaseTable:
    """The :class:`_PhaseTable` of a collective on ``net``."""
    mss = net.framing.mss or (net.tcp.mss if net.tcp is not None else 1448)
    rows = []
    for phase in schedule.phases(op, algo, sizes, groups):
        messages = [(m.src, m.dst, m.nbytes) for m in phase]
        rows.append(tuple((src, dst, max(1, -(-(nbytes + net.framing.per_message) // mss)), lat, transfer)
                          for (src, dst, nbytes), (lat, transfer) in zip(messages, net.message_parts(messages),
                                                                          strict=True)))
    table = _PhaseTable(rows)
    table.keys = tuple(sorted({(m[0], m[1]) for phase in table for m in phase}))
    table.symmetric = all(len(phase) == len(table.keys) and len({m[2:] for m in phase}) == 1
                          and len({(m[0], m[1]) for m in phase}) == len(table.keys) for phase in table)
    return table


def tcp_collective_parts(net: Network, conns: dict[tuple[int, int], Connection], start_s: float, op: str,
                         algo: str, sizes: Sequence[int], groups: Sequence[Sequence[int]] | None = None
                         ) -> tuple[float, float]:
    """(seconds, latency part) of one collective starting at ``start_s`` on a network with a
    TCP window model (:mod:`pysim.tcp`), whose connections' windows ``conns`` ((src, dst) ->
    :class:`pysim.tcp.Connection`) it reads and updates. Phase by phase as
    :func:`collective_parts`, each message taking its latency plus :func:`pysim.tcp.transfer`
    of its transfer; the time the window adds (round trips spent waiting) counts as latency,
    the part that does not share bandwidth with other collectives. With the model's
    ``segment_bytes``, a ring all-reduce is timed as gloo runs it instead
    (:func:`pysim.gloo_ring.gloo_ring`, :func:`_gloo_allreduce`)."""
    model = net.tcp
    if model is None:
        raise ValueError("tcp_collective_parts needs a network with a TCP model (Network.tcp)")
    sizes = tuple(int(s) for s in sizes)
    schedule.check_sizes(sizes)
    norm = schedule.check_groups(groups, len(sizes))
    if model.segment_bytes is not None and op == "allreduce" and algo == "ring":
        return _gloo_allreduce(net, conns, start_s, sizes, norm)
    table = _phase_table(net, op, algo, sizes, norm)
    cap = model.cap_segments(net.framing.mss or model.mss)
    keys, symmetric = _table_shape(table)
    if symmetric and len({_state(conns.get(k)) for k in keys}) == 1:
        return _symmetric_collective(model, conns, keys, (net, op, algo, sizes, norm), start_s, cap, algo == "ring")
    total = latency = 0.0
    for phase in table:
        best, best_lat = -1.0, 0.0
        for src, dst, segments, lat, transfer in phase:
            took = tcp_message(model, conns, (src, dst), segments, lat, transfer, start_s + total, cap,
                               reverse_burst=algo == "ring")
            if lat + took > best:
                best, best_lat = lat + took, lat + (took - transfer)
        total += best
        latency += best_lat
    return total, latency


class _GlooRingPath(NamedTuple):
    """What one group's gloo ring needs of the network (see :func:`_gloo_paths`)."""

    total_bytes: int
    links: tuple[tuple[int, int], ...]    # member j -> j + 1
    latency_s: tuple[float, ...]
    notice_latency_s: tuple[float, ...]   # member j -> j - 1
    rtt_s: tuple[float, ...]
    segment_s: tuple[float, ...]          # one full segment's transfer on each link
    tcp_segments: int                     # TCP segments in a full segment


@functools.lru_cache(maxsize=1024)
def _gloo_paths(net: Network, sizes: tuple[int, ...], groups: schedule.Groups | None) -> tuple[_GlooRingPath, ...]:
    """Every group's ring path (members of one group and more): its links, latencies, round trips
    and a segment's transfer at its fair share (the rings of all groups at once). Cached: it
    depends on the network and the collective's shape only."""
    model = net.tcp
    rings = [list(g) for g in groups] if groups is not None else [list(range(len(sizes)))]
    rings = [g for g in rings if len(g) > 1]
    mss = net.framing.mss or model.mss
    totals = [sum(sizes[m] for m in g) for g in rings]
    segments = [gloo_ring_segment(total, len(g), model.segment_bytes) for g, total in zip(rings, totals, strict=True)]
    hops = [(g[j], g[(j + 1) % len(g)], seg) for g, seg in zip(rings, segments, strict=True) for j in range(len(g))]
    transfer = {(src, dst): t for (src, dst, _), (_, t) in zip(hops, net.message_parts(hops), strict=True)}
    paths = []
    for g, total, seg in zip(rings, totals, segments, strict=True):
        k = len(g)
        links = tuple((g[j], g[(j + 1) % k]) for j in range(k))
        lat = tuple(net._resources(a, b)[0] for a, b in links)
        paths.append(_GlooRingPath(total, links, lat,
                                   tuple(net._resources(g[j], g[(j - 1) % k])[0] for j in range(k)),
                                   tuple(lat[j] + net._resources(b, a)[0] for j, (a, b) in enumerate(links)),
                                   tuple(transfer[key] for key in links),
                                   max(1, -(-(seg + net.framing.per_message) // mss))))
    return tuple(paths)


def _gloo_allreduce(net: Network, conns: dict[tuple[int, int], Connection], start_s: float,
                    sizes: tuple[int, ...], groups: schedule.Groups | None) -> tuple[float, float]:
    """:func:`tcp_collective_parts` of a ring all-reduce timed as gloo runs it
    (:func:`pysim.gloo_ring.gloo_ring`), in each group at once (a group's ring shares links
    with the other groups' rings as their phase messages do); the latency part is what the
    slowest group spends beyond its busiest connection's sending."""
    model = net.tcp
    cap = model.cap_segments(net.framing.mss or model.mss)
    total_s = latency = 0.0
    for path in _gloo_paths(net, sizes, groups):
        k = len(path.links)
        windows = tuple(_window_at(model, conns.get(key), start_s + path.notice_latency_s[(j + 1) % k], path.rtt_s[j])
                        for j, key in enumerate(path.links))
        srtts = tuple(conns[key].srtt_s if key in conns else None for key in path.links)
        run = gloo_ring(path.total_bytes, model.segment_bytes, path.latency_s, path.notice_latency_s, path.segment_s,
                        path.tcp_segments, windows, path.rtt_s, srtts, cap)
        for j, key in enumerate(path.links):
            if run.last_send_s[j] is not None:
                conns[key] = Connection(run.windows[j], start_s + run.last_send_s[j], run.srtt_s[j])
        if run.end_s > total_s:
            total_s, latency = run.end_s, run.end_s - run.busy_s
    return total_s, latency


def _window_at(model: TcpModel, conn: Connection | None, send_s: float, rtt_s: float) -> float:
    """A connection's window when it next sends at ``send_s``: the initial window if it never
    sent, else its window after the idle time since it last sent."""
    if conn is None:
        return float(model.initial_window)
    if conn.last_send_s is None:
        return conn.cwnd
    srtt = rtt_s if conn.srtt_s is None else conn.srtt_s   # the RTO comes from the smoothed round trip
    return window_after_idle(model, conn.cwnd, send_s - conn.last_send_s, srtt)


def _state(conn: Connection | None) -> tuple[float, float | None, float | None] | None:
    return None if conn is None else (conn.cwnd, conn.last_send_s, conn.srtt_s)


def _table_shape(table: _PhaseTable) -> tuple[tuple[tuple[int, int], ...], bool]:
    """The connections a collective uses, and whether it is symmetric: every phase uses all of
    them with messages of equal segments, latency and transfer (a ring on a uniform network)."""
    return table.keys, table.symmetric


def _symmetric_collective(model: TcpModel, conns: dict[tuple[int, int], Connection],
                          keys: tuple[tuple[int, int], ...], shape: tuple, start_s: float, cap: float,
                          reverse_burst: bool) -> tuple[float, float]:
    """:func:`tcp_collective_parts` where every connection starts in the same state and every
    phase treats them alike: one connection stands for all (the same arithmetic, done once).
    The first phase may restart a window left idle since the last collective; the later ones
    follow from its outcome alone (:func:`_later_phases`, cached). ``shape``: the collective's
    (net, op, algo, sizes, groups), which name its phase table."""
    _, _, segments, lat, transfer = _phase_table(*shape)[0][0]
    one = {keys[0]: conns[keys[0]]} if keys[0] in conns else {}
    took = tcp_message(model, one, keys[0], segments, lat, transfer, start_s, cap, reverse_burst=reverse_burst)
    state = one[keys[0]]
    total, latency, cwnd, srtt, last = _later_phases(model, shape, state.cwnd, state.srtt_s, took, cap,
                                                     reverse_burst)
    for k in keys:
        conns[k] = Connection(cwnd, start_s + last, srtt)
    return total, latency


@functools.lru_cache(maxsize=4096)
def _later_phases(model: TcpModel, shape: tuple, cwnd: float, srtt: float | None, first_took: float, cap: float,
                  reverse_burst: bool) -> tuple[float, float, float, float | None, float]:
    """(total, latency part, window, SRTT, last send) of :func:`_symmetric_collective` after its
    first phase took ``first_took`` and left window ``cwnd`` and ``srtt``: every later phase as
    :func:`tcp_message` times it, times from the collective's start. Cached: steps repeat."""
    table = _phase_table(*shape)
    _, _, _, lat, transfer = table[0][0]
    total, latency = lat + first_took, lat + (first_took - transfer)
    one = {(0, 1): Connection(cwnd, first_took, srtt)}
    for phase in table[1:]:
        _, _, segments, lat, transfer = phase[0]
        took = tcp_message(model, one, (0, 1), segments, lat, transfer, total, cap, reverse_burst=reverse_burst)
        total += lat + took
        latency += lat + (took - transfer)
    state = one[(0, 1)]
    return total, latency, state.cwnd, state.srtt_s, state.last_send_s


def tcp_message(model: TcpModel, conns: dict[tuple[int, int], Connection], key: tuple[int, int], segments: int,
                latency_s: float, transfer_s_: float, start_s: float, cap: float, commit: bool = True,
                reverse_burst: bool = False) -> float:
    """Seconds from a message's first segment sent to its last on connection ``key``, starting
    at ``start_s`` (restart after idle, then slow start; see :mod:`pysim.tcp`; ``reverse_burst``:
    its receiver sends as much at the same time, as in a ring); with ``commit``
    the connection keeps its new window and the time it last sent."""
    rtt = 2.0 * latency_s
    conn = conns.get(key)
    done = window_transfer(segments, transfer_s_, rtt, _window_at(model, conn, start_s, rtt), cap, reverse_burst)
    srtt = srtt_after(None if conn is None else conn.srtt_s, rtt, done, done.took_s, transfer_s_ / max(1, segments),
                      segments, reverse_burst)
    took = done.took_s + (latency_s if model.rendezvous else 0.0)   # the receiver's ready notice comes first
    if commit:
        conns[key] = Connection(done.window, start_s + took, srtt)
    return took


def collective_s(net: Network, op: str, algo: str, sizes: Sequence[int],
                 groups: Sequence[Sequence[int]] | None = None) -> float:
    """Seconds one collective takes on ``net`` on its own (see :func:`collective_parts`)."""
    return collective_parts(net, op, algo, sizes, groups)[0]


def framing_bytes(framing: Framing | Network, op: str, algo: str, sizes: Sequence[int],
                  groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Framing bytes each member sends in one collective (on top of :func:`bytes_sent`):
    its messages' framing and its ACKs of the messages it receives."""
    f = framing.framing if isinstance(framing, Network) else framing
    out = [0] * len(sizes)
    for phase in schedule.phases(op, algo, tuple(sizes), groups):
        for m in phase:
            out[m.src] += f.overhead(m.nbytes)
            out[m.dst] += f.acks(m.nbytes)
    return out


def parse_network(n: int, bandwidth: str | float = "100Mbit", latency: str | float = "20ms",
                  topology: str = "uniform", framing: str | Framing = "ideal") -> Network:
    """A network from command-line style settings.

    ``topology``: ``uniform``; ``two-tier:G:BW:LAT`` (groups of G nodes on
    ``bandwidth``/``latency``, joined by a BW/LAT inter-group link); or
    ``slow-node:I:BW:LAT`` (node I on a slower link, the rest on the default).
    ``framing``: see :func:`parse_framing`.
    """
    _check_nodes(n)
    kind, *args = topology.split(":")
    if kind == "uniform" and not args:
        return Network.uniform(n, bandwidth, latency, framing)
    if kind == "two-tier" and len(args) == 3:
        try:
            g = int(args[0])
        except ValueError:
            raise ValueError(f"bad topology {topology!r}: group size must be an integer") from None
        return Network.two_tier(n, g, bandwidth, latency, args[1], args[2], framing)
    if kind == "slow-node" and len(args) == 3:
        try:
            i = int(args[0])
        except ValueError:
            raise ValueError(f"bad topology {topology!r}: node index must be an integer") from None
        if not 0 <= i < n:
            raise ValueError(f"bad topology {topology!r}: node {i} does not exist in a run of {n} nodes")
        links = [Link.of(bandwidth, latency)] * n
        links[i] = Link.of(args[1], args[2])
        return Network.per_node(links, framing)
    raise ValueError(f"bad topology {topology!r}: use 'uniform', 'two-tier:G:BW:LAT' (e.g. two-tier:2:100Mbit:50ms) "
                     "or 'slow-node:I:BW:LAT' (e.g. slow-node:0:10Mbit:50ms)")


def network_to_json(net: Network) -> dict:
    f = net.framing
    return {"links": [[lk.up_bps, lk.down_bps, lk.latency_s] for lk in net.links],
            "inter": None if net.inter is None else [net.inter.up_bps, net.inter.down_bps, net.inter.latency_s],
            "group_size": net.group_size,
            "framing": {"per_message": f.per_message, "mss": f.mss, "per_segment": f.per_segment,
                        "ack_bytes": f.ack_bytes, "segments_per_ack": f.segments_per_ack},
            **({} if net.tcp is None else {"tcp": tcp_to_json(net.tcp)})}   # absent when off: older files match


def network_from_json(d: dict) -> Network:
    """The inverse of :func:`network_to_json` (also reads the older ``overhead_bytes`` key as a
    per-message framing)."""
    try:
        if "framing" in d:
            fr = d["framing"]
            framing = Framing(int(fr["per_message"]), int(fr["mss"]), int(fr["per_segment"]),
                              int(fr.get("ack_bytes", 0)), int(fr.get("segments_per_ack", 2)))
        else:
            framing = Framing(int(d.get("overhead_bytes", 0)))
        return Network(tuple(_link_from_json(lk) for lk in d["links"]),
                       None if d["inter"] is None else _link_from_json(d["inter"]),
                       d["group_size"], framing, tcp_from_json(d.get("tcp")))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed network description ({e})") from None


def _link_from_json(fields: Sequence) -> Link:
    """A Link from ``[up_bps, down_bps, latency_s]`` numbers."""
    if not isinstance(fields, (list, tuple)) or len(fields) != 3 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields):
        raise ValueError(f"malformed network description: a link is [up_bps, down_bps, latency_s] numbers, "
                         f"got {fields!r}")
    return Link(*map(float, fields))


def load_network_file(path: str | Path) -> Network:
    """A network from a JSON file: :func:`network_to_json`'s form, as ``python -m pysim
    calibrate`` writes it (extra keys, such as the calibration's fit, are ignored). A file
    describing one uniform link serves any number of nodes (:meth:`Network.with_nodes`)."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read network file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"network file {path} is not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"network file {path} must hold a JSON object with 'links'")
    return network_from_json(d)
