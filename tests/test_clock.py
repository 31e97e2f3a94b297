"""The virtual clock as a pure function of (trace, network)."""

import numpy as np
import pytest

from pysim.clock import Clock, ComputeScaling, replay
from pysim.network import Framing, Network, collective_s
from pysim.trace import Collective, Start, Trace, Wait, segments_from_json, trace_from_nodes


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


def test_segments_from_json_reads_a_shared_object_once():
    shared, alone = ["allreduce", "ring", [4, 4, 4]], ["allreduce", "ring", [4, 4, 4]]
    records = [[(1.0, 0.0, shared), (0.5, 0.0, None)], [(2.0, 0.0, shared), (0.7, 0.0, None)],
               [(3.0, 0.0, alone), (0.9, 0.0, None)]]
    segs = segments_from_json(records)
    assert segs[0][0][2] is segs[1][0][2]              # one event for the object two nodes share
    assert segs[2][0][2] == segs[0][0][2] and segs[2][0][2] is not segs[0][0][2]
    assert [s[1] for s in segs] == [(0.5, 0.0, None), (0.7, 0.0, None), (0.9, 0.0, None)]
    assert trace_from_nodes(segs, [1]).events == [Collective("allreduce", "ring", (4, 4, 4)), None]
    records[2][0] = (3.0, 0.0, ["allreduce", "ring", [4, 4, 5]])
    with pytest.raises(ValueError, match="disagree"):
        trace_from_nodes(segments_from_json(records), [1])


# ---------------------------------------------------------------- non-blocking collectives
# Two nodes on 8 bit/s links (1 byte = 1 s); an all-gather of (b, b) is one ring phase: latency + b seconds.

def two_nodes(latency: float = 0.0) -> Network:
    return Network.uniform(2, 8, latency)


def gather(nbytes: int) -> Collective:
    return Collective("allgather", "ring", (nbytes, nbytes))


def trace_of(nodes: int, segments: list[tuple[list[float], object]]) -> Trace:
    t = Trace(nodes)
    for comp, event in segments:
        t.compute_s.append(list(comp))
        t.flops.append([0.0] * nodes)
        t.events.append(event)
        if event is None:
            t.step_ends.append(len(t.events) - 1)
    t.check()
    return t


def test_bucketed_allreduce_overlaps_backward():
    # backward: 3 buckets of 1 s compute; each bucket's collective takes 1.5 s, all on stream 0.
    # bucket 0: issued 1.0, runs 1.0-2.5; bucket 1: issued 2.0, waits for the stream, 2.5-4.0;
    # bucket 2: issued 3.0, 4.0-5.5. The step ends at 5.5 = first bucket + 3 x 1.5 (comm-bound),
    # where blocking collectives would take 3 x (1 + 1.5) = 7.5.
    c = Collective("allgather", "ring", (3, 3))  # 1.5 s with latency 0 at 2 bytes/s
    net = Network.uniform(2, 16, 0.0)
    one = [1.0, 1.0]
    overlapped = trace_of(2, [(one, Start(0, c)), (one, Start(1, c)), (one, Start(2, c)),
                              ([0, 0], Wait(0)), ([0, 0], Wait(1)), ([0, 0], Wait(2)), ([0, 0], None)])
    tl = replay(overlapped, net)
    assert list(tl.step_end_s) == [5.5]
    assert list(tl.waited_s) == [2.5, 2.5]
    blocking = trace_of(2, [(one, c), (one, c), (one, c), ([0, 0], None)])
    assert list(replay(blocking, net).step_end_s) == [7.5]
    # cheap collectives (0.5 s): the step ends when the last bucket's collective does, 3 + 0.5
    cheap = Network.uniform(2, 48, 0.0)
    assert replay(overlapped, cheap).step_end_s[0] == pytest.approx(3.5)


