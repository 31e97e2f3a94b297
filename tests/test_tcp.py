"""The TCP window model (pysim/tcp.py) and its place on the clock: hand-computed rounds, restart
after idle, the buffer cap, persistence across collectives, replay equal to the live clock."""

import math

import numpy as np
import pytest

from pysim.clock import Clock, replay
from pysim.network import Network, collective_s, network_from_json, network_to_json
from pysim.tcp import TcpModel, parse_tcp, queue_delay_s, smoothed_rtt, transfer, window_after_idle
from pysim.trace import Collective, Start, Trace, Wait


def transfer_s_of(*args, **kwargs) -> tuple[float, float]:
    """(seconds, window after) of :func:`pysim.tcp.transfer`."""
    return tuple(transfer(*args, **kwargs)[:2])


def test_slow_start_rounds_by_hand():
    # 100 segments of 1 ms each, RTT 20 ms, window 10: one round of 10 segments (20 ms), then the
    # window (20) fills the pipe (20 x 1 ms = RTT) and the other 90 flow at the rate (90 ms)
    took, after = transfer_s_of(100, 0.1, 0.02, 10, math.inf)
    assert took == pytest.approx(0.02 + 0.09)
    assert after == 110
    # window 2, RTT 20 ms: rounds of 2, 4, 8 segments (3 x 20 ms), then 16 x 1 ms < 20 ms: a
    # fourth round; then 32 fills the pipe: 100 - 30 = 70 segments at the rate
    took, after = transfer_s_of(100, 0.1, 0.02, 2, math.inf)
    assert took == pytest.approx(4 * 0.02 + 0.07)
    assert after == 102


def test_full_window_is_exactly_the_plain_transfer():
    assert transfer_s_of(1000, 0.123456789, 0.01, 500, math.inf) == (0.123456789, 1500)
    assert transfer_s_of(1000, 0.5, 0.0, 1, math.inf)[0] == 0.5   # no round trip, no wait


def test_message_within_one_window_costs_no_round_trip():
    took, after = transfer_s_of(5, 0.005, 0.2, 10, math.inf)
    assert took == pytest.approx(0.005)
    assert after == 10      # 5 in flight under a window of 10: not window-limited, no growth (Linux)
    assert transfer_s_of(8, 0.008, 0.2, 10, math.inf)[1] == 16     # grows to twice the segments in flight


def test_buffer_cap_limits_every_round():
    # cap 10 segments, 100 segments of 1 ms, RTT 50 ms: 10 rounds, the last one's 10 segments at the rate
    took, after = transfer_s_of(100, 0.1, 0.05, 10, 10)
    assert took == pytest.approx(9 * 0.05 + 0.01)
    assert after == 10


def test_restart_after_idle_as_linux():
    m = TcpModel()                       # IW 10, RTO = 200 ms + RTT
    rtt = 0.1                            # RTO 300 ms
    assert window_after_idle(m, 100, 0.25, rtt) == 100           # shorter than an RTO
    assert window_after_idle(m, 100, 0.35, rtt) == 50            # one halving
    assert window_after_idle(m, 100, 0.65, rtt) == 25            # two
    assert window_after_idle(m, 100, 100.0, rtt) == 10           # down to the initial window
    assert window_after_idle(m, 6, 100.0, rtt) == 6              # never below min(IW, cwnd)
    assert window_after_idle(parse_tcp("bbr"), 100, 100.0, rtt) == 100


def test_parse_tcp_and_errors():
    assert parse_tcp("off") is None
    assert parse_tcp("reno") == TcpModel()
    m = parse_tcp("reno:iw=4:cap=3MiB:idle=keep:rto_min=300")
    assert (m.initial_window, m.max_window_bytes, m.restart_after_idle, m.rto_min_s) == (4, 3 * 2**20, False, 0.3)
    assert parse_tcp("bbr:rendezvous=on").rendezvous and not parse_tcp("bbr").restart_after_idle
    for bad in ("vegas", "reno:rendezvous=1", "reno:iw=0", "reno:cap=5GB", "reno:idle=maybe", "reno:x=1",
                "off:iw=3", "reno:cap=10"):
        with pytest.raises(ValueError, match="TCP"):
            parse_tcp(bad)


def test_network_json_round_trip_keeps_the_model_and_omits_it_when_off():
    net = Network.uniform(3, "100Mbit", "20ms", framing="tcp").with_tcp("reno:cap=2MiB")
    assert network_from_json(network_to_json(net)) == net
    assert "tcp" not in network_to_json(net.with_tcp(None))
    assert "tcp window IW10" in net.describe()


