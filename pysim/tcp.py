"""TCP's congestion window on the clock: slow start, restart after idle, the socket buffers' cap.

Without this model a message of X seconds of transfer (its wire bits over its share of the
rate) and one-way latency L takes L + X. A TCP connection cannot send at the rate from its
first byte: it may have ``cwnd`` segments unacknowledged, starts with the initial window and,
in slow start, grows by one segment per segment acknowledged (doubling per round trip) until
the window covers the path's bandwidth-delay product. With ``per`` = X / S seconds per
segment (S segments) and round trip R = 2 L, a message is sent in rounds
(:func:`transfer`):

    a round with w * per < R (the window does not fill the pipe) sends min(w, left) segments
    and costs R; then w = min(w + sent, cap)
    once w * per >= R, the rest flows at the rate: left * per (in a ring, once w >= left: below)
    once w = cap < R / per (buffer-limited), cap segments per round trip for the rest

so a message sent with a window that already fills the pipe takes exactly L + X, as without
the model. The window is per connection (a directed pair of nodes) and persists across
messages and collectives, as a transport's connections do. Before sending, a connection
that sent nothing for longer than the retransmission timeout RTO restarts (RFC 5681 4.1;
Linux ``tcp_cwnd_restart``): the window halves per RTO of idle time, down to min(initial
window, cwnd). RTO is ``rto_min_s`` + SRTT, SRTT the connection's smoothed round trip
(Linux: srtt + max(4 mdev, 200 ms), and mdev is small on a steady path). SRTT includes
the time the connection's last segments waited in the bottleneck's queue: a window beyond
the pipe (w * per > R) queues up to w * per - R seconds there, at most what the message's
bytes waited since they were written (:func:`queue_delay_s`); each ACK (one per two
segments) moves SRTT an eighth of the way to its sample (:func:`smoothed_rtt`). Measured
on the delay line with ``ss -ti`` at 100 ms (bench/tcp_state.py): srtt 155-270 ms around a
10 MB gloo all-reduce (RTO 360-480 ms), 102-105 ms after a 0.1 MB one (RTO 304-312 ms),
and the window halved twice, then three times, in the 1 s gaps that followed. BBR
(``net.ipv4.tcp_congestion_control = bbr``) controls its own rate and skips this restart
(Linux applies it only to congestion controls without ``cong_control``): the ``bbr``
preset has ``restart_after_idle`` off.

Not modelled: losses (no congestion avoidance: the window grows until the cap, as on a path
whose queue absorbs a window, like the delay line's and tbf's 1 s queues), delayed ACKs'
effect on growth (Linux counts segments acknowledged, not ACKs), Nagle, pacing, HyStart.

Where both ends of a connection send at once (every member of a ring sends a chunk while it
receives one), a receiver's ACKs leave through its own queue, behind the burst it is sending:
the first ACK of a round of ``sent`` segments waits max(0, sent * per - R/2) there, and the
next round starts that much later (``reverse_burst``; ring collectives and gloo's ring). Such
a round costs more than its own bytes (R/2 + sent * per), so the window never fills the pipe
while both ends burst: the rounds go on until the window holds what is left, which then
flows at the rate. A capture on the delay line (4 MB all-reduce after idle, 2 ranks, RTT
40 ms) showed exactly these rounds: 91, 182, 364 and 728 segments, the fourth 60 ms after
the third and the last 16 segments 110 ms after the fourth, though 364 segments already
outlast a round trip (bench/RESULTS.md). An
RTT sample there holds both queues, the data's and its ACK's; the model takes the window
after the message for both (elsewhere the segments in flight, which bound one queue), which
reproduced every restart Linux made on the delay line (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

LINUX_INITIAL_WINDOW = 10  # segments (RFC 6928; Linux since 2.6.39)
LINUX_RTO_MIN_S = 0.2      # TCP_RTO_MIN


@dataclass(frozen=True)
class TcpModel:
    """How a connection's window limits its messages (see the module docstring).

    ``initial_window``: segments a new (or restarted) connection may send before its first
    ACK. ``restart_after_idle``: Linux's ``tcp_slow_start_after_idle`` (on for reno and cubic,
    skipped by bbr). ``rto_min_s``: the floor of the retransmission timeout (s).
    ``max_window_bytes``: payload bytes in flight the socket buffers allow at most (None: no
    cap). ``mss``: payload bytes per segment, used when the network's framing has none.
    ``rendezvous``: the transport sends a message only once the receiver has said it is ready
    for it (gloo's TCP pairs do, for every message): one more one-way latency per message.
    Not TCP itself, but a cost only a model with round trips can place; off in the presets.
    ``segment_bytes``: ring all-reduces are timed as gloo runs them (:mod:`pysim.gloo_ring`:
    segments of at most this many bytes, two in flight, each after its ready notice, whether
    or not ``rendezvous`` is on) instead of phase by phase (None: phase by phase; gloo: 1 MiB).
    At least 1 KiB."""

    initial_window: int = LINUX_INITIAL_WINDOW
    restart_after_idle: bool = True
    rto_min_s: float = LINUX_RTO_MIN_S
    max_window_bytes: int | None = None
    mss: int = 1448
    rendezvous: bool = False
    segment_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.initial_window, bool) or not isinstance(self.initial_window, int) \
                or not 1 <= self.initial_window <= 1_000_000:
            raise ValueError(f"bad TCP initial window {self.initial_window!r}: a whole number of segments "
                             f"from 1 to 10^6 (Linux: {LINUX_INITIAL_WINDOW})")
        if not isinstance(self.rto_min_s, (int, float)) or not 0 <= self.rto_min_s <= 60:
            raise ValueError(f"bad TCP rto_min_s {self.rto_min_s!r}: seconds from 0 to 60 "
                             f"(Linux: {LINUX_RTO_MIN_S})")
        if self.max_window_bytes is not None and (isinstance(self.max_window_bytes, bool)
                                                  or not isinstance(self.max_window_bytes, int)
                                                  or self.max_window_bytes < self.mss):
            raise ValueError(f"bad TCP max_window_bytes {self.max_window_bytes!r}: a whole number of bytes "
                             f">= one segment ({self.mss}), or None for no cap")
        if self.segment_bytes is not None and (isinstance(self.segment_bytes, bool)
                                               or not isinstance(self.segment_bytes, int)
                                               or not 1024 <= self.segment_bytes <= 1 << 40):
            raise ValueError(f"bad TCP segment_bytes {self.segment_bytes!r}: a whole number of bytes from 1 KiB "
                             "to 2^40 (gloo: 1MiB), or None for phase-by-phase ring all-reduces")
        if isinstance(self.mss, bool) or not isinstance(self.mss, int) or not 1 <= self.mss <= 65_535:
            raise ValueError(f"bad TCP mss {self.mss!r}: payload bytes per segment from 1 to 65535")

    def cap_segments(self, mss: int) -> float:
        """The window's cap in segments of ``mss`` payload bytes (inf without a cap)."""
        return math.inf if self.max_window_bytes is None else max(1, self.max_window_bytes // mss)

    def rto_s(self, rtt_s: float) -> float:
        return self.rto_min_s + rtt_s

    def describe(self) -> str:
        cap = "" if self.max_window_bytes is None else f", cap {self.max_window_bytes / 2**20:.3g} MiB"
        idle = "restart after idle" if self.restart_after_idle else "no restart after idle"
        ready = ", rendezvous" if self.rendezvous else ""
        ring = "" if self.segment_bytes is None else f", gloo ring in {self.segment_bytes / 2**20:.3g} MiB segments"
        return f"tcp window IW{self.initial_window}, {idle}{cap}{ready}{ring}"


TCP_MODELS = {
    "reno": TcpModel(),
    "cubic": TcpModel(),
    "bbr": TcpModel(restart_after_idle=False),
}


def parse_tcp(spec: str | TcpModel | None) -> TcpModel | None:
    """A :class:`TcpModel` from ``off`` (None: no window model), a preset (``reno``, ``cubic``:
    Linux's defaults, restart after idle; ``bbr``: no restart), optionally followed by
    ``:KEY=VALUE`` settings: ``iw`` (segments), ``cap`` (bytes, with an optional KiB/MiB unit),
    ``idle`` (``restart`` or ``keep``), ``rto_min`` (ms), ``rendezvous`` (``on`` or ``off``; on
    for gloo), ``segment`` (bytes, with an optional KiB/MiB unit: ring all-reduces run as gloo
    runs them, in segments of at most this size, two in flight: :mod:`pysim.gloo_ring`;
    gloo's is 1MiB). Example: ``reno:cap=3MiB:rendezvous=on:segment=1MiB``."""
    if spec is None or isinstance(spec, TcpModel):
        return spec
    name, *settings = str(spec).split(":")
    if name == "off" and not settings:
        return None
    if name not in TCP_MODELS:
        raise ValueError(f"bad TCP model {spec!r}: use off, {', '.join(TCP_MODELS)}, optionally with "
                         f":iw=SEGMENTS:cap=BYTES[KiB|MiB]:idle=restart|keep:rto_min=MS:rendezvous=on|off"
                         f":segment=BYTES[KiB|MiB] "
                         f"(e.g. reno:cap=3MiB)")
    fields = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        try:
            fields.update(_setting(key, value))
        except ValueError:
            raise ValueError(f"bad TCP model setting {setting!r} in {spec!r}: use iw=SEGMENTS, "
                             f"cap=BYTES[KiB|MiB], idle=restart|keep, rto_min=MS, rendezvous=on|off or "
                             f"segment=BYTES[KiB|MiB]") from None
    base = TCP_MODELS[name]
    return TcpModel(**{**base.__dict__, **fields})


def _setting(key: str, value: str) -> dict:
    if key == "iw":
        return {"initial_window": int(value)}
    if key == "cap":
        return {"max_window_bytes": _bytes(value)}
    if key == "segment":
        return {"segment_bytes": _bytes(value)}
    if key == "idle" and value in ("restart", "keep"):
        return {"restart_after_idle": value == "restart"}
    if key == "rto_min":
        return {"rto_min_s": float(value) / 1e3}
    if key == "rendezvous" and value in ("on", "off"):
        return {"rendezvous": value == "on"}
    raise ValueError


def _bytes(value: str) -> int:
    """A whole number of bytes from ``N[KiB|MiB|kB|MB|B]`` (ValueError otherwise)."""
    units = {"KiB": 1024, "MiB": 2**20, "kB": 1000, "MB": 10**6, "B": 1, "": 1}
    number = value.rstrip("KMiBk")
    unit = value[len(number):]
    if unit not in units:
        raise ValueError
    size = float(number) * units[unit]
    if not math.isfinite(size) or size != int(size) or size > 2**50:
        raise ValueError
    return int(size)


def tcp_to_json(model: TcpModel | None) -> dict | None:
    return None if model is None else dict(model.__dict__)


def tcp_from_json(d: dict | None) -> TcpModel | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"malformed TCP model {d!r}: an object of TcpModel's fields or null")
    try:
        return TcpModel(**d)
    except TypeError as e:
        raise ValueError(f"malformed TCP model ({e})") from None


class Connection:
    """One direction of a connection: its window (segments), when it last sent (s) and its
    smoothed round trip (s; None: no sample yet)."""

    __slots__ = ("cwnd", "last_send_s", "srtt_s")

    def __init__(self, cwnd: float, last_send_s: float | None = None, srtt_s: float | None = None) -> None:
        self.cwnd, self.last_send_s, self.srtt_s = cwnd, last_send_s, srtt_s


def queue_delay_s(waited_s: float, window: float, per_s: float, rtt_s: float) -> float:
    """Seconds a message's last segment waits in the bottleneck's queue: the part of the
    segments in flight (``window``, of ``per_s`` seconds each) beyond the pipe (the round trip
    ``rtt_s``), at most the ``waited_s`` its bytes spent since they were written, never
    negative."""
    return max(0.0, min(waited_s, window * per_s - rtt_s))


def smoothed_rtt(srtt_s: float | None, rtt_s: float, queue_s: float, segments: int) -> float:
    """A connection's smoothed round trip after a message of ``segments`` segments whose last
    segment waited ``queue_s`` in the queue: every sample taken as that one's (``rtt_s`` +
    ``queue_s``), one ACK per two segments, each moving it 1/8 of the way (RFC 6298); the
    first sample sets it."""
    sample = rtt_s + queue_s
    if srtt_s is None:
        return sample
    return sample + (srtt_s - sample) * 0.875 ** max(1, segments // 2)


def srtt_after(srtt_s: float | None, rtt_s: float, done: Transfer, waited_s: float, per_s: float,
               segments: int, reverse_burst: bool) -> float:
    """A connection's smoothed round trip after a message of ``segments`` segments of ``per_s``
    seconds sent as ``done`` (:func:`transfer`), its last bytes ``waited_s`` since they were
    written: :func:`smoothed_rtt` of its :func:`queue_delay_s`. In a ring (``reverse_burst``) a
    sample holds both queues, the data's and its ACK's, and the window after stands for them
    (see the module docstring); elsewhere the segments in flight bound the one queue."""
    window = done.window if reverse_burst else done.in_flight
    return smoothed_rtt(srtt_s, rtt_s, queue_delay_s(waited_s, window, per_s, rtt_s), segments)


def window_after_idle(model: TcpModel, cwnd: float, idle_s: float, rtt_s: float) -> float:
    """The window a connection sends with after ``idle_s`` seconds without sending (Linux's
    ``tcp_cwnd_restart``: halved per RTO elapsed, down to min(initial window, cwnd)).
    ``rtt_s``: the connection's smoothed round trip, which sets the RTO."""
    rto = model.rto_s(rtt_s)
    if not model.restart_after_idle or idle_s <= rto:
        return cwnd
    restart = min(model.initial_window, cwnd)
    delta = idle_s - rto
    while delta > 0 and cwnd > restart:
        cwnd = math.floor(cwnd / 2)
        delta -= rto
    return max(cwnd, restart)


class Transfer(NamedTuple):
    """A message through a connection's window (:func:`transfer`)."""

    took_s: float       # from the first segment sent to the last (s)
    window: float       # the window after (segments)
    in_flight: float    # segments in flight when the last one left: what a queue can hold of it


def transfer(segments: int, plain_s: float, rtt_s: float, cwnd: float, cap: float,
             reverse_burst: bool = False) -> Transfer:
    """A message of ``segments`` segments whose transfer at its share of the rate takes
    ``plain_s``, on a path of round trip ``rtt_s``, sent with window ``cwnd`` capped at ``cap``
    segments (see the module docstring). Takes exactly ``plain_s`` when the window fills the
    pipe from the start (without ``reverse_burst``). ``reverse_burst``: the receiver sends a burst like
    this one at the same time (every member of a ring does), and its ACKs leave behind what of it
    is still queued, so rounds go on until the window holds what is left: a
    round of ``sent`` segments then lasts R + max(0, sent * per - R / 2), the wait of the
    round's first ACK."""
    if segments <= 0 or plain_s <= 0:
        return Transfer(plain_s, cwnd, 0.0)
    per = plain_s / segments

    def round_s(sent: float) -> float:
        return rtt_s + max(0.0, sent * per - rtt_s / 2) if reverse_burst else rtt_s

    if cwnd * per >= rtt_s and (not reverse_burst or cwnd >= segments):
        return Transfer(plain_s, _grown(cwnd, segments, segments, cap), min(cwnd, segments))
    t, left, w, prev = 0.0, segments, cwnd, 0
    while True:
        # the window fills the pipe: the rest at the rate (in a ring a round outlasts its bytes,
        # so only a window that holds all that is left does)
        if (w >= left) if reverse_burst else (w * per >= rtt_s):
            return Transfer(t + left * per, _grown(w, left, prev + left, cap), min(w, left))
        if w >= cap:                          # buffer-limited: cap segments per round trip
            rounds = math.ceil(left / w)
            return Transfer(t + (rounds - 1) * round_s(w) + (left - (rounds - 1) * w) * per, w, min(w, left))
        sent = min(w, left)
        left -= sent
        if left == 0:
            return Transfer(t + sent * per, _grown(w, sent, prev + sent, cap), sent)
        t += round_s(sent)
        w = _grown(w, sent, sent, cap)
        prev = sent


def _grown(cwnd: float, acked: int, in_flight: int, cap: float) -> float:
    """The window after ``acked`` segments are acknowledged in slow start: one more per segment,
    but only while it is under twice the most segments in flight (Linux's
    ``tcp_is_cwnd_limited``: a sender that does not use its window does not grow it), and at
    most ``cap``. A message's last round goes out while the ACKs of the round before still
    arrive, so its segments in flight are both rounds' (measured with ``ss -ti``: a 1 MB gloo
    all-reduce at 100 ms from a window of 87 left 433-436, rounds of 87, 174 and 85)."""
    return min(cwnd + acked, max(cwnd, 2 * in_flight), cap)
