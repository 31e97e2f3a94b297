"""A ring all-reduce as gloo runs it over TCP, timed message by message.

The phase model (:mod:`pysim.schedule`) sends each ring hop as one message and starts a
hop when the previous one has ended everywhere. gloo, torch.distributed's CPU backend,
pipelines instead (``gloo/allreduce.cc``, ``ring``): a buffer of T bytes on n ranks is
cut into S segments, S the smallest multiple of n that is at least
max(ceil(T / max_segment), 2n), each of ceil(T / S) bytes (the last ones shorter, or
empty); reduce-scatter, then all-gather, each a loop of S - S/n + 2 iterations in which
rank r, from iteration 2 on, first waits for its receive and its send of iteration
i - 2 (two segments in flight per direction), then posts the receive of iteration i and
sends that iteration's segment. Over TCP (``gloo/transport/tcp/pair.cc``) a send leaves
only once the receiver has posted the matching receive: the receiver's ready notice, a
small message, crosses the link first.

Timing, event by event, with every rank starting at 0:

- a message written at t leaves its sender behind the bytes that sender wrote before
  (one queue per node: a notice waits behind the node's own segments, on any
  connection); it arrives one latency after its last byte has left;
- a segment's bytes take its transfer time (its framed bytes at its share of the
  rate: :meth:`pysim.network.Network.message_parts` of the ring's concurrent
  messages); with a TCP model (:mod:`pysim.tcp`), the segments a connection writes
  while its earlier ones are still leaving form one burst, sent from the window the
  burst started with (:func:`pysim.tcp.transfer_s` of the burst so far), and a segment
  written to an idle connection starts a new burst from the window the last one left;
- a rank's reductions and copies take no time (the clock charges compute separately).

The result is each rank's end time and, per connection, its window and the time it
last sent, so the windows persist across collectives as in :mod:`pysim.tcp`.
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import NamedTuple

GLOO_MAX_SEGMENT_BYTES = 1 << 20   # gloo's AllreduceOptions::kMaxSegmentSize


class RingRun(NamedTuple):
    """What one gloo ring all-reduce took, every rank starting at 0 (s)."""

    end_s: float                     # the last rank's end
    busy_s: float                    # the longest time one connection spent sending bytes
    windows: tuple[float, ...]       # per ring connection (member j -> j+1): window after
    last_send_s: tuple[float | None, ...]   # per ring connection: when its last byte left (None: none)


def segments_of(total_bytes: int, ranks: int, max_segment_bytes: int) -> tuple[int, int]:
    """(segments S, bytes per segment) gloo cuts ``total_bytes`` into on ``ranks`` ranks."""
    s = max(-(-total_bytes // max_segment_bytes), 2 * ranks)
    s = -(-s // ranks) * ranks
    return s, max(1, -(-total_bytes // s))


def gloo_ring_segment(total_bytes: int, ranks: int, max_segment_bytes: int) -> int:
    """Bytes of a full segment of gloo's ring all-reduce of ``total_bytes`` on ``ranks`` ranks."""
    return segments_of(total_bytes, ranks, max_segment_bytes)[1]


