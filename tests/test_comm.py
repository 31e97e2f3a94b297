"""Node processes exchanging real packets: exact bytes, live clock == replay."""

import node_programs
import pytest
import torch

from pysim.clock import replay, trace_from_nodes
from pysim.compress import get_codec, packet_header
from pysim.launch import run_nodes
from pysim.network import Network, bytes_received, bytes_sent


@pytest.fixture(scope="module", params=["ring", "star"])
def three_nodes(request):
    net = Network.uniform(3, "100Mbit", "10ms")
    return net, request.param, run_nodes(node_programs.exchange_all_codecs, 3, (net, request.param))


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
    # all-gather charges: exactly the packets from the other nodes
    for c in trace.collectives:
        if c is not None and c.op == "allgather":
            assert sum(bytes_received(c.op, c.algo, c.sizes)) == sum(bytes_sent(c.op, c.algo, c.sizes))
    total_allgather_received = [sum(bytes_received(c.op, c.algo, c.sizes)[i] for c in trace.collectives
                                    if c is not None and c.op == "allgather") for i in range(3)]
    assert total_allgather_received == [r["received_packets"] for r in res]
    # all-reduce chunk sizes are dense packets of the chunks
    ring = [c for c in trace.collectives if c is not None and c.op == "allreduce"][0]
    if ring.algo == "ring":
        assert ring.sizes == tuple(get_codec("dense").nbytes((n,)) for n in (333, 333, 334))


def test_live_clock_equals_replay_exactly(three_nodes):
    net, _, res = three_nodes
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    tl = replay(trace, net)
    assert [r["clock_s"] for r in res] == list(tl.end_s[-1])
    slower = Network.uniform(3, "1Mbit", "100ms")
    assert replay(trace, slower).total_s > tl.total_s


def test_bad_algorithm_is_refused():
    from pysim.comm import Comm

    with pytest.raises(ValueError, match="algorithm"):
        Comm(0, 1, Network.uniform(1, "1Gbps"), algorithm="butterfly")