def test_streaming_collective_waited_tau_steps_later():
    # a 2.5 s collective started after step 0's compute (t = 1), waited after tau more steps of 1 s
    def streaming(tau: int) -> Trace:
        segs = [([1.0, 1.0], Start(0, gather(2), stream=1)), ([0, 0], None)]
        segs += [([1.0, 1.0], None)] * (tau - 1)
        segs += [([1.0, 1.0], Wait(0)), ([0, 0], None)]
        return trace_of(2, segs)

    net = two_nodes(0.5)  # 0.5 + 2 = 2.5 s
    assert replay(streaming(2), net).total_s == pytest.approx(3.5)   # waits at 3.0 for 0.5 s
    assert replay(streaming(3), net).total_s == pytest.approx(4.0)   # done at 3.5, needed at 4.0: no wait
    assert list(replay(streaming(3), net).waited_s) == [0.0, 0.0]


def test_concurrent_collectives_on_two_streams_share_the_link():
    # each collective alone: latency 1 s + transfer 4 s = 5 s
    net = two_nodes(1.0)
    both = trace_of(2, [([0, 0], Start(0, gather(4), 0)), ([0, 0], Start(1, gather(4), 1)),
                        ([0, 0], Wait(0)), ([0, 0], Wait(1)), ([0, 0], None)])
    tl = replay(both, net)
    # both wait out their latency (0-1 s), then share: 4 s of transfer each at half rate -> both end at 9 s
    assert tl.end_s[2].tolist() == pytest.approx([9.0, 9.0]) and tl.total_s == pytest.approx(9.0)
    # staggered: A on stream 0 at 0, B on stream 1 issued at 3. A transfers alone 1-4 (3 s of work),
    # then shares with B from 4: its last 1 s of work takes 2 s -> ends at 6. B has done 1 s of work
    # by 6, then 3 s alone -> ends at 9. On one stream B would wait for A: 5 + 5 = 10.
    staggered = trace_of(2, [([0, 0], Start(0, gather(4), 0)), ([3, 3], Start(1, gather(4), 1)),
                             ([0, 0], Wait(0)), ([0, 0], Wait(1)), ([0, 0], None)])
    tl = replay(staggered, net)
    assert tl.end_s[2].tolist() == pytest.approx([6.0, 6.0]) and tl.total_s == pytest.approx(9.0)
    same_stream = trace_of(2, [([0, 0], Start(0, gather(4), 0)), ([3, 3], Start(1, gather(4), 0)),
                               ([0, 0], Wait(0)), ([0, 0], Wait(1)), ([0, 0], None)])
    assert replay(same_stream, net).total_s == pytest.approx(10.0)
    # vectorised over networks: the overlapping network is re-timed with sharing, a fast one is not
    fast = Network.uniform(2, 8000, 0.0)   # 4 ms each: no overlap
    many = replay(staggered, [net, fast])
    assert many.total_s[0] == pytest.approx(9.0) and many.total_s[1] == pytest.approx(3.004)
    assert np.array_equal(many.end_s[:, :, 1], replay(staggered, fast).end_s)


def test_straggler_per_step_sync_versus_every_h_steps():
    # 4 nodes, node 3 at half speed; 1 s of compute per step each; a blocking all-gather of 2 s
    slow = ComputeScaling(speed=(1, 1, 1, 0.5))
    net = Network.uniform(4, 8, 0.0)
    c = Collective("allgather", "ring", (1, 1, 1, 1))  # 3 phases x 1 byte... (max 1 byte) = 3 s
    cost = collective_s(net, c.op, c.algo, c.sizes)
    assert cost == 3.0
    per_step = trace_of(4, [([1.0] * 4, c), ([0.0] * 4, None)] * 4)
    every_4 = trace_of(4, [([1.0] * 4, None)] * 3 + [([1.0] * 4, c), ([0.0] * 4, None)])
    a, b = replay(per_step, net, scaling=slow), replay(every_4, net, scaling=slow)
    assert a.total_s == 4 * (2.0 + cost)          # everyone waits for the straggler every step
    assert b.total_s == 8.0 + cost                 # the straggler's 4 steps, then one sync
    assert list(a.waited_s) == [4 * (1.0 + cost)] * 3 + [4 * cost]
    assert list(b.waited_s) == [4.0 + cost] * 3 + [cost]
    assert replay(per_step, net).total_s == 4 * (1.0 + cost)


