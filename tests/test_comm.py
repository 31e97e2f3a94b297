"""Node processes exchanging real packets: exact bytes, live clock == replay."""

import node_programs
import pytest
import torch

from pysim import links
from pysim.clock import ComputeScaling, _replay_without_sharing, replay, scaled_compute
from pysim.compress import DenseCodec, get_codec, packet_header
from pysim.launch import run_nodes
from pysim.network import Network, bytes_received
from pysim.trace import trace_from_nodes


@pytest.fixture(scope="module", params=[("ring", 3), ("star", 3), ("ring", 1), ("star", 2)],
                ids=["ring, a process per node", "star, a process per node", "ring, in one process",
                     "star, two processes"])
def three_nodes(request):
    net = Network.uniform(3, "100Mbit", "10ms")
    algorithm, processes = request.param
    return net, algorithm, run_nodes(node_programs.exchange_all_codecs, 3, (net, algorithm), processes=processes)


def test_allreduce_is_the_mean_and_identical_on_every_node(three_nodes):
    _, _, res = three_nodes
    expected = sum(r["x"] for r in res) / 3
    for r in res:
        torch.testing.assert_close(r["mean"], expected, atol=1e-6, rtol=0)
        assert torch.equal(r["mean"], res[0]["mean"])
        assert torch.equal(r["mean16"], res[0]["mean16"])
    torch.testing.assert_close(res[0]["mean16"], expected, atol=2e-3, rtol=0)


def test_allgather_delivers_every_packet_intact(three_nodes):
    _, _, res = three_nodes
    for spec in ("topk:0.05", "randomk:0.1", "lowrank:2"):
        for i in range(3):
            for r in res:
                assert torch.equal(r[spec][i], res[i][spec][i])  # what i sent is what everyone got
            packet_header(res[0][spec][i])  # and it is a valid packet


def test_bytes_charged_equal_bytes_that_crossed(three_nodes):
    net, _, res = three_nodes
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    sent, recv = trace.bytes_per_node()
    assert sent == [r["sent"] for r in res]
    assert recv == [r["received"] for r in res]
    # all-gather charges: exactly the packets from the other nodes, as the node program counted them
    total_allgather_received = [sum(bytes_received(c.op, c.algo, c.sizes)[i] for c in trace.collectives()
                                    if c.op == "allgather") for i in range(3)]
    assert total_allgather_received == [r["received_packets"] for r in res]
    # all-reduce chunk sizes are dense packets of the chunks
    ring = [c for c in trace.collectives() if c.op == "allreduce"][0]
    if ring.algo == "ring":
        assert ring.sizes == tuple(get_codec("dense").nbytes((n,)) for n in (333, 333, 334))


def test_live_clock_equals_replay_exactly(three_nodes):
    net, _, res = three_nodes
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    tl = replay(trace, net)
    assert [r["clock_s"] for r in res] == list(tl.end_s[-1])
    slower = Network.uniform(3, "1Mbit", "100ms")
    assert replay(trace, slower).total_s > tl.total_s