@functools.lru_cache(maxsize=4096)
def gloo_ring(total_bytes: int, max_segment_bytes: int, latency_s: tuple[float, ...],
              notice_latency_s: tuple[float, ...], segment_s: tuple[float, ...], tcp_segments: int,
              windows: tuple[float, ...] | None, rtt_s: tuple[float, ...]) -> RingRun:
    """One ring all-reduce of ``total_bytes`` over the ring of ``len(latency_s)`` members
    (member j sends to j+1, its ready notices go to j-1). Per member j: ``latency_s[j]`` of
    its link to j+1, ``notice_latency_s[j]`` of its link to j-1, ``segment_s[j]`` the transfer
    time of one full segment to j+1 (shorter segments in proportion to their bytes), and
    ``rtt_s[j]`` the round trip of its connection to j+1. ``tcp_segments``: TCP segments in a
    full segment. ``windows``: each connection's window when the collective starts (None:
    no TCP model, bytes leave at the rate). Cached: every node's clock asks the same."""
    n = len(latency_s)
    count, seg = segments_of(total_bytes, n, max_segment_bytes)
    per_rank = count // n
    loop_ops = count - per_rank
    events: list[tuple[float, int, int, int, int, int]] = []   # (t, order, kind, rank, loop, i)
    order = 0
    queue_end = [0.0] * n                       # when the bytes each node wrote so far have left
    burst: list[list[float] | None] = [None] * n   # per connection: [start, window, segments, plain_s]
    after = list(windows) if windows is not None else [math.inf] * n
    last_send: list[float | None] = [None] * n
    busy = [0.0] * n

    def length(loop: int, j: int, i: int, receiving: bool) -> int:
        # bytes member j sends (or receives) at iteration i of reduce-scatter (loop 0) or
        # all-gather (loop 1): gloo's offsets, for gloo rank g = -j (gloo's ranks send to r - 1)
        g = -j % n
        first = g + 1 + (1 if receiving else 0) if loop == 0 else g + (1 if receiving else 0)
        offset = ((first * per_rank + i) % count) * seg
        return max(0, min(seg, total_bytes - offset))

    def push(t: float, kind: int, rank: int, loop: int, i: int) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, rank, loop, i))

    def send_segment(t: float, j: int, nbytes: int, loop: int, i: int) -> None:
        frac = nbytes / seg
        plain, tcp_segs = segment_s[j] * frac, max(1, math.ceil(tcp_segments * frac))
        b = burst[j]
        if b is None or t > queue_end[j]:      # the connection is idle: a new burst
            b = burst[j] = [t, after[j], 0, 0.0]
        b[2] += tcp_segs
        b[3] += plain
        busy[j] += plain
        if windows is None:
            took = b[3]
        else:
            took, after[j] = _transfer(b[2], b[3], rtt_s[j], b[1])
        queue_end[j] = last_send[j] = b[0] + took
        push(queue_end[j] + latency_s[j], 1, (j + 1) % n, loop, i)       # arrives at j + 1

    # state per rank: next iteration (loop, i), time it may go on; what it waits for
    state = [(0, 0)] * n
    clock = [0.0] * n
    received: set[tuple[int, int, int]] = set()
    sent: set[tuple[int, int, int]] = set()
    notices: dict[tuple[int, int, int], float] = {}   # (sender, loop, i): when its notice arrived
    issued: dict[tuple[int, int, int], float] = {}    # (sender, loop, i): when the rank issued the send
    ends = [0.0] * n

    def advance(r: int, t: float) -> None:
        clock[r] = max(clock[r], t)
        loop, i = state[r]
        while loop < 2:
            if i >= loop_ops + 2:
                loop, i = loop + 1, 0
                continue
            if i >= 2:
                if length(loop, r, i - 2, True) and (r, loop, i - 2) not in received:
                    break
                if length(loop, r, i - 2, False) and (r, loop, i - 2) not in sent:
                    break
            if i < loop_ops:
                now = clock[r]
                if length(loop, r, i, True):      # post the receive: a notice to the sender (r - 1)
                    left = (r - 1) % n
                    push(max(now, queue_end[r]) + notice_latency_s[r], 0, left, loop, i)
                nbytes = length(loop, r, i, False)
                if nbytes:
                    key = (r, loop, i)
                    if key in notices:
                        send_at = max(now, notices.pop(key))
                        sent.add(key)
                        send_segment(send_at, r, nbytes, loop, i)
                    else:
                        issued[key] = now
            i += 1
        state[r] = (loop, i)
        if loop == 2:
            ends[r] = clock[r]

    for r in range(n):
        advance(r, 0.0)
    while events:
        t, _, kind, r, loop, i = heapq.heappop(events)
        key = (r, loop, i)
        if kind == 0:        # r learns that r + 1 is ready for its segment (loop, i)
            if key in issued:
                send_at = max(t, issued.pop(key))
                sent.add(key)
                send_segment(send_at, r, length(loop, r, i, False), loop, i)
                advance(r, send_at)
            else:
                notices[key] = t
        else:                # r received its segment (loop, i)
            received.add(key)
            advance(r, t)
    return RingRun(max(ends), max(busy), tuple(after), tuple(last_send))


def _transfer(segments: int, plain_s: float, rtt_s: float, window: float) -> tuple[float, float]:
    from pysim.tcp import transfer_s

    return transfer_s(segments, plain_s, rtt_s, window, math.inf)
