"""The live clock, step by step, against timelines computed by hand from the network model's formulas."""

import math

import node_programs
import numpy as np
import pytest

from pysim.clock import ComputeScaling
from pysim.launch import run_nodes
from pysim.network import Network

LAT, BW = 0.002, 10e6   # 2 ms, 10 Mbit/s


def dense_packet(values: int) -> int:
    return 24 + 4 + 4 * values


def hop(nbytes: int) -> float:
    """One ring phase on uniform links: every node sends one message of nbytes to its neighbour."""
    return LAT + 8 * nbytes / BW


@pytest.mark.parametrize("processes", [3, 1])
def test_blocking_all_reduces_with_a_straggler_and_jitter(processes):
    speeds, jitter, seed = (1.0, 0.5, 1.0), 0.2, 3
    scaling = ComputeScaling(speeds, jitter, seed)
    res = run_nodes(node_programs.fixed_compute_timeline, 3, (Network.uniform(3, BW, LAT), scaling, "blocking"),
                    processes=processes)
    collective = 4 * hop(dense_packet(100))   # ring of 3: 2(n-1) phases of one 100-value chunk packet
    t = np.zeros(3)
    want, last = [], []
    for step in range(3):
        factor = np.exp(jitter * np.random.default_rng([seed, step]).standard_normal(3))
        arrive = t + 0.010 / np.array(speeds) * factor
        last.append(int(arrive.argmax()))
        t = np.full(3, arrive.max() + collective)   # starts when the last node arrives, ends for all at once
        want.append(t[0])
    for r in res:
        assert r["clocks"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert 1 in last and len(set(last)) > 1   # the slow node set the pace, but jitter can outweigh it


def test_two_streams_in_flight_share_the_links():
    res = run_nodes(node_programs.fixed_compute_timeline, 2, (Network.uniform(2, BW, LAT), None, "streams"))
    latency = 2 * LAT                                  # ring of 2: two phases
    transfer = 2 * 8 * dense_packet(5000) / BW         # each phase moves one 5000-value chunk each way
    # both start after the 10 ms block, spend their latency, then move their bytes at half the rate each
    end = 0.010 + latency + 2 * transfer
    for r in res:
        assert r["clocks"] == pytest.approx([end], rel=1e-12)
    assert end > 0.010 + latency + transfer + 0.001    # alone, one would have ended a transfer earlier


def test_grouped_all_reduce_costs_one_group_on_uniform_links():
    res = run_nodes(node_programs.fixed_compute_timeline, 4, (Network.uniform(4, BW, LAT), None, "grouped"))
    want = 0.010 + 2 * hop(dense_packet(500))          # each pair: a ring of 2 over halves of the vector
    for r in res:
        assert r["clocks"] == pytest.approx([want], rel=1e-12)
    assert not math.isclose(want, 0.010 + 6 * hop(dense_packet(250)))   # not the all-node ring's cost
