"""gloo's ring all-reduce timed segment by segment (pysim/gloo_ring.py): hand-timed rings, the
ready notices behind a node's own bytes, TCP windows through bursts, and its place on the clock."""

import numpy as np
import pytest

from pysim.clock import Clock, replay
from pysim.gloo_ring import gloo_ring, segments_of
from pysim.network import Network, tcp_collective_parts
from pysim.tcp import parse_tcp
from pysim.trace import Collective, Trace


def ring2(total: int, max_segment: int, latency_s: float, segment_s: float, windows=None):
    """Two ranks, symmetric links: ``segment_s`` per full segment."""
    return gloo_ring(total, max_segment, (latency_s,) * 2, (latency_s,) * 2, (segment_s,) * 2, 10, windows,
                     (2 * latency_s,) * 2)


def test_segments_as_gloo_cuts_them():
    assert segments_of(10_000_000, 2, 1 << 20) == (10, 1_000_000)
    assert segments_of(4_000_000, 4, 1 << 20) == (8, 500_000)       # at least 2 per rank
    assert segments_of(100_000, 2, 1 << 20) == (4, 25_000)
    assert segments_of(40, 4, 1 << 20) == (8, 8)                     # whole floats: 5 segments, 3 empty


def test_small_buffer_is_the_rendezvous_phase_model():
    # 2 segments per rank, both in flight at once: each half is notice + chunk + latency
    L, t = 0.02, 0.003
    run = ring2(4 * 1000, 1000, L, t)
    assert run.end_s == pytest.approx(2 * (2 * L + 2 * t))
    assert run.busy_s == pytest.approx(4 * t)


@pytest.mark.parametrize("latency_s, segment_s, expected", [
    # 3 segments per rank. Long latency: the third segment's notice leaves at once,
    # each half ends 4L + 2t after it starts.
    (0.05, 0.01, lambda L, t: 8 * L + 4 * t),
    # Short latency: the third segment's notice waits behind the node's second segment
    # (one queue per node): 3L + 3t per half.
    (0.002, 0.01, lambda L, t: 6 * L + 6 * t),
])
def test_three_segments_per_rank_by_hand(latency_s, segment_s, expected):
    run = ring2(6 * 1000, 1000, latency_s, segment_s)
    assert run.end_s == pytest.approx(expected(latency_s, segment_s))
    assert run.busy_s == pytest.approx(6 * segment_s)


def test_a_window_that_fills_the_pipe_changes_nothing_and_a_small_one_costs_round_trips():
    plain = ring2(6 * 1000, 1000, 0.05, 0.01)
    wide = ring2(6 * 1000, 1000, 0.05, 0.01, windows=(1e9, 1e9))
    assert wide.end_s == pytest.approx(plain.end_s)
    narrow = ring2(6 * 1000, 1000, 0.05, 0.01, windows=(2.0, 2.0))   # 10 TCP segments per segment
    assert narrow.end_s > plain.end_s + 0.1
    assert all(w > 2 for w in narrow.windows)                        # slow start grew them


