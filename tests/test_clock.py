"""The virtual clock as a pure function of (trace, network)."""

import numpy as np
import pytest

from pysim.clock import replay
from pysim.network import Network, collective_s
from pysim.trace import Collective, Trace, trace_from_nodes


def small_trace() -> Trace:
    c = Collective("allreduce", "ring", (100, 100))
    return Trace(2, compute_s=[[1.0, 3.0], [0.5, 0.5], [2.0, 1.0]], flops=[[1e9, 3e9], [5e8, 5e8], [2e9, 1e9]],
                 events=[c, c, None], step_ends=[2])


def test_collective_starts_when_last_member_arrives():
    net = Network.uniform(2, 8 * 100, 0.0)  # 100 bytes per second
    cost = collective_s(net, "allreduce", "ring", (100, 100))
    tl = replay(small_trace(), net)
    assert cost == pytest.approx(2.0)
    assert list(tl.end_s[0]) == [3.0 + cost, 3.0 + cost]
    assert list(tl.end_s[1]) == [5.5 + cost, 5.5 + cost]
    assert list(tl.end_s[2]) == [5.5 + cost + 2.0, 5.5 + cost + 1.0]
    assert list(tl.step_end_s) == [7.5 + 2.0]


def test_vectorised_replay_equals_one_by_one():
    nets = [Network.uniform(2, f"{b}Mbit", f"{lat}ms") for b in (1, 10, 100) for lat in (0, 5, 50)]
    many = replay(small_trace(), nets)
    for j, net in enumerate(nets):
        one = replay(small_trace(), net)
        assert np.array_equal(many.step_end_s[:, j], one.step_end_s)


def test_device_profile_uses_flops():
    tl = replay(small_trace(), Network.uniform(2, "1Gbps"), device="h100")
    from pysim.compute import device_flops_per_s

    assert tl.compute_s[0][1] == 3e9 / device_flops_per_s("h100")
    with pytest.raises(ValueError, match="device profile"):
        replay(small_trace(), Network.uniform(2, "1Gbps"), device="tpu9000")


def test_trace_save_load_round_trip(tmp_path):
    t = small_trace()
    t.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    assert back == t
    net = Network.uniform(2, "10Mbit", "3ms")
    assert np.array_equal(replay(back, net).end_s, replay(t, net).end_s)


def test_trace_version_and_malformed_errors(tmp_path):
    d = small_trace().to_json()
    d["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Trace.from_json(d)
    (tmp_path / "x.json").write_text("not json")
    with pytest.raises(ValueError, match="not a JSON trace"):
        Trace.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="malformed"):
        Trace.from_json({"version": 2, "nodes": 2})


def test_trace_from_nodes_checks_agreement():
    c = Collective("allgather", "ring", (5, 6))
    t = trace_from_nodes([[(1.0, 0.0, c), (0.5, 0.0, None)], [(2.0, 0.0, c), (0.7, 0.0, None)]], [1])
    assert t.compute_s == [[1.0, 2.0], [0.5, 0.7]] and t.events == [c, None]
    with pytest.raises(ValueError, match="different numbers"):
        trace_from_nodes([[(1.0, 0.0, c)], []], [])
    with pytest.raises(ValueError, match="disagree"):
        trace_from_nodes([[(1.0, 0.0, c)], [(1.0, 0.0, Collective("allgather", "ring", (5, 7)))]], [])
