"""Who sends what to whom: the message schedule of each collective, written once.

A collective over n members is a list of *phases*; the messages of one phase
are in flight at the same time, and a phase starts when the previous one has
ended. A :class:`Message` names its sender, receiver, size in bytes and the
*item* it carries: the chunk index (ring all-reduce, reduce-scatter) or the
packet index (all-gather, star, broadcast: the member whose packet it is).

``sizes`` are bytes per member: chunk packets for ring all-reduce and
reduce-scatter (chunk c is reduced at, and its size reported by, member c),
each member's packet otherwise (for broadcast, the root's message first).

The same schedule is used three times: :func:`pysim.network.collective_s`
times it, :func:`bytes_sent` / :func:`bytes_received` count it, and
:mod:`pysim.comm` moves the real packets along it (which chunk leaves and
which arrives at each hop).

Ring (node i sends to i+1, receives from i-1), for phase t = 0 .. n-2:

- reduce-scatter / first half of all-reduce: node i sends chunk (i - t) mod n;
  after n-1 phases node i holds the full sum of chunk (i + 1) mod n.
- all-gather half of all-reduce: node i sends chunk (i + 1 - t) mod n.
- all-gather of packets: node i forwards packet (i - t) mod n.

Star all-reduce (parameter server at node 0): every other node sends its
packet to 0, then 0 sends the reduced packet (node 0's size) to each.
Star broadcast: the root sends to every other node in one phase. Binomial tree
broadcast: in round r every node that has the message sends it 2^r further on.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

ALGORITHMS = {
    "allreduce": ("ring", "star"),
    "allgather": ("ring",),
    "reduce_scatter": ("ring",),
    "broadcast": ("star", "tree"),
}


class Message(NamedTuple):
    src: int      # sending member
    dst: int      # receiving member
    nbytes: int   # packet bytes (framing not included)
    item: int     # chunk or packet index it carries


Phase = tuple[Message, ...]


def check_collective(op: str, algo: str) -> None:
    if op not in ALGORITHMS or algo not in ALGORITHMS[op]:
        raise ValueError(f"unknown collective {op}/{algo}; known: {ALGORITHMS}")


def ring_reduce_scatter(sizes: tuple[int, ...]) -> list[Phase]:
    n = len(sizes)
    return [tuple(Message(i, (i + 1) % n, sizes[(i - t) % n], (i - t) % n) for i in range(n)) for t in range(n - 1)]


def ring_allgather_chunks(sizes: tuple[int, ...]) -> list[Phase]:
    """The all-gather half of a ring all-reduce: node i starts with chunk i+1."""
    n = len(sizes)
    return [tuple(Message(i, (i + 1) % n, sizes[(i + 1 - t) % n], (i + 1 - t) % n) for i in range(n))
            for t in range(n - 1)]


def star_allreduce(sizes: tuple[int, ...]) -> list[Phase]:
    n = len(sizes)
    return [tuple(Message(j, 0, sizes[j], j) for j in range(1, n)),
            tuple(Message(0, j, sizes[0], 0) for j in range(1, n))]


def tree_broadcast(nbytes: int, n: int) -> list[Phase]:
    phases, have = [], 1
    while have < n:
        phases.append(tuple(Message(i, i + have, nbytes, 0) for i in range(min(have, n - have))))
        have *= 2
    return phases


@functools.lru_cache(maxsize=65536)
def phases(op: str, algo: str, sizes: tuple[int, ...]) -> tuple[Phase, ...]:
    """The phases of one collective (empty for a single member). Cached: a run repeats
    few distinct collectives."""
    check_collective(op, algo)
    sizes = tuple(int(s) for s in sizes)
    if any(s < 0 for s in sizes):
        raise ValueError(f"negative message size in {sizes}")
    n = len(sizes)
    if n <= 1:
        return ()
    if op == "allreduce":
        if algo == "ring":
            return tuple(ring_reduce_scatter(sizes) + ring_allgather_chunks(sizes))
        return tuple(star_allreduce(sizes))
    if op in ("allgather", "reduce_scatter"):
        return tuple(ring_reduce_scatter(sizes))
    if algo == "star":
        return (tuple(Message(0, j, sizes[0], 0) for j in range(1, n)),)
    return tuple(tree_broadcast(sizes[0], n))


def bytes_sent(op: str, algo: str, sizes: tuple[int, ...] | list[int]) -> list[int]:
    """Bytes each member sends in one collective (the packets that really cross)."""
    out = [0] * len(sizes)
    for phase in phases(op, algo, tuple(sizes)):
        for m in phase:
            out[m.src] += m.nbytes
    return out


def bytes_received(op: str, algo: str, sizes: tuple[int, ...] | list[int]) -> list[int]:
    """Bytes each member receives in one collective."""
    out = [0] * len(sizes)
    for phase in phases(op, algo, tuple(sizes)):
        for m in phase:
            out[m.dst] += m.nbytes
    return out


def ring_hop(phase: Phase, rank: int) -> tuple[Message, Message]:
    """In a ring phase: the message ``rank`` sends and the one it receives."""
    n = len(phase)
    return phase[rank], phase[(rank - 1) % n]