def allreduce(total: int, n: int = 2) -> Collective:
    return Collective("allreduce", "ring", (total // n,) * n)


def test_on_the_clock_windows_persist_and_bbr_skips_the_restart():
    net = Network.uniform(2, "100Mbit", "50ms", framing="tcp")
    times = {}
    for cc in ("reno", "bbr"):
        clock = Clock(net.with_tcp(f"{cc}:rendezvous=on:segment=1MiB"), 2)
        first = clock.advance(np.zeros(2), allreduce(10_000_000)).max()
        warm = clock.advance(np.zeros(2), allreduce(10_000_000)).max() - first
        assert clock.conns[(0, 1)].srtt_s > 0.15   # segments queued behind each other: srtt above the 100 ms RTT
        before = clock.t.max() + 3.0
        idle = clock.advance(np.full(2, 3.0), allreduce(1_000_000)).max() - before
        times[cc] = first, warm, idle
        assert first > warm   # the first one starts from the initial window
    assert times["reno"][1] == times["bbr"][1]
    # after 3 s idle reno restarts from the initial window (RTO = 200 ms + srtt): round trips of slow start
    assert times["reno"][2] > times["bbr"][2] + 0.2


def test_ten_megabytes_at_100_ms_pays_for_gloo_s_pipeline():
    # The phase model with rendezvous charges 2 x (notice + 5 MB + latency); gloo's ring waits for
    # the notices of segments 3..5 of each half: measured 1262 ms over the delay line (bench/RESULTS.md)
    net = Network.uniform(2, "100Mbit", "50ms", framing="tcp")
    phase, gloo = (Clock(net.with_tcp(f"bbr:rendezvous=on{s}"), 2) for s in ("", ":segment=1MiB"))
    for clock in (phase, gloo):
        for _ in range(3):
            t0 = clock.t.max()
            clock.advance(np.zeros(2), allreduce(10_000_000))
        clock.took = clock.t.max() - t0
    assert phase.took == pytest.approx(1.055, abs=0.01)
    assert gloo.took == pytest.approx(1.2624, rel=0.02)


def test_groups_run_their_rings_at_once_and_replay_is_exact():
    net = Network.uniform(4, "100Mbit", "20ms", framing="tcp").with_tcp("reno:rendezvous=on:segment=1MiB")
    conns = {}
    whole, _ = tcp_collective_parts(net, conns, 0.0, "allreduce", "ring", (1_000_000,) * 4, [[0, 2], [1, 3]])
    two = Network.uniform(2, "100Mbit", "20ms", framing="tcp").with_tcp(net.tcp)
    alone, _ = tcp_collective_parts(two, {}, 0.0, "allreduce", "ring", (1_000_000,) * 2)
    assert whole == pytest.approx(alone)
    assert set(conns) == {(0, 2), (2, 0), (1, 3), (3, 1)}
    events = [allreduce(3_000_000, 4), allreduce(200_000, 4), allreduce(3_000_000, 4)]
    trace = Trace(nodes=4, compute_s=[[0.01, 0.02, 0.015, 0.01]] * 3, events=events)
    clock = Clock(net, 4)
    live = np.array([clock.advance(np.asarray(c), e) for c, e in zip(trace.compute_s, events, strict=True)])
    assert np.array_equal(replay(trace, net).end_s, live)


def test_segment_setting_parses_and_bad_ones_say_so():
    assert parse_tcp("reno:segment=1MiB").segment_bytes == 1 << 20
    assert parse_tcp("reno").segment_bytes is None
    assert "1 MiB segments" in parse_tcp("bbr:segment=1MiB").describe()
    for bad in ("reno:segment=0", "reno:segment=big", "reno:segment=-1KiB", "reno:segment=inf",
                "reno:segment=1e400", "reno:segment=1.9", "reno:segment=512"):
        with pytest.raises(ValueError, match="TCP"):
            parse_tcp(bad)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_without_latency_the_ring_is_a_pipeline_of_its_segments(n):
    # no latency, notices free: each loop is S - S/n segments back to back on every member
    t = 0.01
    run = gloo_ring(2 * n * 1000, 1000, (0.0,) * n, (0.0,) * n, (t,) * n, 10, None, (0.0,) * n)
    assert run.end_s == pytest.approx(2 * (2 * n - 2) * t)
    assert run.busy_s == pytest.approx((2 * n - 2) * 2 * t)


def test_the_window_cap_limits_gloo_s_ring_too():
    net = Network.uniform(2, "100Mbit", "50ms", framing="tcp")
    took = {}
    for spec in ("reno:segment=1MiB", "reno:segment=1MiB:cap=64KiB"):
        clock = Clock(net.with_tcp(spec), 2)
        for _ in range(2):
            t0 = clock.t.max()
            clock.advance(np.zeros(2), allreduce(10_000_000))
        took[spec] = clock.t.max() - t0
        assert clock.conns[(0, 1)].cwnd <= (45 if "cap" in spec else 1e9)
    # 64 KiB (45 segments) per round trip of 100 ms: 5 MB each way takes ~7.6 s, not ~1 s
    assert took["reno:segment=1MiB:cap=64KiB"] > 7 * took["reno:segment=1MiB"]


def test_negative_sizes_are_refused_on_gloo_s_path_too():
    net = Network.uniform(2, "100Mbit", "50ms", framing="tcp").with_tcp("reno:segment=1MiB")
    with pytest.raises(ValueError, match="negative"):
        tcp_collective_parts(net, {}, 0.0, "allreduce", "ring", (-5, 10))
