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

Every message satisfies ``nbytes == sizes[item]``.

Grouped collectives (``groups``): the members are split into disjoint groups
that together hold every member (e.g. FedAvg's islands); each group runs the
collective above among its own members, in the order listed (group
(g_0, .., g_(k-1)): its local member j is g_j, so a ring sends g_j -> g_(j+1)),
and phase t of the grouped collective is phase t of every group at once (a
group with fewer phases is done early). Items are member indices of the whole
collective (g_item), so ``nbytes == sizes[item]`` still holds. ``groups=None``
is one group of all members in rank order. Example: 4 members in groups
(0, 2), (1, 3), ring all-reduce with chunk sizes c: phase 0 = 0->2 (chunk 0),
2->0 (chunk 2), 1->3 (chunk 1), 3->1 (chunk 3); phase 1 is the all-gather hop.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator, Sequence
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
Groups = tuple[tuple[int, ...], ...]


def check_collective(op: str, algo: str) -> None:
    if op not in ALGORITHMS or algo not in ALGORITHMS[op]:
        raise ValueError(f"unknown collective {op}/{algo}; known: {ALGORITHMS}")


def check_groups(groups: Sequence[Sequence[int]] | None, n: int) -> Groups | None:
    """``groups`` as a tuple of tuples of member indices, or None for one group of all ``n``
    members in rank order (``None`` itself, or that single group). Raises ValueError unless
    the groups are non-empty, disjoint and together hold exactly members 0 .. n-1."""
    if groups is None:
        return None
    try:
        out = tuple(tuple(int(m) for m in g) for g in groups)
    except TypeError:
        raise ValueError(f"groups must be a sequence of sequences of member indices, got {groups!r}") from None
    flat = [m for g in out for m in g]
    if any(not g for g in out) or sorted(flat) != list(range(n)):
        raise ValueError(f"groups {out} must be non-empty, disjoint and hold every member 0..{n - 1} exactly once")
    return None if out == (tuple(range(n)),) else out


def group_of(groups: Groups | None, member: int, n: int) -> tuple[int, ...]:
    """The members of ``member``'s group, in ring order (all ``n`` members for None). Every node
    asks at every collective: one tuple of all members per n, one lookup per groups."""
    if groups is None:
        return _everyone(n)
    return _group_by_member(groups)[member]


@functools.lru_cache(maxsize=64)
def _everyone(n: int) -> tuple[int, ...]:
    return tuple(range(n))


@functools.lru_cache(maxsize=256)
def _group_by_member(groups: Groups) -> dict[int, tuple[int, ...]]:
    return {m: g for g in groups for m in g}


def ring_reduce_scatter(sizes: tuple[int, ...]) -> list[Phase]:
    """Phase t: node i sends chunk (i - t) mod n to node i + 1."""
    return [_ring_phase(sizes, -t) for t in range(len(sizes) - 1)]


def ring_allgather_chunks(sizes: tuple[int, ...]) -> list[Phase]:
    """The all-gather half of a ring all-reduce: node i starts with chunk i+1; phase t: node i
    sends chunk (i + 1 - t) mod n to node i + 1."""
    return [_ring_phase(sizes, 1 - t) for t in range(len(sizes) - 1)]


def _ring_phase(sizes: tuple[int, ...], shift: int) -> Phase:
    """Node i sends chunk (i + shift) mod n to node i + 1: Message(i, (i + 1) % n, sizes[c], c).
    Made without a Python call per message (a 1024-node ring all-reduce has 2 million)."""
    n = len(sizes)
    first = shift % n
    items = [*range(first, n), *range(first)]
    return tuple(map(_message, zip(range(n), [*range(1, n), 0], map(sizes.__getitem__, items), items, strict=True)))


_message = functools.partial(tuple.__new__, Message)   # Message(*fields), as a C call


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


def phases(op: str, algo: str, sizes: Sequence[int], groups: Sequence[Sequence[int]] | None = None
           ) -> tuple[Phase, ...]:
    """The phases of one collective (empty for a single member), run within each of
    ``groups`` at once if given (see the module docstring). ``sizes``: bytes per member;
    ``groups``: a partition of the members (see :func:`check_groups`) or None."""
    sizes = tuple(int(s) for s in sizes)
    return _phases(op, algo, sizes, check_groups(groups, len(sizes)))


def check_sizes(sizes: tuple[int, ...]) -> None:
    """ValueError if a member's message size (bytes) is negative."""
    if any(s < 0 for s in sizes):
        raise ValueError(f"negative message size in {sizes}")


@functools.lru_cache(maxsize=65536)
def _phases(op: str, algo: str, sizes: tuple[int, ...], groups: Groups | None) -> tuple[Phase, ...]:
    """:func:`phases` on normalised arguments. Cached: a run repeats few distinct collectives.
    Made with the cyclic garbage collector paused: a large ring's millions of new tuples (which
    form no cycles) would set off collections that cost three times the making."""
    check_collective(op, algo)
    check_sizes(sizes)
    with _collector_paused():
        if groups is not None:
            return _grouped(op, algo, sizes, groups)
        return _one_group(op, algo, sizes)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic collector off inside, as it was after. A process-wide switch: fine for a
    process's nodes, which take turns, not for threads that run at once."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _grouped(op: str, algo: str, sizes: tuple[int, ...], groups: Groups) -> tuple[Phase, ...]:
    """Each group's own schedule with its members renamed, phase t of all groups merged."""
    per_group = [[tuple(Message(g[m.src], g[m.dst], m.nbytes, g[m.item]) for m in phase)
                  for phase in _one_group(op, algo, tuple(sizes[m] for m in g))] for g in groups]
    count = max(len(p) for p in per_group)
    return tuple(tuple(m for p in per_group if t < len(p) for m in p[t]) for t in range(count))


def _one_group(op: str, algo: str, sizes: tuple[int, ...]) -> tuple[Phase, ...]:
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


def bytes_sent(op: str, algo: str, sizes: Sequence[int],
               groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Bytes each member sends in one collective (the packets that really cross), within
    ``groups`` if given."""
    out = [0] * len(sizes)
    for phase in phases(op, algo, tuple(sizes), groups):
        for m in phase:
            out[m.src] += m.nbytes
    return out


def bytes_received(op: str, algo: str, sizes: Sequence[int],
                   groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Bytes each member receives in one collective, within ``groups`` if given."""
    out = [0] * len(sizes)
    for phase in phases(op, algo, tuple(sizes), groups):
        for m in phase:
            out[m.dst] += m.nbytes
    return out


def ring_hop(phase: Phase, rank: int) -> tuple[Message, Message]:
    """In a ring phase (grouped or not): the message ``rank`` sends and the one it receives."""
    n = len(phase)
    if n > rank and phase[rank].src == rank and phase[(rank - 1) % n].dst == rank:  # one ring in rank order
        return phase[rank], phase[(rank - 1) % n]
    out = [m for m in phase if m.src == rank]
    into = [m for m in phase if m.dst == rank]
    if len(out) != 1 or len(into) != 1:
        raise ValueError(f"member {rank} does not send and receive one message each in this phase")
    return out[0], into[0]