def test_jitter_is_seeded_lognormal_per_node_and_step():
    steps = 4000
    t = trace_of(2, [([1.0, 1.0], None)] * steps)
    sc = ComputeScaling(jitter=0.1, seed=7)
    tl = replay(t, Network.uniform(2, "1Gbps"), scaling=sc)
    factors = tl.compute_s  # compute of 1 s scaled by the factor of each (step, node)
    logs = np.log(factors)
    assert abs(logs.mean()) < 0.01 and abs(logs.std() - 0.1) < 0.005
    assert abs(np.corrcoef(logs[:, 0], logs[:, 1])[0, 1]) < 0.05   # independent across nodes
    again = replay(t, Network.uniform(2, "1Gbps"), scaling=ComputeScaling(jitter=0.1, seed=7))
    assert np.array_equal(again.end_s, tl.end_s)
    other = replay(t, Network.uniform(2, "1Gbps"), scaling=ComputeScaling(jitter=0.1, seed=8))
    assert not np.array_equal(other.end_s, tl.end_s)
    with pytest.raises(ValueError, match="speeds"):
        replay(t, Network.uniform(2, "1Gbps"), scaling=ComputeScaling(speed=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"speeds must lie in \[0.001, 1000\]"):
        ComputeScaling(speed=(1, 0))


@pytest.mark.parametrize("kwargs", [{"speed": (1, float("nan"))}, {"speed": (1e-9, 1)}, {"speed": (1, 1e9)},
                                    {"jitter": 1000.0}, {"jitter": float("nan")}, {"jitter": -0.1},
                                    {"jitter": float("inf")}])
def test_scaling_refuses_what_would_overflow_a_run(kwargs):
    # --jitter 1000 once ended in "a collective was waited for that can never end"
    with pytest.raises(ValueError, match="must lie in") as e:
        ComputeScaling(**kwargs)
    assert "\n" not in str(e.value)


def test_clock_class_equals_vectorised_replay_bit_for_bit():
    rng = np.random.default_rng(3)
    segs = []
    for k in range(30):
        segs += [(rng.uniform(0, 2, 3), Start(2 * k, Collective("allreduce", "ring", (5, 6, 7)), k % 2)),
                 (rng.uniform(0, 2, 3), Collective("allgather", "ring", (1, 9, 4))),
                 (rng.uniform(0, 2, 3), Wait(2 * k)), (rng.uniform(0, 1, 3), None)]
    t = trace_of(3, segs)
    sc = ComputeScaling(speed=(1, 0.7, 1.3), jitter=0.2, seed=1)
    for net in (Network.uniform(3, 8, 0.3), Network.uniform(3, 8e6, 0.0)):
        clock = Clock(net, 3, sc)
        ends = np.array([clock.advance(np.array(c), e) for c, e in zip(t.compute_s, t.events, strict=True)])
        assert np.array_equal(ends, replay(t, net, scaling=sc).end_s)


def test_trace_checks_waits_and_round_trips_new_events(tmp_path):
    t = trace_of(2, [([1, 1], Start(5, gather(3), 2)), ([1, 1], Wait(5)), ([0, 0], None)])
    t.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json") == t
    with pytest.raises(ValueError, match="not started"):
        trace_of(2, [([1, 1], Wait(1)), ([0, 0], None)])
    with pytest.raises(ValueError, match="started twice"):
        trace_of(2, [([1, 1], Start(1, gather(3))), ([1, 1], Start(1, gather(3))), ([0, 0], None)])


def test_version_1_trace_still_loads():
    d = {"version": 1, "nodes": 2, "compute_s": [[1.0, 2.0], [0.5, 0.5]], "flops": [[0, 0], [0, 0]],
         "collectives": [["allgather", "ring", [3, 3]], None], "step_ends": [1]}
    t = Trace.from_json(d)
    assert t.events == [gather(3), None]
    assert replay(t, two_nodes()).total_s == 2.0 + 3.0 + 0.5


def test_framing_bytes_are_reported_apart_from_packet_bytes():
    t = trace_of(2, [([1, 1], Start(0, gather(3), 1)), ([1, 1], Collective("allreduce", "ring", (5, 6))),
                     ([0, 0], Wait(0)), ([0, 0], None)])
    # one all-gather message and two ring all-reduce messages per node, 5 framing bytes each
    assert t.framing_bytes_per_node(Framing(per_message=5)) == [15, 15]
    assert t.bytes_per_node() == ([3 + 5 + 6, 3 + 6 + 5], [3 + 6 + 5, 3 + 5 + 6])
    assert t.framing_bytes_per_node(Network.uniform(2, 8)) == [0, 0]


PAIRS = ((0, 2), (1, 3))


def test_grouped_collective_is_one_collective_from_the_last_arrival_of_any_group():
    net = Network.uniform(4, 8 * 100, 0.5)   # 100 bytes per second, 0.5 s latency
    pairs = Collective("allreduce", "ring", (100, 100, 100, 100), PAIRS)
    cost = 2 * (0.5 + 1.0)                   # a ring of 2: 2 phases of one 100-byte chunk
    t = trace_of(4, [([1.0, 2.0, 3.0, 4.0], pairs), ([0.0] * 4, None)])
    tl = replay(t, net)
    # island (0, 2) waits for node 3 of the other island: the grouped collective is timed as one
    assert list(tl.end_s[0]) == [4.0 + cost] * 4
    clock = Clock(net, 4)
    assert list(clock.advance(np.array([1.0, 2.0, 3.0, 4.0]), pairs)) == list(tl.end_s[0])
    # started on stream 1 while a blocking ungrouped one runs (no latency: 2 s and 6 s of transfer):
    # they share the links, 1/2 each while both move, so the pairs end at 4 s and the whole ring at 8 s
    net0 = Network.uniform(4, 8 * 100, 0.0)
    whole = Collective("allreduce", "ring", (100,) * 4)
    both = trace_of(4, [([0.0] * 4, Start(0, pairs, 1)), ([0.0] * 4, whole), ([0.0] * 4, Wait(0)),
                        ([0.0] * 4, None)])
    clock = Clock(net0, 4)
    ends = np.array([clock.advance(np.array(c), e) for c, e in zip(both.compute_s, both.events, strict=True)])
    assert np.array_equal(ends, replay(both, net0).end_s)
    assert list(ends[:, 0]) == pytest.approx([0.0, 8.0, 8.0, 8.0], abs=1e-12)


def test_grouped_collective_json_round_trip_and_version_2_still_loads(tmp_path):
    pairs = Collective("allreduce", "ring", (7, 8, 9, 10), [[0, 2], [1, 3]])
    assert pairs.groups == PAIRS and Collective("allreduce", "ring", (1, 1), [[0, 1]]).groups is None
    t = trace_of(4, [([1] * 4, pairs), ([1] * 4, Start(3, pairs, 1)), ([0] * 4, Wait(3)), ([0] * 4, None)])
    d = t.to_json()
    assert d["version"] == 4 and d["events"][0] == ["allreduce", "ring", [7, 8, 9, 10], [[0, 2], [1, 3]]]
    t.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json") == t
    # each pair's ring: a node sends its own chunk, then its partner's; the trace has the collective twice
    assert Trace.load(tmp_path / "t.json").bytes_per_node()[0] == [2 * (7 + 9), 2 * (8 + 10), 2 * (9 + 7),
                                                                   2 * (10 + 8)]
    v2 = {"version": 2, "nodes": 2, "compute_s": [[1.0, 1.0], [0.0, 0.0]], "flops": [[0, 0], [0, 0]],
          "events": [["start", 0, 1, "allgather", "ring", [3, 3]], ["wait", 0]], "step_ends": []}
    assert Trace.from_json(v2).events == [Start(0, gather(3), 1), Wait(0)]
    bad = dict(d, events=[["allreduce", "ring", [7, 8, 9, 10], [[0, 2], [2, 3]]]] + d["events"][1:])
    with pytest.raises(ValueError, match="groups"):
        Trace.from_json(bad)
