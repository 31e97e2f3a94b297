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
  connection); it arrives one latency after its last byte has left. With 2 ranks the
  notice shares the segments' socket, so this is exact; with more it goes out on another
  socket and waits only behind what is in the node's interface queue, which the model takes
  as everything the node wrote (true once the windows exceed the path; in slow start part of
  it still waits in the socket). Checked: 4 and 8 ranks on the delay line came within -9.9%
  to +3.5% this way, -10% to -17% with a queue per connection instead;
- a segment's bytes take its transfer time (its framed bytes at its share of the
  rate: :meth:`pysim.network.Network.message_parts` of the ring's concurrent
  messages); with a TCP model (:mod:`pysim.tcp`), the segments a connection writes
  while its earlier ones are still leaving form one burst, sent from the window the
  burst started with (:func:`pysim.tcp.transfer_s` of the burst so far, with the ACKs of each
  slow-start round leaving behind the receiver's own burst: every member sends as it
  receives), and a segment written to an idle connection starts a new burst from the window
  the last one left;
- a rank's reductions and copies take no time (the clock charges compute separately).

The result is each rank's end time and, per connection, its window and the time it
last sent, so the windows persist across collectives as in :mod:`pysim.tcp`.
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import NamedTuple

from pysim.tcp import srtt_after, transfer

GLOO_MAX_SEGMENT_BYTES = 1 << 20   # gloo's AllreduceOptions::kMaxSegmentSize


class RingRun(NamedTuple):
    """What one gloo ring all-reduce took, every rank starting at 0 (s)."""

    end_s: float                     # the last rank's end
    busy_s: float                    # the longest time one connection spent sending bytes
    windows: tuple[float, ...]       # per ring connection (member j -> j+1): window after
    last_send_s: tuple[float | None, ...]   # per ring connection: when its last byte left (None: none)
    srtt_s: tuple[float | None, ...]        # per ring connection: smoothed round trip after (None: no model)


ELEMENT_BYTES = 4   # a float32 gradient's element: gloo keeps segments whole elements


