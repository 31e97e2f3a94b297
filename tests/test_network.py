"""Cost formulas against hand-computed values; parsing and its errors."""

import json
import math

import pytest

from pysim.network import (
    FRAMINGS,
    Framing,
    Link,
    Network,
    bytes_received,
    bytes_sent,
    collective_s,
    format_bandwidth,
    framing_bytes,
    load_network_file,
    network_to_json,
    parse_bandwidth,
    parse_framing,
    parse_latency,
    parse_network,
)
from pysim.schedule import phases


def test_parse_bandwidth_units():
    assert parse_bandwidth("100Mbit") == 100e6
    assert parse_bandwidth("1Gbps") == 1e9
    assert parse_bandwidth("25GB/s") == 25e9 * 8
    assert parse_bandwidth("10 Mbit/s") == 10e6
    assert parse_bandwidth("1.5e3kbps") == 1.5e6
    assert parse_bandwidth(5e6) == 5e6
    assert parse_bandwidth("1e9bit") == 1e9


@pytest.mark.parametrize("bare", ["100", "1e9", " 20 "])
def test_a_string_without_unit_is_refused(bare):
    # --bandwidth 100 once ran at 100 bit/s and --latency 20 at 20 s: a unit nobody asked for
    with pytest.raises(ValueError, match="give a unit") as e:
        parse_bandwidth(bare)
    assert "\n" not in str(e.value) and "Mbit" in str(e.value)
    with pytest.raises(ValueError, match="give a unit.*ms"):
        parse_latency(bare)


@pytest.mark.parametrize("fields", [(-1e8, 1e8, 0.02), (1e8, float("nan"), 0.0), (1e8, 1e8, -0.02),
                                    (float("inf"), 1e8, 0.0), (1e8, 1e8, float("nan")), (0.0, 1e8, 0.0),
                                    ("1Gbit", 1e8, 0.0), (True, 1e8, 0.0)])
def test_link_refuses_non_finite_negative_or_non_numeric_fields(fields):
    with pytest.raises(ValueError, match="bad link") as e:
        Link(*fields)
    assert "\n" not in str(e.value)


def test_network_file_with_negative_rates_is_refused(tmp_path):
    f = tmp_path / "net.json"
    f.write_text(json.dumps({"links": [[-1, -1, 0.02]], "inter": None, "group_size": None}))
    with pytest.raises(ValueError, match="bad link: up_bps = -1"):
        load_network_file(f)


def test_capital_b_means_bytes_lower_case_b_bits():
    assert parse_bandwidth("100MBps") == parse_bandwidth("100MB/s") == parse_bandwidth("100MB") == 800e6
    assert parse_bandwidth("100Mbps") == parse_bandwidth("100mbit") == parse_bandwidth("100Mbit/s") == 100e6
    for ambiguous in ("100mb", "100Mb", "1gb"):
        with pytest.raises(ValueError, match="ambiguous.*bit/s.*B/s"):
            parse_bandwidth(ambiguous)


@pytest.mark.parametrize("bad", ["", "fast", "-1Mbit", "0Gbps", "100Mbit/h", "1e999Gbps", "10 parsecs", None, True])
def test_bad_bandwidth_one_line_error(bad):
    with pytest.raises(ValueError, match="bad bandwidth") as e:
        parse_bandwidth(bad)
    assert "\n" not in str(e.value)


def test_format_bandwidth_rounds_before_choosing_the_unit():
    assert format_bandwidth(999.6e6) == "1 Gbit/s" and format_bandwidth(93.5e6) == "93.5 Mbit/s"
    assert format_bandwidth(1e8) == "100 Mbit/s" and format_bandwidth(5) == "5 bit/s"


def test_parse_latency():
    assert parse_latency("20ms") == pytest.approx(0.02)
    assert parse_latency("150us") == pytest.approx(150e-6)
    assert parse_latency("0.1s") == 0.1
    assert parse_latency(0) == 0.0 and parse_latency("0") == 0.0
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


def test_per_message_framing_constant_is_charged_to_time_not_bytes():
    net = Network.uniform(2, 8, 0.0, framing=Framing(per_message=3))
    assert collective_s(net, "allgather", "ring", (10, 10)) == pytest.approx(13.0)
    assert bytes_sent("allgather", "ring", (10, 10)) == [10, 10]
    assert framing_bytes(net, "allgather", "ring", (10, 10)) == [3, 3]