@pytest.mark.parametrize("algorithm", ["ring", "star"])
def test_async_collectives_live_clock_equals_replay_with_sharing_and_stragglers(algorithm):
    net = Network.uniform(3, "2Mbit", "2ms")   # slow: the collectives of streams 0 and 1 overlap and share
    scaling = ComputeScaling(speed=(1.0, 0.5, 1.0), jitter=0.1, seed=3)
    res = run_nodes(node_programs.async_patterns, 3, (net, algorithm, scaling))
    expected = [sum(r["x"][k] for r in res) / 3 for k in range(4)]
    for r in res:
        for got, want in zip(r["means"], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert torch.equal(r["again"], r["means"][0])
    topk = get_codec("topk:0.1")
    expected_topk = sum(topk.unpack(topk.pack(r["x"][1], key="m", step=4)) for r in res) / 3
    for r in res:
        torch.testing.assert_close(r["topk_mean"], expected_topk, atol=1e-6, rtol=0)
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    kinds = [type(e).__name__ for e in trace.events]
    assert kinds.count("Start") == 5 and kinds.count("Wait") == 5 and trace.streams() == {0, 1, 2}
    tl = replay(trace, net, scaling=scaling)
    assert [r["clock_s"] for r in res] == list(tl.end_s[-1])
    assert [r["comm_s"] for r in res] == pytest.approx(list(tl.waited_s), rel=1e-12)  # summed in another order
    # the run really overlapped streams: sharing the links made it later than the overlap-free timing
    free_ends = _replay_without_sharing(trace, [net], scaled_compute(trace, scaling))[0]
    assert tl.total_s > free_ends[-1, :, 0].max()
    many = replay(trace, [net, Network.uniform(3, "10Gbit", "2ms")], scaling=scaling)
    assert list(many.end_s[-1, :, 0]) == list(tl.end_s[-1])


def test_a_bundle_may_carry_each_tensor_with_its_own_codec():
    res = run_nodes(node_programs.mixed_bundle, 2, ())
    for r in res:
        torch.testing.assert_close(r["mean"]["dense"], (res[0]["tensors"]["dense"] + res[1]["tensors"]["dense"]) / 2,
                                   atol=0, rtol=0)
        torch.testing.assert_close(r["mean"]["sparse"], (res[0]["reconstructed"] + res[1]["reconstructed"]) / 2,
                                   atol=0, rtol=0)
        assert all(torch.equal(r["async_mean"][k], r["mean"][k]) for k in r["mean"])   # started, then waited
        # one bundle of both packets, sent once to the other node, twice (blocking, then started and waited)
        assert r["sent"] == 2 * (get_codec("topk:0.1").nbytes((300,)) + DenseCodec().nbytes((7,)))
        # a codec missing, one too many, or missing from a started bundle: refused before anything is sent
        assert len(r["errors"]) == 3 and all("one codec per tensor" in e for e in r["errors"])
        assert "['extra', 'sparse', 'dense']" not in r["errors"][1] and "'extra'" in r["errors"][1]


def test_async_stream_must_be_a_non_negative_int():
    from pysim.comm import Comm

    comm = Comm(0, 1, Network.uniform(1, "1Gbps"))
    with pytest.raises(ValueError, match="stream"):
        comm.allreduce_mean_async(torch.ones(3), stream=-1)
    p = comm.allreduce_mean_async(torch.ones(3), stream=2)
    assert not p.waited and torch.equal(p.wait(), torch.ones(3)) and p.waited


def test_bad_algorithm_is_refused():
    from pysim.comm import Comm

    with pytest.raises(ValueError, match="algorithm"):
        Comm(0, 1, Network.uniform(1, "1Gbps"), algorithm="butterfly")


@pytest.mark.parametrize("algorithm, groups", [("ring", ((0, 2), (1, 3))), ("star", ((0, 2), (1, 3))),
                                               ("ring", ((3,), (2, 0, 1)))])
def test_grouped_allreduce_means_bytes_and_live_clock_equal_replay(algorithm, groups):
    net = Network.uniform(4, "2Mbit", "2ms")   # slow: the grouped collective on stream 1 overlaps stream 0
    scaling = ComputeScaling(speed=(1.0, 0.5, 1.0, 1.0), jitter=0.1, seed=4)
    res = run_nodes(node_programs.grouped_allreduces, 4, (net, algorithm, groups, scaling))
    for g in groups:
        for key, k in (("mean", 0), ("async", 2)):
            want = sum(res[i]["x"][k] for i in g) / len(g)
            for i in g:
                torch.testing.assert_close(res[i][key], want, atol=1e-6, rtol=0)
                assert torch.equal(res[i][key], res[g[0]][key])   # identical within an island
        want16 = sum(res[i]["x"][1] for i in g) / len(g)
        for i in g:
            torch.testing.assert_close(res[i]["mean16"], want16, atol=3e-3, rtol=0)
    everyone = sum(r["x"][0] for r in res) / 4
    for r in res:
        torch.testing.assert_close(r["all"], everyone, atol=1e-6, rtol=0)
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    assert [c.groups for c in trace.collectives()] == [groups, groups, groups, None]  # the async one starts first
    sent, recv = trace.bytes_per_node()
    assert sent == [r["sent"] for r in res] and recv == [r["received"] for r in res]
    if groups == ((0, 2), (1, 3)):   # by hand: a pair moves 2 messages per node of half the vector (ring) or
        fp32, fp16, ring4 = 24 + 4 + 4 * 500, 24 + 4 + 2 * 500, 6 * (24 + 4 + 4 * 250)   # all of it (star)
        if algorithm == "ring":
            assert sent == [2 * fp32 + 2 * fp16 + ring4 + 2 * fp32] * 4
        else:   # star: each worker sends its vector, each root the mean; then node 0 of 4 sends 3 means
            fp32_all, fp16_all = 24 + 4 + 4000, 24 + 4 + 2000
            assert sent == [2 * fp32_all + fp16_all + 3 * fp32_all, 2 * fp32_all + fp16_all + fp32_all,
                            2 * fp32_all + fp16_all + fp32_all, 2 * fp32_all + fp16_all + fp32_all]
    tl = replay(trace, net, scaling=scaling)
    assert [r["clock_s"] for r in res] == list(tl.end_s[-1])
    free_ends = _replay_without_sharing(trace, [net], scaled_compute(trace, scaling))[0]
    assert tl.total_s > free_ends[-1, :, 0].max()   # the grouped collective on stream 1 really shared the links


def test_grouped_allreduce_refuses_groups_that_miss_a_node():
    from pysim.comm import Comm

    comm = Comm(0, 1, Network.uniform(1, "1Gbps"))
    with pytest.raises(ValueError, match="groups"):
        comm.allreduce_mean(torch.ones(3), groups=[[0], [1]])
    assert torch.equal(comm.allreduce_mean(torch.ones(3), groups=[[0]]), torch.ones(3))


def ring_reference(xs: list[torch.Tensor], dtype: str) -> torch.Tensor:
    """A ring all-reduce's arithmetic, from the schedule: chunk c starts at member c, each member
    adds its own values to the decoded packet and re-encodes, the owner's packet is everyone's
    mean. ``xs``: the members' vectors in ring order; a group of one keeps its own (nothing is sent)."""
    if len(xs) == 1:
        return xs[0].clone()
    codec = DenseCodec(dtype)

    def wire(v: torch.Tensor) -> torch.Tensor:
        return codec.unpack(codec.pack(v))

    k, n = len(xs), xs[0].numel()
    bounds = [n * c // k for c in range(k + 1)]
    out = torch.empty(n)
    for c in range(k):
        a, b = bounds[c], bounds[c + 1]
        acc = wire(xs[c][a:b])
        for step in range(1, k):
            acc = wire(acc + xs[(c + step) % k][a:b])
        out[a:b] = acc / k
    return out


_RINGS = [(2, 1001, 512, None), (3, 5000, 1000, None), (3, 10, 1 << 19, None), (4, 3001, 700, [[0, 2], [1, 3]]),
          (5, 3001, 700, None), (6, 3001, 700, [[0, 4], [1, 2, 3, 5]]),   # groups of unequal size, across blocks
          (3, 100, 700, [[0], [1], [2]])]                                  # no ring at all: each keeps its own


@pytest.mark.parametrize("world,n,piece_bytes,groups,processes",
                         [(*ring, world) for ring in _RINGS for world in [ring[0]]]          # one per node
                         + [(*ring, 1) for ring in _RINGS]                                    # all in one
                         + [(*ring, p) for ring in _RINGS for p in (2, 3) if p < ring[0]])    # blocks of unequal size
def test_dense_ring_is_the_schedules_arithmetic_bit_for_bit(world, n, piece_bytes, groups, processes):
    """Between processes the packets travel in pieces (to a process of one node) or a round's
    packets as one message (between processes of several); within one, whole and in memory: the
    same float32 arithmetic as a hand-written ring, and exactly the packets' bytes leave and
    reach each node."""
    res = run_nodes(node_programs.ring_dense, world, (n, piece_bytes, groups), processes=processes)
    _check_ring_dense(res, world, n, groups)
    if processes > 1 and links.available():
        assert {r["between processes"] for r in res} == {"shared memory"}


@pytest.mark.parametrize("world,processes,groups", [(3, 2, None), (4, 2, [[0, 2], [1, 3]])])
def test_dense_ring_over_gloo_between_processes_is_the_same(world, processes, groups, monkeypatch):
    """Where the workers cannot share memory (or under torchrun) the same messages take gloo:
    a round's packets joined into one tensor, single-node peers' in pieces."""
    monkeypatch.setenv("PYSIM_TRANSPORT", "gloo")
    res = run_nodes(node_programs.ring_dense, world, (3001, 700, groups), processes=processes)
    _check_ring_dense(res, world, 3001, groups)
    assert {r["between processes"] for r in res} == {"gloo"}


def _check_ring_dense(res: list[dict], world: int, n: int, groups) -> None:
    members = [list(range(world))] if groups is None else groups
    for group in members:
        for dtype in ("fp32", "fp16", "bf16"):
            want = ring_reference([res[m]["x"] for m in group], dtype)
            k = len(group)
            chunk = [DenseCodec(dtype).nbytes((n * (c + 1) // k - n * c // k,)) for c in range(k)]
            for m in group:
                assert torch.equal(res[m][dtype], want), (dtype, m)
                j = group.index(m)   # sends every chunk but j+1 in the reduce-scatter, every one but j+2 after
                assert res[m][f"{dtype}_sent"] == 2 * sum(chunk) - chunk[(j + 1) % k] - chunk[(j + 2) % k]
                assert res[m][f"{dtype}_received"] == 2 * sum(chunk) - chunk[j] - chunk[(j + 1) % k]  # j-1's
        for m in group:
            torch.testing.assert_close(res[m]["fp32"], sum(res[i]["x"] for i in group) / len(group), atol=1e-5,
                                       rtol=0)
            assert torch.equal(res[m]["x_after"], res[m]["x"])   # the input is only read


@pytest.mark.parametrize("what,message", [("piece", "checksum mismatch"), ("gathered", "checksum mismatch"),
                                          ("header", "another tensor than this ring hop expects")])
def test_a_corrupted_piece_or_header_is_refused(what, message):
    from pysim.launch import NodeError

    with pytest.raises(NodeError, match=message):
        run_nodes(node_programs.corrupt_a_piece, 2, (what,))


@pytest.mark.parametrize("processes", [2, 1])
def test_codec_work_is_charged_where_it_happens(processes):
    """Packing is charged before the collective starts, in the segment the collective ends; the
    reductions inside the collective are part of its network time, not the node's compute; decoding
    the gathered packets is charged after the Wait (issue: work leaked into the next segment)."""
    res = run_nodes(node_programs.codec_work_segments, 2, (), processes=processes)
    for r in res:
        (pack, kind0), (after, kind1), (pack_gather, kind2), (waited, kind3), (decode, kind4) = r["segments"]
        assert (kind0, kind1, kind2, kind3, kind4) == ("Collective", "NoneType", "Start", "Wait", "NoneType")
        assert pack > 0 and after == 0.0         # nothing of the all-reduce leaks past its end
        assert pack_gather > 0 and waited == 0.0 and decode > 0


@pytest.mark.parametrize("spec", ["dense", "dense:fp16", "int8"])
@pytest.mark.parametrize("algorithm", ["ring", "star"])
@pytest.mark.parametrize("processes", [1, 3])
def test_an_all_reduce_of_one_tensor_only_reads_it(spec, algorithm, processes):
    res = run_nodes(node_programs.single_tensor_mean, 3, (algorithm, spec), processes=processes)
    assert all(r["unchanged"] for r in res)
    if spec == "dense":
        expected = sum(r["x"] for r in res) / 3
        for r in res:
            assert torch.allclose(r["mean"], expected, atol=1e-6)


@pytest.mark.parametrize("column, value, message", [(0, 4, "ring hop 1: unknown mode 4"),
                                                    (3, 2, "ring hop 1: member row out of range"),
                                                    (5, 99, "ring hop 1: chunk out of range"),
                                                    (6, 0, "ring hop 1: ring size must be >= 1"),
                                                    (1, 10_000, "ring hop 1: incoming packet outside the arena"),
                                                    (2, 10_000, "ring hop 1: outgoing packet outside the arena")])
def test_ring_hops_outside_their_buffers_are_refused_before_any_runs(column, value, message):
    import numpy as np

    from pysim import _C

    n = 8
    nb = _C.dense_packet_bytes(n, 0)
    arena = np.zeros(4 * nb, dtype=np.uint8)
    xs, rs = [np.ones(n, np.float32), np.ones(n, np.float32)], [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    batch = _C.RingBatch(arena, xs, rs, n, 0)
    hops = np.array([[1, 0, nb, 0, 0, n, 2], [1, nb, 2 * nb, 1, 0, n, 2]], dtype=np.int64)
    hops[1, column] = value
    with pytest.raises(ValueError, match=message):
        batch.run(hops)
    assert not arena.any()     # checked before the first hop ran: nothing written


@pytest.mark.parametrize("groups", [None, [[0, 2], [1, 3, 4]], [[4, 1, 0], [2, 3]], [[0, 1, 2, 3, 4]]])
@pytest.mark.parametrize("seed", range(4))
def test_a_hops_round_counts_the_process_crossings_of_its_packets_chain(groups, seed):
    """At phase h the member at place i continues the packet that started as the own chunk of the
    member h + 1 places before it: its round is the count of hops along that chain that cross
    from one process to another (counted member by member here)."""
    import random

    from pysim.comm import _crossings, _positions
    from pysim.schedule import check_groups

    rng = random.Random(seed)
    process = [rng.randrange(3) for _ in range(5)]
    positions = _positions(check_groups(groups, 5), list(range(5)), 5)
    rounds = _crossings(positions, process.__getitem__)
    for m, position in positions.items():
        ring = sorted(position, key=position.get)
        k, i = len(ring), position[m]
        want = [sum(process[ring[(i - t) % k]] != process[ring[(i - t - 1) % k]] for t in range(h + 1))
                for h in range(2 * (k - 1))]
        assert list(rounds[m]) == want, (m, ring, process)


@pytest.mark.parametrize("nodes,processes", [(16, 2), (64, 2), (12, 3), (64, 4), (5, 3)])
def test_a_ring_plan_sends_each_process_one_message_per_round(nodes, processes):
    """Between processes that host several nodes a round's packets leave as one message, and a
    ring through P processes in blocks takes at most 2P + 1 rounds; a process of one node gets
    its packets as _ring sends them, one by one."""
    from types import SimpleNamespace

    from pysim.comm import RingPlan
    from pysim.placement import Placement

    placement = Placement(nodes, processes)
    for p in range(processes):
        hosted = list(placement.hosted(p))
        if len(hosted) == 1:
            continue
        here = SimpleNamespace(nodes=nodes, placement=placement, local=lambda m, p=p: placement.process_of(m) == p)
        plan = RingPlan(here, hosted, 10_000, 0, None)   # made, not run: no transport needed
        assert len(plan.sends) <= 2 * processes + 1
        onward = placement.process_of((hosted[-1] + 1) % nodes)
        sends = [s for r in plan.sends for s in r]
        if len(placement.hosted(onward)) > 1:
            assert [s[:2] for s in sends] == [("bundle", onward)] * len(sends)   # one per round at most
            assert sum(len(s[2]) for s in sends) == 2 * (nodes - 1)  # the last node's packet of every phase
            assert [node for s in sends for node, _, _ in s[2]] == [hosted[-1]] * 2 * (nodes - 1)
        else:
            assert [s[:3] for s in sends] == [("pieces", hosted[-1], onward)] * 2 * (nodes - 1)
        posts = {post[0] for post in plan.posts}
        assert posts == {"bundle" if len(placement.hosted(placement.process_of(hosted[0] - 1))) > 1 else "pieces"}