def allreduce(nbytes, n=2):
    """A ring all-reduce whose members each own a chunk of ``nbytes`` (the message of each hop)."""
    return Collective("allreduce", "ring", (nbytes,) * n)


def test_first_collective_pays_slow_start_then_the_window_persists():
    plain = Network.uniform(2, "100Mbit", "20ms", framing="tcp")
    net = plain.with_tcp("reno")
    clock = Clock(net, 2)
    lone = collective_s(plain, "allreduce", "ring", (4_000_000,) * 2)
    first = clock.advance(np.zeros(2), allreduce(4_000_000)).max()
    # two phases of a 4 MB message each way: 2763 segments of `per` (1514 B and an ACK share at
    # 100 Mbit/s); RTT 40 ms. Phase 1: rounds of 10, 20, 40, 80, 160, 320, 640, 1280 segments,
    # then the window (2560) holds the 213 left, which flow at the rate. The other node sends its
    # burst at the same time (a ring), so a round's first ACK waits behind what of the other's
    # round is still queued there: 320, 640 and 1280 x 124 us less 20 ms (160 x 124 us < 20 ms: no
    # wait). Phase 2: the window (2773) holds the whole message: the plain time.
    per = (lone / 2 - 0.02) / 2763
    ack_waits = sum(k * per - 0.02 for k in (320, 640, 1280))
    assert first == pytest.approx((0.02 + 8 * 0.04 + ack_waits + 213 * per) + (0.02 + 2763 * per), rel=1e-9)
    second = clock.advance(np.zeros(2), allreduce(4_000_000)).max() - first
    assert second == pytest.approx(lone, rel=1e-12)   # the window grew past the pipe: the plain formula


def test_idle_gap_restarts_the_window_reno_but_not_bbr():
    def after_gap(tcp, gap):
        clock = Clock(Network.uniform(2, "100Mbit", "50ms", framing="tcp", ).with_tcp(tcp), 2)
        clock.advance(np.zeros(2), allreduce(200_000))
        before = clock.t.max() + gap
        return clock.advance(np.full(2, gap), allreduce(200_000)).max() - before

    lone = collective_s(Network.uniform(2, "100Mbit", "50ms", framing="tcp"), "allreduce", "ring", (200_000,) * 2)
    assert after_gap("reno", 0.1) < after_gap("reno", 5.0)          # idle 5 s > RTO 0.3 s: restart
    assert after_gap("reno", 5.0) > lone + 0.1                      # at least one more round trip per phase
    assert after_gap("bbr", 5.0) == pytest.approx(after_gap("bbr", 0.1), abs=1e-12)


def test_without_latency_the_model_changes_nothing():
    plain = Network.uniform(4, "1Gbit", "0ms")
    trace = Trace(nodes=4, compute_s=[[0.01] * 4] * 3, events=[allreduce(1_000_000, 4), None, allreduce(8, 4)])
    assert np.array_equal(replay(trace, plain).end_s, replay(trace, plain.with_tcp("reno")).end_s)


def test_replay_with_tcp_equals_the_live_clock_and_mixes_with_plain_networks():
    events = [allreduce(3_000_000, 3), None, Start(1, allreduce(500_000, 3), 1), None, Wait(1),
              allreduce(3_000_000, 3), None]
    trace = Trace(nodes=3, compute_s=[[0.01, 0.02, 0.015]] * len(events), events=events)
    nets = [Network.uniform(3, "100Mbit", f"{lat}ms").with_tcp(tcp) for lat in (1, 40) for tcp in ("off", "reno")]
    many = replay(trace, nets)
    for j, net in enumerate(nets):
        clock = Clock(net, 3)
        live = np.array([clock.advance(np.asarray(c), e) for c, e in zip(trace.compute_s, events, strict=True)])
        assert np.array_equal(many.end_s[:, :, j], live)
        assert np.array_equal(replay(trace, net).end_s, live)
    assert many.total_s[3] > many.total_s[2]   # 40 ms: the window costs round trips


def test_rendezvous_adds_one_way_latency_per_message():
    base = Network.uniform(2, "100Mbit", "20ms").with_tcp("reno")
    c1, c2 = Clock(base, 2), Clock(base.with_tcp("reno:rendezvous=on"), 2)
    for _ in range(2):   # the second collective: windows already open
        t1 = c1.advance(np.zeros(2), allreduce(1_000_000)).max()
        t2 = c2.advance(np.zeros(2), allreduce(1_000_000)).max()
    assert t2 - t1 == pytest.approx(4 * 0.02)   # 2 phases per collective, 2 collectives