def test_tcp_framing_per_segment():
    tcp = FRAMINGS["tcp"]
    # 10 MB in 1448-byte segments: ceil(1e7 / 1448) = 6907 frames of 66 header bytes (4.6%)
    assert tcp.wire_bytes(10_000_000) == 10_000_000 + 6907 * 66
    assert tcp.wire_bytes(1448) == 1514 and tcp.wire_bytes(1449) == 1449 + 2 * 66
    assert tcp.wire_bytes(0) == 66  # an empty message still takes one frame
    assert FRAMINGS["tcp-ethernet"].wire_bytes(1448) == 1538
    assert FRAMINGS["ideal"].wire_bytes(1234) == 1234
    # a 2-rank ring all-reduce of 10 MB at 100 Mbit/s: 2 phases, each a 5 MB chunk each way, and
    # each direction also carries the ACKs of the other's chunk: 66 bytes per 2 segments
    net = Network.uniform(2, "100Mbit", 0.0, framing="tcp")
    chunk = 5_000_000
    frames = -(-chunk // 1448)
    acks = 66 * -(-frames // 2)
    assert tcp.acks(chunk) == acks and tcp.acks(1448) == 66 and tcp.acks(3 * 1448) == 2 * 66
    assert collective_s(net, "allreduce", "ring", (chunk, chunk)) == \
        pytest.approx(2 * 8 * (chunk + 66 * frames + acks) / 1e8)
    assert framing_bytes(net, "allreduce", "ring", (chunk, chunk)) == [2 * (66 * frames + acks)] * 2
    assert parse_framing("40,1448,66") == Framing(40, 1448, 66) and Framing(40, 1448, 66).acks(10**6) == 0
    assert parse_framing("40,1448,66,66") == Framing(40, 1448, 66, 66)
    with pytest.raises(ValueError, match="framing"):
        parse_framing("1,2")
    with pytest.raises(ValueError, match="framing"):
        parse_framing("jumbo")
    with pytest.raises(ValueError, match="MSS"):
        Framing(0, 0, 66)
    with pytest.raises(ValueError, match="MSS"):
        Framing(0, 0, 0, 66)
    with pytest.raises(ValueError, match="segments_per_ack"):
        Framing(0, 1448, 66, 66, 0)
    with pytest.raises(ValueError, match=">= 0"):
        Framing(0, 1448, 66, -1)


def test_acks_load_the_reverse_path_only_when_it_is_busy():
    # 8 bit/s links: a byte is a second. One 1448-byte segment each: ACK 10 bytes per segment.
    f = Framing(0, 1448, 0, 10, 1)
    one_way = Network.uniform(2, 8, 0.0, framing=f).phase_s([(0, 1, 1448)])
    both_ways = Network.uniform(2, 8, 0.0, framing=f).phase_s([(0, 1, 1448), (1, 0, 1448)])
    assert one_way == pytest.approx(1448.0)             # the ACK travels on the idle reverse link
    assert both_ways == pytest.approx(1448.0 + 10.0)    # each uplink: its data + the other's ACK
    assert framing_bytes(f, "allreduce", "ring", (1448, 1448)) == [2 * 10, 2 * 10]


def test_phase_ends_with_its_slowest_message_not_max_latency_plus_max_load():
    # node 0 has a 1 s latency; all links 8 bit/s (1 byte = 1 s)
    net = Network.per_node([Link(8.0, 8.0, 1.0), Link(8.0, 8.0, 0.0), Link(8.0, 8.0, 0.0)])
    # 0->1: 1 byte, latency 1 -> ends at 2 s; 1->2: 10 bytes, latency 0 -> ends at 10 s.
    # max(lat) + max(load) would say 1 + 10 = 11 s.
    assert net.phase_s([(0, 1, 1), (1, 2, 10)]) == pytest.approx(10.0)
    assert net.phase_parts([(0, 1, 1), (1, 2, 10)]) == (pytest.approx(10.0), 0.0)


def test_messages_sharing_a_link_share_its_bandwidth_fairly():
    # star gather into node 0's downlink (8 bit/s): 2 bytes from node 1 (latency 5 s), 10 from node 2.
    # Processor sharing: the 2-byte message ends after 2 + 2 = 4 s of transfer (+5 latency = 9 s);
    # the 10-byte one after 2 + 10 = 12 s. The old model said max latency 5 + load 12 = 17 s.
    net = Network.per_node([Link(8.0, 8.0, 0.0), Link(8.0, 8.0, 5.0), Link(8.0, 8.0, 0.0)])
    assert net.phase_s([(1, 0, 2), (2, 0, 10)]) == pytest.approx(12.0)
    assert net.phase_s([(1, 0, 10), (2, 0, 2)]) == pytest.approx(5 + 12.0)


def test_schedule_ring_allreduce_chunks_leave_and_arrive():
    ph = phases("allreduce", "ring", (5, 6, 7))
    assert len(ph) == 4
    # reduce-scatter step 0: node i sends its own chunk i to i+1
    assert [(m.src, m.dst, m.item, m.nbytes) for m in ph[0]] == [(0, 1, 0, 5), (1, 2, 1, 6), (2, 0, 2, 7)]
    # after n-1 steps node i owns chunk i+1: all-gather step 0 sends it
    assert [m.item for m in ph[2]] == [1, 2, 0]
    assert phases("allreduce", "ring", (5,)) == ()


def test_bytes_sent_and_received_per_member_by_hand():
    # all-gather of packets 1, 20, 300 bytes around a ring of 3: each member receives the other two
    assert bytes_received("allgather", "ring", (1, 20, 300)) == [320, 301, 21]
    assert bytes_sent("allgather", "ring", (1, 20, 300)) == [1 + 300, 20 + 1, 300 + 20]
    # ring all-reduce of chunk packets 5, 6, 7: member i sends every chunk but i+1 (reduce-scatter) and
    # every chunk but i+2 (all-gather)
    assert bytes_sent("allreduce", "ring", (5, 6, 7)) == [5 + 7 + 6 + 5, 6 + 5 + 7 + 6, 7 + 6 + 5 + 7]
    assert bytes_received("allreduce", "ring", (5, 6, 7)) == [7 + 6 + 5 + 7, 5 + 7 + 6 + 5, 6 + 5 + 7 + 6]
    # star: workers send their packets to node 0, which sends its (the mean's) back to each
    assert bytes_sent("allreduce", "star", (9, 4, 4)) == [9 + 9, 4, 4]
    assert bytes_received("allreduce", "star", (9, 4, 4)) == [4 + 4, 9, 9]

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
    with pytest.raises(ValueError, match="groups need at least one node each, got group size 0"):
        parse_network(3, "1Gbps", "1ms", "two-tier:0:1Gbps:1ms")     # it said "group size 0 must divide the 3 nodes"
    with pytest.raises(ValueError, match="members"):
        collective_s(U4, "allreduce", "ring", (1, 2))
    with pytest.raises(ValueError, match="unknown collective"):
        collective_s(U4, "alltoall", "ring", (1, 1, 1, 1))


def test_single_node_costs_nothing():
    assert collective_s(Network.uniform(1, "1Mbit", "1s"), "allreduce", "ring", (100,)) == 0.0
    assert math.isfinite(collective_s(U4, "allreduce", "ring", (0, 0, 0, 0)))


def test_network_file_round_trip_and_errors(tmp_path):
    net = Network.uniform(2, "100Mbit", "0.2ms", framing=Framing(40, 1448, 66))
    p = tmp_path / "link.json"
    import json

    p.write_text(json.dumps({**network_to_json(net), "calibration": {"note": "extra keys are ignored"}}))
    back = load_network_file(p)
    assert back == net and back.with_nodes(4).n == 4
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_network_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_network_file(tmp_path / "missing.json")


@pytest.mark.parametrize("link", [["1Gbit", 1e9, 0.0], [1e9, 1e9], "fast", [1e9, None, 0.0]])
def test_network_file_with_malformed_link_is_refused(tmp_path, link):
    f = tmp_path / "net.json"
    f.write_text(json.dumps({"links": [link], "inter": None, "group_size": None}))
    with pytest.raises(ValueError, match="malformed network description: a link is"):
        load_network_file(f)


def _reference_message_parts(net: Network, messages) -> list[tuple[float, float]]:
    """The fair-share rule written out plainly: each link's load is every message (and ACK stream)
    crossing it; a message's transfer is its slowest link's share."""
    loads: dict[tuple, list[float]] = {}
    info = []
    for src, dst, nbytes in messages:
        bits = 8.0 * net.framing.wire_bytes(nbytes)
        lat, res = net._resources(src, dst)
        info.append((lat, bits, res))
        for key, _ in res:
            loads.setdefault(key, []).append(bits)
        acks = 8.0 * net.framing.acks(nbytes)
        if acks:
            for key, _ in net._resources(dst, src)[1]:
                loads.setdefault(key, []).append(acks)
    return [(lat, max(sum(min(w, bits) for w in loads[key]) / bps for key, bps in res)) for lat, bits, res in info]


@pytest.mark.parametrize("framing", ["ideal", "tcp", "tcp-ethernet"])
def test_message_parts_equal_the_fair_share_rule_to_the_last_bit(framing):
    import random

    rng = random.Random(5)
    nets = [Network.uniform(12, "1Gbit", "1ms", framing=framing),
            Network.two_tier(12, 4, "10Gbit", "0.1ms", "200Mbit", "15ms", framing=framing),
            Network.per_node([Link.of(f"{rng.randint(10, 1000)}Mbit", f"{rng.randint(1, 30)}ms") for _ in range(12)],
                             framing=framing)]
    for net in nets:
        for _ in range(40):
            k = rng.randint(1, 30)    # some links carry one message, some several, sizes repeat
            messages = [(rng.randrange(12), rng.randrange(12), rng.choice([0, 1, 1448, 2936, 70_000, 2936]))
                        for _ in range(k)]
            messages = [(s, d, b) for s, d, b in messages if s != d]
            assert net.message_parts(messages) == _reference_message_parts(net, messages)


def test_a_two_tier_network_describes_its_links_in_their_units():
    net = Network.two_tier(4, 2, "10Gbps", "10us", "100Mbit", "20ms")
    assert net.describe() == "two-tier, groups of 2: intra 10 Gbit/s 0.01 ms, inter 100 Mbit/s 20 ms"


def test_a_network_resized_to_more_nodes_keeps_its_tcp_window_model():
    net = Network.uniform(1, "1Gbps", "1ms").with_tcp("cubic")
    assert net.with_nodes(4).tcp == net.tcp is not None