def segments_of(total_bytes: int, ranks: int, max_segment_bytes: int) -> tuple[int, int]:
    """(segments S, bytes per segment) gloo cuts ``total_bytes`` of float32 into on ``ranks``
    ranks (its maximum and its segments rounded to whole elements)."""
    most = ELEMENT_BYTES * max(1, max_segment_bytes // ELEMENT_BYTES)
    s = max(-(-total_bytes // most), 2 * ranks)
    s = -(-s // ranks) * ranks
    seg = -(-total_bytes // s)
    return s, max(ELEMENT_BYTES, -(-seg // ELEMENT_BYTES) * ELEMENT_BYTES)


def gloo_ring_segment(total_bytes: int, ranks: int, max_segment_bytes: int) -> int:
    """Bytes of a full segment of gloo's ring all-reduce of ``total_bytes`` on ``ranks`` ranks."""
    return segments_of(total_bytes, ranks, max_segment_bytes)[1]


@functools.lru_cache(maxsize=4096)
def gloo_ring(total_bytes: int, max_segment_bytes: int, latency_s: tuple[float, ...],
              notice_latency_s: tuple[float, ...], segment_s: tuple[float, ...], tcp_segments: int,
              windows: tuple[float, ...] | None, rtt_s: tuple[float, ...],
              srtt_s: tuple[float | None, ...] | None = None, cap: float = math.inf) -> RingRun:
    """One ring all-reduce of ``total_bytes`` over the ring of ``len(latency_s)`` members
    (member j sends to j+1, its ready notices go to j-1). Per member j: ``latency_s[j]`` of
    its link to j+1, ``notice_latency_s[j]`` of its link to j-1, ``segment_s[j]`` the transfer
    time of one full segment to j+1 (shorter segments in proportion to their bytes), and
    ``rtt_s[j]`` the round trip of its connection to j+1. ``tcp_segments``: TCP segments in a
    full segment. ``windows``: each connection's window when the collective starts (None:
    no TCP model, bytes leave at the rate); ``srtt_s``: their smoothed round trips (None:
    no sample yet), updated per segment as :mod:`pysim.tcp` says; ``cap``: the windows' cap
    (segments). Cached: every node's clock asks the same."""
    return _Ring(total_bytes, max_segment_bytes, latency_s, notice_latency_s, segment_s, tcp_segments, windows,
                 rtt_s, srtt_s, cap).run()


class _Ring:
    """The event run behind :func:`gloo_ring`. Events: a ready notice reaching a sender (kind 0)
    and a segment reaching its receiver (kind 1), keyed (member, loop, iteration); loop 0 is
    reduce-scatter, loop 1 all-gather."""

    def __init__(self, total_bytes: int, max_segment_bytes: int, latency_s: tuple[float, ...],
                 notice_latency_s: tuple[float, ...], segment_s: tuple[float, ...], tcp_segments: int,
                 windows: tuple[float, ...] | None, rtt_s: tuple[float, ...], srtt_s: tuple[float | None, ...] | None,
                 cap: float) -> None:
        self.n = n = len(latency_s)
        self.total = total_bytes
        self.count, self.seg = segments_of(total_bytes, n, max_segment_bytes)
        self.per_rank = self.count // n
        self.loop_ops = self.count - self.per_rank          # iterations that post operations
        self.latency_s, self.notice_latency_s, self.segment_s = latency_s, notice_latency_s, segment_s
        self.tcp_segments, self.windows, self.rtt_s, self.cap = tcp_segments, windows, rtt_s, cap
        self.events: list[tuple[float, int, int, int, int, int]] = []   # (t, order, kind, member, loop, i)
        self.order = 0
        self.queue_end = [0.0] * n            # when the bytes each member wrote so far have left it
        self.burst: list[list | None] = [None] * n   # per connection: [start, window, TCP segments, plain s]
        self.after = list(windows) if windows is not None else [math.inf] * n
        self.last_send: list[float | None] = [None] * n
        self.busy = [0.0] * n
        self.srtt: list[float | None] = list(srtt_s) if srtt_s is not None else [None] * n
        self.state = [(0, 0)] * n             # per member: its next (loop, iteration)
        self.clock = [0.0] * n                # per member: when it may go on
        self.received: set[tuple[int, int, int]] = set()
        self.sent: set[tuple[int, int, int]] = set()
        self.notices: dict[tuple[int, int, int], float] = {}   # sends whose notice came first: when
        self.issued: dict[tuple[int, int, int], float] = {}    # sends issued before their notice: when

    def run(self) -> RingRun:
        for j in range(self.n):
            self.advance(j, 0.0)
        while self.events:
            t, _, kind, j, loop, i = heapq.heappop(self.events)
            key = (j, loop, i)
            if kind == 1:                     # j received its segment (loop, i)
                self.received.add(key)
                self.advance(j, t)
            elif key in self.issued:          # j's receiver is ready for a send j has issued
                send_at = max(t, self.issued.pop(key))
                self.send(send_at, key)
                self.advance(j, send_at)
            else:
                self.notices[key] = t
        if any(state != (2, 0) for state in self.state) or self.issued:
            raise RuntimeError(f"gloo ring left members unfinished: {self.state}, sends without a notice "
                               f"{sorted(self.issued)}")
        return RingRun(max(self.clock), max(self.busy), tuple(self.after), tuple(self.last_send), tuple(self.srtt))

    def length(self, loop: int, j: int, i: int, receiving: bool) -> int:
        """Bytes member j sends (or receives) at iteration i of ``loop``: gloo's offsets, for gloo
        rank g = -j (gloo's ranks send to r - 1)."""
        g = -j % self.n
        first = g + 1 + receiving if loop == 0 else g + receiving
        offset = ((first * self.per_rank + i) % self.count) * self.seg
        return max(0, min(self.seg, self.total - offset))

    def push(self, t: float, kind: int, j: int, loop: int, i: int) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, self.order, kind, j, loop, i))

    def send(self, t: float, key: tuple[int, int, int]) -> None:
        """Member j writes its segment (loop, i) at t: it joins the burst its connection is
        sending, or starts one; it reaches j + 1 one latency after its last byte left."""
        j, loop, i = key
        self.sent.add(key)
        frac = self.length(loop, j, i, False) / self.seg
        plain, segments = self.segment_s[j] * frac, max(1, math.ceil(self.tcp_segments * frac))
        b = self.burst[j]
        if b is None or t > self.queue_end[j]:
            b = self.burst[j] = [t, self.after[j], 0, 0.0]
        b[2] += segments
        b[3] += plain
        self.busy[j] += plain
        took = b[3]
        if self.windows is not None:   # every member sends as it receives: a ring's reverse burst
            done = transfer(b[2], b[3], self.rtt_s[j], b[1], self.cap, reverse_burst=True)
            took, self.after[j] = done.took_s, done.window
            self.srtt[j] = srtt_after(self.srtt[j], self.rtt_s[j], done, b[0] + took - t, plain / segments, segments,
                                      reverse_burst=True)
        self.queue_end[j] = self.last_send[j] = b[0] + took
        self.push(self.queue_end[j] + self.latency_s[j], 1, (j + 1) % self.n, loop, i)

    def advance(self, j: int, t: float) -> None:
        """Member j goes through its iterations from t until it must wait for the receive or the
        send of two iterations back."""
        self.clock[j] = max(self.clock[j], t)
        loop, i = self.state[j]
        while loop < 2:
            if i >= self.loop_ops + 2:
                loop, i = loop + 1, 0
                continue
            if i >= 2 and any(self.length(loop, j, i - 2, receiving) and (j, loop, i - 2) not in done
                              for receiving, done in ((True, self.received), (False, self.sent))):
                break
            if i < self.loop_ops:
                self.post(j, loop, i)
            i += 1
        self.state[j] = (loop, i)

    def post(self, j: int, loop: int, i: int) -> None:
        """Member j's iteration i: the receive's ready notice to j - 1 (behind j's own bytes),
        then the send, which leaves once j + 1's notice is in."""
        now = self.clock[j]
        if self.length(loop, j, i, True):
            notice_at = max(now, self.queue_end[j]) + self.notice_latency_s[j]
            self.push(notice_at, 0, (j - 1) % self.n, loop, i)
        if self.length(loop, j, i, False):
            key = (j, loop, i)
            if key in self.notices:
                self.send(max(now, self.notices.pop(key)), key)
            else:
                self.issued[key] = now
