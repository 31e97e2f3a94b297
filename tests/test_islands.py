"""FedAvg with islands: the grouped all-reduce's schedule, bytes and cost against hand-computed
numbers, and FedAvg's island update rule against a plain-torch reference in real node processes."""

import node_programs
import numpy as np
import pytest
import torch

from pysim.clock import replay
from pysim.compress import get_codec
from pysim.launch import run_nodes
from pysim.network import Link, Network, collective_s
from pysim.schedule import Message, bytes_received, bytes_sent, check_groups, phases
from pysim.strategies.fedavg import islands
from pysim.trace import trace_from_nodes

PAIRS = ((0, 2), (1, 3))
DENSE_500 = 24 + 4 + 4 * 500  # header, one dimension, 500 fp32 values: one chunk of a 1000-value vector in a pair


# ---------------------------------------------------------------- schedule and bytes


def test_grouped_ring_schedule_two_islands_of_two():
    # each island is a ring of its own: 0 <-> 2 and 1 <-> 3, both in phase t at once
    got = phases("allreduce", "ring", (10, 11, 12, 13), PAIRS)
    assert [set(p) for p in got] == [
        {Message(0, 2, 10, 0), Message(2, 0, 12, 2), Message(1, 3, 11, 1), Message(3, 1, 13, 3)},  # reduce-scatter
        {Message(0, 2, 12, 2), Message(2, 0, 10, 0), Message(1, 3, 13, 3), Message(3, 1, 11, 1)},  # all-gather
    ]


def test_grouped_bytes_of_a_dense_vector_in_pairs():
    assert get_codec("dense").nbytes((500,)) == DENSE_500
    sizes = (DENSE_500,) * 4
    # per phase every node sends one chunk of half the vector; 2 phases
    assert bytes_sent("allreduce", "ring", sizes, PAIRS) == [2 * DENSE_500] * 4 == [4056] * 4
    assert bytes_received("allreduce", "ring", sizes, PAIRS) == [4056] * 4
    # one ring of 4 sends 6 chunks of a quarter: 6 * (28 + 1000)
    assert bytes_sent("allreduce", "ring", (1028,) * 4) == [6168] * 4


def test_uneven_groups_bytes_and_ring_order():
    # a pair (0, 2) and a ring of three 1 -> 3 -> 4 -> 1; sizes[m] is member m's chunk
    sizes = (10, 11, 12, 13, 14)
    groups = ((0, 2), (1, 3, 4))
    assert len(phases("allreduce", "ring", sizes, groups)) == 4   # the triple's 2 + 2 phases
    # node 1 sends chunks of 1, 4 (reduce-scatter), 3, 1 (all-gather); node 3: 3, 1, 4, 3; node 4: 4, 3, 1, 4
    assert bytes_sent("allreduce", "ring", sizes, groups) == [22, 11 + 14 + 13 + 11, 22, 13 + 11 + 14 + 13,
                                                              14 + 13 + 11 + 14]
    assert bytes_received("allreduce", "ring", sizes, groups) == [22, 52, 22, 49, 51]
    # a group's ring follows the order listed: (4, 1, 3) is 4 -> 1 -> 3 -> 4
    first = phases("allreduce", "ring", sizes, ((0, 2), (4, 1, 3)))[0]
    assert {(m.src, m.dst) for m in first} == {(0, 2), (2, 0), (4, 1), (1, 3), (3, 4)}


def test_star_groups_have_their_first_member_as_root():
    gather, scatter = phases("allreduce", "star", (5, 6, 7, 8), ((2, 0), (3, 1)))
    assert set(gather) == {Message(0, 2, 5, 0), Message(1, 3, 6, 1)}
    assert set(scatter) == {Message(2, 0, 7, 2), Message(3, 1, 8, 3)}