def test_symmetric_shortcut_is_the_general_arithmetic(monkeypatch):
    import pysim.network as network

    net = Network.uniform(5, "100Mbit", "30ms", framing="tcp").with_tcp("reno")
    def run():
        clock = Clock(net, 5)
        return [clock.advance(np.full(5, gap), allreduce(700_000, 5)).copy() for gap in (0, 0, 2.0, 0)]
    fast = run()
    monkeypatch.setattr(network, "_table_shape", lambda table: (None, False))
    assert all(np.array_equal(a, b) for a, b in zip(fast, run(), strict=True))


def test_smoothed_rtt_follows_the_queue_as_linux_measures_it():
    assert smoothed_rtt(None, 0.1, 0.05, 10) == pytest.approx(0.15)          # the first sample sets it
    assert smoothed_rtt(0.3, 0.1, 0.0, 2) == pytest.approx(0.1 + 0.2 * 0.875)   # one ACK: 1/8 of the way
    assert smoothed_rtt(0.3, 0.1, 0.0, 1000) == pytest.approx(0.1)           # a long message: its own samples
    assert queue_delay_s(0.5, 2790, 0.000124, 0.1) == pytest.approx(2790 * 0.000124 - 0.1)   # window beyond the pipe
    assert queue_delay_s(0.05, 2790, 0.000124, 0.1) == 0.05                  # no more than the bytes waited
    assert queue_delay_s(0.5, 100, 0.000124, 0.1) == 0.0                     # a window inside the pipe: no queue


def test_restart_counts_rtos_of_the_smoothed_round_trip():
    # Linux over the delay line (ss -ti, 100 ms): srtt 155-163 ms after a 10 MB all-reduce, 1 s idle,
    # window 2790 -> 697 (two halvings); srtt 103 ms after a 0.1 MB one, 697 -> 87 (three)
    m = TcpModel()
    assert window_after_idle(m, 2790, 1.05, 0.16) == 697
    assert window_after_idle(m, 697, 1.05, 0.103) == 87


def test_last_round_grows_with_the_rounds_in_flight():
    # 346 segments from a window of 86 at 100 ms: rounds of 86, 172 and 88; Linux ends at 433-436
    per = 0.1 / 806
    took, after = transfer_s_of(346, 346 * per, 0.1, 86, math.inf)
    assert took == pytest.approx(2 * 0.1 + 88 * per)
    assert after == 86 + 346


def test_connections_keep_their_smoothed_round_trip():
    clock = Clock(Network.uniform(2, "100Mbit", "50ms", framing="tcp").with_tcp("reno"), 2)
    for _ in range(3):
        clock.advance(np.zeros(2), allreduce(10_000_000))
    big = clock.conns[(0, 1)].srtt_s
    assert big > 0.15                              # 5 MB messages queue behind a window beyond the pipe
    clock.advance(np.zeros(2), allreduce(10_000))
    assert 0.1 <= clock.conns[(0, 1)].srtt_s < big  # a small one pulls it back toward the round trip


def test_a_round_waits_for_acks_behind_the_receiver_s_own_burst():
    # 100 segments of 1 ms, RTT 20 ms, window 2: rounds of 2, 4, 8, 16 (16 ms > RTT/2: its
    # first ACK waits 6 ms behind the receiver's own 16 segments), 32 (a wait of 22 ms: a window
    # past the pipe still waits, as on the delay line), then the window (64) holds the 38 left
    took, after = transfer_s_of(100, 0.1, 0.02, 2, math.inf, reverse_burst=True)
    assert took == pytest.approx(4 * 0.02 + 0.006 + (0.02 + 0.022) + 0.038)
    assert after == 102
    assert transfer_s_of(100, 0.1, 0.02, 64, math.inf, reverse_burst=True)[0] == pytest.approx(0.074 + 0.036)
    assert transfer_s_of(100, 0.1, 0.02, 64, math.inf)[0] == pytest.approx(0.1)   # one way only: no wait
    whole = 100, 0.1, 0.02, 100, math.inf   # a window that holds the message: no rounds, no wait
    assert transfer_s_of(*whole, reverse_burst=True) == transfer_s_of(*whole)
    # ... and exactly the plain time, as without the model (27 x (0.1234567 / 27) is not 0.1234567)
    assert transfer_s_of(27, 0.1234567, 0.02, 30, math.inf, reverse_burst=True)[0] == 0.1234567
