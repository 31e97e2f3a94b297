"""The NumPy phase cost gives the Python loop's floats exactly, and collectives use it for large phases."""

import random

import pytest

from pysim import fair_share
from pysim.network import Link, Network, _collective_parts, _link_arrays, _slowest, collective_parts
from pysim.schedule import phases


def _networks(framing: str, n: int, rng: random.Random) -> list[Network]:
    return [Network.uniform(n, "1Gbit", "1ms", framing=framing),
            Network.two_tier(n, 4, "10Gbit", "0.1ms", "200Mbit", "15ms", framing=framing),
            Network.two_tier(n, 4, "1Gbit", 0.0, "100Mbit", 0.0, framing=framing),   # latency hides nothing
            Network.per_node(own := [Link(rng.randint(10, 1000) * 10**6, rng.randint(10, 1000) * 10**6,
                                          rng.choice([0, 0.02])) for _ in range(n)], framing=framing),
            Network(tuple(own), Link.of("50Mbit", 0.0), 4, framing=framing)]   # groups of uneven nodes


@pytest.mark.parametrize("framing", ["ideal", "tcp", "tcp-ethernet"])
def test_a_phase_costs_the_loops_floats_to_the_last_bit(framing):
    """Random phases where links carry one message or many, sizes repeat, messages cross groups,
    and ACK streams share links with messages: NumPy against the rule message by message, and
    the network's own methods (which take NumPy for 48+ messages) against both."""
    rng = random.Random(7)
    for net in _networks(framing, 12, rng):
        links = _link_arrays(net)
        for _ in range(60):
            k = rng.randint(1, 60)
            messages = [(rng.randrange(12), rng.randrange(12), rng.choice([0, 1, 700, 1448, 2936, 70_001]), 0)
                        for _ in range(k)]
            messages = [m for m in messages if m[0] != m[1]] or [(0, 1, 5, 0)]
            rule = net._each_message([m[:3] for m in messages])
            assert fair_share.phase_parts(links, fair_share.as_array(messages)) == _slowest(rule)
            lat, transfer = fair_share.message_parts(links, fair_share.as_array(messages))
            assert list(zip(lat.tolist(), transfer.tolist(), strict=True)) == rule
            assert net.message_parts([m[:3] for m in messages]) == rule
            assert net.phase_parts([m[:3] for m in messages]) == _slowest(rule)


@pytest.mark.parametrize("op, algo, groups", [("allreduce", "ring", None), ("allreduce", "star", None),
                                              ("allgather", "ring", None), ("broadcast", "tree", None),
                                              ("allreduce", "ring", [list(range(0, 64, 2)), list(range(1, 64, 2))])])
def test_collectives_of_many_members_cost_what_the_loop_says(op, algo, groups):
    """64 members: phases of 63-64 messages go through NumPy; the sum over phases is the loop's."""
    rng = random.Random(3)
    for net in _networks("tcp", 64, rng):
        sizes = tuple(rng.choice([2932, 2936, 5000]) for _ in range(64))
        total = latency = 0.0
        for phase in phases(op, algo, sizes, groups):
            s, lat = _slowest(net._each_message([(m.src, m.dst, m.nbytes) for m in phase]))
            total += s
            latency += lat
        _collective_parts.cache_clear()
        assert collective_parts(net, op, algo, sizes, groups) == (total, latency)


def test_large_phases_take_the_numpy_path(monkeypatch):
    calls = []
    real = fair_share.phase_parts
    monkeypatch.setattr(fair_share, "phase_parts", lambda links, m: calls.append(len(m)) or real(links, m))
    _collective_parts.cache_clear()
    collective_parts(Network.uniform(64, "1Gbit", "1ms"), "allreduce", "ring", (100,) * 64)
    assert calls == [64] * 126
    calls.clear()
    collective_parts(Network.uniform(8, "1Gbit", "1ms"), "allreduce", "ring", (100,) * 8)
    assert calls == []    # small phases: the loop


def test_of_two_equally_slow_messages_the_first_gives_the_latency_part():
    """8 bit/s links (a byte is a second): 0 -> 1 has 1 s of latency and 1 byte, 2 -> 3 none and 2
    bytes; both end at 2 s, and the loop keeps the first."""
    net = Network.per_node([Link(8, 8, 1.0), Link(8, 8, 0.0), Link(8, 8, 0.0), Link(8, 8, 0.0)])
    for messages in ([(0, 1, 1, 0), (2, 3, 2, 0)], [(2, 3, 2, 0), (0, 1, 1, 0)]):
        expected = net.phase_parts([m[:3] for m in messages])
        assert expected[0] == 2.0 and expected[1] == (1.0 if messages[0][0] == 0 else 0.0)
        assert fair_share.phase_parts(_link_arrays(net), fair_share.as_array(messages)) == expected