def test_groups_must_partition_the_members():
    assert check_groups([[0, 1, 2]], 3) is None          # one group of all, in rank order
    assert check_groups([[2, 0], [1]], 3) == ((2, 0), (1,))
    for bad in ([[0, 1], [1, 2]], [[0, 1]], [[0, 1, 2], []], [[0, 1, 3]]):
        with pytest.raises(ValueError, match="groups"):
            check_groups(bad, 3)


# ---------------------------------------------------------------- cost


def test_grouped_cost_on_uniform_links_is_one_pair_ring():
    net = Network.uniform(4, "100Mbit", "10ms")
    want = 2 * (0.01 + 8 * DENSE_500 / 100e6)   # 2(g-1) phases of alpha + 8c/beta, g = 2
    assert collective_s(net, "allreduce", "ring", (DENSE_500,) * 4, PAIRS) == pytest.approx(want, rel=1e-12)


def test_grouped_cost_waits_for_the_slowest_island():
    fast, slow = Link.of("100Mbit", "10ms"), Link.of("10Mbit", "50ms")
    net = Network.per_node([fast, fast, fast, slow])
    # island (1, 3) crosses node 3's slow link in both phases; island (0, 2) is done earlier
    want = 2 * (0.05 + 8 * DENSE_500 / 10e6)
    assert collective_s(net, "allreduce", "ring", (DENSE_500,) * 4, PAIRS) == pytest.approx(want, rel=1e-12)


def test_islands_across_a_two_tier_network_share_the_inter_group_link():
    net = Network.two_tier(4, 2, "1Gbit", "1ms", "10Mbit", "30ms")   # tiers {0, 1} and {2, 3}
    sizes = (DENSE_500,) * 4
    # (0, 2) and (1, 3) both cross: per phase two messages share each tier's 10 Mbit/s link
    across = 2 * (0.03 + 2 * 8 * DENSE_500 / 10e6)
    assert collective_s(net, "allreduce", "ring", sizes, PAIRS) == pytest.approx(across, rel=1e-12)
    within = 2 * (0.001 + 8 * DENSE_500 / 1e9)
    assert collective_s(net, "allreduce", "ring", sizes, ((0, 1), (2, 3))) == pytest.approx(within, rel=1e-12)


# ---------------------------------------------------------------- the island draw


def test_islands_rule_uneven_and_seeded():
    for r in range(5):
        five = islands(5, 2, 7, r)
        assert sorted(len(g) for g in five) == [2, 3]    # 5 // 2 islands, the leftover node joins the last
        assert len(five[-1]) == 3
        assert sorted(m for g in five for m in g) == list(range(5))
        assert islands(5, 2, 7, r) == five               # a pure function of (seed, round)
    assert islands(3, 5, 0, 0) == ((0, 1, 2),)
    assert islands(6, 4, 0, 0)[-1].__len__() == 6        # 6 // 4 = 1 island: everyone
    draws = {frozenset(map(frozenset, islands(4, 2, 0, r))) for r in range(4)}
    assert len(draws) > 1                                # islands change between rounds


# ---------------------------------------------------------------- FedAvg with islands, in node processes


def reference_fedavg_islands(world: int, H: int, rounds: int, seed: int, lr: float = 0.1
                             ) -> tuple[list[torch.Tensor], list[list[set[int]]]]:
    """Plain torch: each node runs H SGD steps on its batches, then takes the mean of its
    island's models; islands of 2 cut from numpy.random.default_rng([seed, round]).permutation.
    Returns every node's final parameter vector and the islands of each round."""
    models = [node_programs.tiny_model() for _ in range(world)]
    draws = []
    for rnd in range(rounds):
        for rank, m in enumerate(models):
            for step in range(rnd * H, (rnd + 1) * H):
                x, y = node_programs.tiny_batch(rank, step)
                m.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                with torch.no_grad():
                    for p in m.parameters():
                        p -= lr * p.grad
        perm = np.random.default_rng([seed, rnd]).permutation(world).tolist()
        pairs = [set(perm[i:i + 2]) for i in range(0, world, 2)]
        draws.append(pairs)
        vecs = [torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone() for m in models]
        for pair in pairs:
            mean = sum(vecs[i] for i in pair) / 2
            for i in pair:   # a copy each: vector_to_parameters makes the parameters views of its vector
                torch.nn.utils.vector_to_parameters(mean.clone(), models[i].parameters())
    return [torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models], draws


