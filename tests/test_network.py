"""Cost formulas against hand-computed values; parsing and its errors."""

import math

import pytest

from pysim.network import (
    Link,
    Network,
    bytes_received,
    bytes_sent,
    collective_s,
    parse_bandwidth,
    parse_latency,
    parse_network,
)


def test_parse_bandwidth_units():
    assert parse_bandwidth("100Mbit") == 100e6
    assert parse_bandwidth("1Gbps") == 1e9
    assert parse_bandwidth("25GB/s") == 25e9 * 8
    assert parse_bandwidth("10 Mbit/s") == 10e6
    assert parse_bandwidth("1.5e3kbps") == 1.5e6
    assert parse_bandwidth(5e6) == 5e6
    assert parse_bandwidth("1e9") == 1e9


@pytest.mark.parametrize("bad", ["", "fast", "-1Mbit", "0Gbps", "100Mbit/h", "1e999Gbps", "10 parsecs", None, True])
def test_bad_bandwidth_one_line_error(bad):
    with pytest.raises(ValueError, match="bad bandwidth") as e:
        parse_bandwidth(bad)
    assert "\n" not in str(e.value)


def test_parse_latency():
    assert parse_latency("20ms") == pytest.approx(0.02)
    assert parse_latency("150us") == pytest.approx(150e-6)
    assert parse_latency("0.1s") == 0.1
    assert parse_latency(0) == 0.0
    for bad in ("-5ms", "5 lightyears", "abc", "", None):
        with pytest.raises(ValueError, match="bad latency"):
            parse_latency(bad)


# Uniform network where one byte takes exactly 1 s (8 bit/s) and latency is 0.5 s.
U4 = Network.uniform(4, 8, 0.5)


def test_ring_allreduce_formula():
    # 2(n-1)(alpha + 8c/beta) = 6 * (0.5 + 10)
    assert collective_s(U4, "allreduce", "ring", (10, 10, 10, 10)) == pytest.approx(63.0)
    # unequal chunks: each step waits for its largest chunk in flight; every step carries all chunks
    assert collective_s(U4, "allreduce", "ring", (10, 20, 10, 10)) == pytest.approx(6 * (0.5 + 20))


def test_ring_allgather_unequal_packets():
    # 3 steps, each carries every packet somewhere on the ring, so each waits for the 40-byte one
    assert collective_s(U4, "allgather", "ring", (10, 40, 5, 5)) == pytest.approx(3 * (0.5 + 40))
    n2 = Network.uniform(2, 8, 0.25)
    assert collective_s(n2, "allgather", "ring", (3, 7)) == pytest.approx(0.25 + 7)


def test_reduce_scatter_broadcast_star():
    assert collective_s(U4, "reduce_scatter", "ring", (4, 4, 4, 4)) == pytest.approx(3 * 4.5)
    assert collective_s(U4, "broadcast", "star", (10, 10, 10, 10)) == pytest.approx(0.5 + 30)
    assert collective_s(U4, "broadcast", "tree", (10, 10, 10, 10)) == pytest.approx(2 * 10.5)
    # parameter server: root's downlink takes 3 packets, then its uplink sends 3
    assert collective_s(U4, "allreduce", "star", (10, 10, 10, 10)) == pytest.approx(2 * (0.5 + 30))


def test_heterogeneous_slowest_link_bounds_each_step():
    fast, slow = Link(80.0, 80.0, 0.0), Link(8.0, 8.0, 0.1)
    net = Network.per_node([fast, slow, fast])
    # each ring step has a message into and out of the slow node: 10 bytes at 8 bit/s, latency 0.1
    assert collective_s(net, "allreduce", "ring", (10, 10, 10)) == pytest.approx(4 * (0.1 + 10.0))
    # asymmetric: slow uplink only
    net2 = Network.per_node([Link(8.0, 80.0, 0.0), fast])
    assert collective_s(net2, "allgather", "ring", (10, 10)) == pytest.approx(10.0)


def test_two_tier_crossing_uses_inter_link():
    net = Network.two_tier(4, 2, 800, 0.001, 8, 0.05)
    # ring 0->1->2->3->0: edges 1->2 and 3->0 cross groups; 10 bytes at 8 bit/s = 10 s, latency 50 ms
    assert collective_s(net, "allgather", "ring", (10, 10, 10, 10)) == pytest.approx(3 * (0.05 + 10.0))
    intra_only = Network.two_tier(2, 2, 800, 0.001, 8, 0.05)
    assert collective_s(intra_only, "allgather", "ring", (10, 10)) == pytest.approx(0.001 + 0.1)


def test_overhead_bytes_added_per_message():
    net = Network.uniform(2, 8, 0.0, overhead_bytes=3)
    assert collective_s(net, "allgather", "ring", (10, 10)) == pytest.approx(13.0)


def test_bytes_sent_received_balance():
    for op, algo, sizes in [("allreduce", "ring", (5, 6, 7)), ("allreduce", "star", (9, 9, 9)),
                            ("allgather", "ring", (1, 20, 300)), ("broadcast", "tree", (4, 4, 4, 4, 4)),
                            ("broadcast", "star", (4, 4, 4))]:
        assert sum(bytes_sent(op, algo, sizes)) == sum(bytes_received(op, algo, sizes))
    assert bytes_received("allgather", "ring", (1, 20, 300)) == [320, 301, 21]
    assert bytes_sent("allreduce", "ring", (5, 6, 7)) == [5 + 7 + 6 + 5, 6 + 5 + 7 + 6, 7 + 6 + 5 + 7]


def test_parse_network_topologies_and_errors():
    assert parse_network(3, "1Gbps", "1ms").n == 3
    tt = parse_network(4, "10Gbps", "100us", "two-tier:2:100Mbit:30ms")
    assert tt.group_size == 2 and tt.inter.up_bps == 100e6
    sn = parse_network(3, "1Gbps", "1ms", "slow-node:1:10Mbit:50ms")
    assert sn.links[1].up_bps == 10e6 and sn.links[0].up_bps == 1e9
    for bad in ("ring", "two-tier:3:1Gbps:1ms", "slow-node:5:1Mbit:1ms", "two-tier:x:1:1", "slow-node:0:0bps:1ms"):
        with pytest.raises(ValueError) as e:
            parse_network(4, "1Gbps", "1ms", bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="nodes"):
        Network.uniform(0, "1Gbps")
    with pytest.raises(ValueError, match="members"):
        collective_s(U4, "allreduce", "ring", (1, 2))
    with pytest.raises(ValueError, match="unknown collective"):
        collective_s(U4, "alltoall", "ring", (1, 1, 1, 1))


def test_single_node_costs_nothing():
    assert collective_s(Network.uniform(1, "1Mbit", "1s"), "allreduce", "ring", (100,)) == 0.0
    assert math.isfinite(collective_s(U4, "allreduce", "ring", (0, 0, 0, 0)))
