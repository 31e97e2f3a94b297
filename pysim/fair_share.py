"""The cost of a phase of many concurrent messages, in NumPy: the same floats as the
message-by-message rule of :mod:`pysim.network` (``Network._each_message``), without a Python
loop over the messages. :meth:`pysim.network.Network.phase_parts` and ``message_parts`` use it
for phases of ``MIN_MESSAGES`` or more.

A ring collective among n nodes has 2(n-1) phases of n messages; its cost was
O(n^2) Python work once per process and again in the parent (6.8 s for a
1024-node ring). Here a phase is arrays: each message's latency, the loads it and
its acknowledgements put on every resource (the sender's uplink, the receiver's
downlink, the inter-group links), and each message's fair share of every resource
it crosses, ``sum over the resource's loads w of min(w, bits)``.

The floats are those of the loop, not merely close: a share sums whole numbers of
bits (exact in float64 below 2**53 bits, whatever the order), min, max and the
choice of the slowest message (the first of equals, as the loop keeps it) are
exact, and the one division and one addition per message are the loop's.
``tests/test_fair_share.py`` checks equality on random phases and collectives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

#: Phases with fewer messages go through the Python loop, which is faster for them.
MIN_MESSAGES = 48


class LinkArrays:
    """A network's links as arrays, made once per collective. Resource ids: up(i) = i,
    down(i) = n + i, out(g) = 2n + g, in(g) = 2n + G + g for n nodes in G groups.

    ``latency_s``: each node's link latency; ``group``: each node's group (all 0 on one tier);
    ``inter_latency_s``: the inter-group link's latency (None: one tier); ``bps``: every
    resource's bandwidth (bits/s); ``wire(b)``: (bits on the wire, bits of acknowledgements)
    of a message of b packet bytes."""

    def __init__(self, latency_s: np.ndarray, group: np.ndarray, inter_latency_s: float | None, bps: np.ndarray,
                 wire: Callable[[int], tuple[float, float]]) -> None:
        self.n, self.latency_s, self.group, self.inter_latency_s = len(latency_s), latency_s, group, inter_latency_s
        self.groups = (len(bps) - 2 * self.n) // 2
        self.bps, self.wire = bps, wire
        self._wire: dict[int, tuple[float, float]] = {}

    def wire_bits(self, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bits on the wire and bits of acknowledgements of messages of ``nbytes`` packet bytes."""
        sizes, inverse = np.unique(nbytes, return_inverse=True)
        for s in sizes.tolist():
            if s not in self._wire:
                self._wire[s] = self.wire(s)
        table = np.array([self._wire[s] for s in sizes.tolist()], dtype=np.float64).reshape(-1, 2)
        return table[inverse, 0], table[inverse, 1]


def as_array(phase: Sequence[Sequence[int]]) -> np.ndarray:
    """A phase's messages, (src, dst, bytes) or :class:`pysim.schedule.Message`s (src, dst,
    bytes, item), as an (m, 3 or 4) int64 array."""
    width = len(phase[0])
    return np.fromiter(itertools.chain.from_iterable(phase), np.int64, width * len(phase)).reshape(-1, width)


def phase_parts(links: LinkArrays, messages: np.ndarray) -> tuple[float, float]:
    """(seconds, latency part) of one phase: ``messages`` an (m, 3+) integer array of
    (src, dst, bytes, ...) rows in the phase's order; see the module docstring."""
    lat, transfer = message_parts(links, messages)
    finish = lat + transfer
    slowest = int(np.argmax(finish))                 # the first of equals, as the loop keeps it
    return float(finish[slowest]), float(lat[slowest])


def message_parts(links: LinkArrays, messages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each message's (latency, transfer) seconds, as :meth:`pysim.network.Network.message_parts` says."""
    src, dst = messages[:, 0], messages[:, 1]
    bits, acks = links.wire_bits(messages[:, 2])
    lat = np.maximum(links.latency_s[src], links.latency_s[dst])
    n, gs, gd = links.n, links.group[src], links.group[dst]
    cross = gs != gd   # all False on one tier
    if links.inter_latency_s is not None:
        lat = np.where(cross, np.maximum(lat, links.inter_latency_s), lat)
    out_g, in_g = 2 * n + gs, 2 * n + links.groups + gd
    # per message, the loads in the loop's order: its bits on up(src), down(dst), out, in; then
    # its acknowledgements on the reverse path: up(dst), down(src), out(dst's group), in(src's group)
    keys = np.stack([src, n + dst, out_g, in_g, dst, n + src, 2 * n + gd, 2 * n + links.groups + gs], axis=1)
    loads = np.stack([bits] * 4 + [acks] * 4, axis=1)
    acked = acks != 0
    present = np.stack([np.ones_like(cross), np.ones_like(cross), cross, cross, acked, acked,
                        acked & cross, acked & cross], axis=1)
    event_key, event_load = keys[present], loads[present]           # row-major: the loop's order
    sorted_load = event_load[np.argsort(event_key, kind="stable")]   # by resource, in order within one
    per_key = np.bincount(event_key, minlength=len(links.bps))
    first = np.cumsum(per_key) - per_key
    # each message's share of each resource it crosses (the first four columns)
    own = keys[:, :4]
    start, count = first[own], per_key[own]
    share = np.zeros(own.shape)
    mine = np.broadcast_to(bits[:, None], own.shape)
    for j in range(int(count.max())):                # the j-th load of every resource at once
        more = count > j
        share[more] += np.minimum(sorted_load[start[more] + j], mine[more])
    per_resource = share / links.bps[own]
    per_resource[~present[:, :4]] = -np.inf
    return lat, per_resource.max(axis=1)