N_TINY = 6 * 5 + 5 + 5 * 3 + 3
NET4 = Network.uniform(4, "100Mbit", "5ms")


@pytest.fixture(scope="module")
def fedavg_islands_run():
    return run_nodes(node_programs.train_strategy, 4, (NET4, "FedAvg(H=2, island_size=2, seed=0)", 6))


def test_fedavg_islands_follow_the_hand_written_rule(fedavg_islands_run):
    res = fedavg_islands_run
    want, draws = reference_fedavg_islands(4, H=2, rounds=3, seed=0)
    assert draws[0] != draws[1]   # the rounds really re-draw (else this would be plain pair averaging)
    for r, w in zip(res, want, strict=True):
        torch.testing.assert_close(r["local"], w, atol=1e-6, rtol=0)
    assert not torch.allclose(res[0]["local"], res[1]["local"])   # different islands, different models
    # deployed: what each node holds, its island's last average (a run scores node 0's); not a mean over
    # every node, which no exchange paid for
    for r, w in zip(res, want, strict=True):
        torch.testing.assert_close(r["deployed"], w, atol=1e-6, rtol=0)


def test_fedavg_islands_are_the_same_on_every_node_and_recorded_in_the_trace(fedavg_islands_run):
    res = fedavg_islands_run
    _, draws = reference_fedavg_islands(4, H=2, rounds=3, seed=0)
    want = [{frozenset(g) for g in d} for d in draws]
    for r in res:   # each node's own record names the islands of every round
        mine = [e.groups for _, _, e in r["segments"] if e is not None]
        assert [{frozenset(g) for g in groups} for groups in mine] == want
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])   # raises if nodes disagree
    assert len(trace.collectives()) == 3


def test_fedavg_islands_bytes_formula_equals_the_packets_that_moved(fedavg_islands_run):
    res = fedavg_islands_run
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    sent, recv = trace.bytes_per_node()
    assert sent == [r["sent"] for r in res] and recv == [r["received"] for r in res]
    # per round: a ring of 2 over N_TINY fp32 values, one chunk packet (26 or 27 values) per phase
    per_round = sum(24 + 4 + 4 * c for c in (N_TINY // 2, N_TINY - N_TINY // 2))
    assert sent == [3 * per_round] * 4
    tl = replay(trace, NET4)
    assert [r["clock_s"] for r in res] == list(tl.end_s[-1])


def test_island_size_of_all_nodes_is_plain_fedavg():
    net = Network.uniform(2, "100Mbit", "5ms")
    plain = run_nodes(node_programs.train_strategy, 2, (net, "FedAvg(H=2)", 4))
    whole = run_nodes(node_programs.train_strategy, 2, (net, "FedAvg(H=2, island_size=2)", 4))
    for a, b in zip(plain, whole, strict=True):
        assert torch.equal(a["local"], b["local"]) and a["sent"] == b["sent"]
        assert all(e is None or getattr(e, "groups", None) is None for _, _, e in b["segments"])


def test_fedavg_between_rounds_deploys_the_last_average_not_the_drifting_local_model():
    # H=2, 3 steps, the run not ended: averaged after step 2, step 3 is local only
    res = run_nodes(node_programs.train_strategy, 2, (Network.uniform(2, "100Mbit", "5ms"), "FedAvg(H=2)", 3,
                                                      0.1, False))
    want, _ = reference_fedavg_islands(2, H=2, rounds=1, seed=0)   # 2 nodes: one island of both
    for r in res:
        torch.testing.assert_close(r["deployed"], want[0], atol=1e-6, rtol=0)
        assert not torch.allclose(r["local"], r["deployed"])
