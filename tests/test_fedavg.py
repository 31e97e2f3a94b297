"""FedAvg as McMahan et al. wrote it: examples-weighted averages, and cohorts of clients per round."""

import node_programs
import pytest
import torch
from tiny import batch, tiny_model

from pysim.launch import run_nodes
from pysim.strategies.fedavg import cohort
from pysim.trace import Collective


def local_sgd(params: list[torch.Tensor], rank: int, steps: range) -> list[torch.Tensor]:
    """Plain SGD (lr 0.1) on ``rank``'s batches from ``params``: the reference for a client's round."""
    model = tiny_model()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(v)
    for step in steps:
        x, y = batch(rank, step)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return [p.detach().clone() for p in model.parameters()]


def weighted(models: list[list[torch.Tensor]], weights: list[int]) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w / total * m[i] for m, w in zip(models, weights, strict=True)) for i in range(len(models[0]))]


def test_the_average_is_weighted_by_each_clients_examples():
    examples = [100, 300, 600]
    res = run_nodes(node_programs.train_tiny_cohorts, 3, ("FedAvg(H=2)", 4, examples, 0))
    glob = [p.detach().clone() for p in tiny_model().parameters()]
    for r in range(2):
        glob = weighted([local_sgd(glob, k, range(2 * r, 2 * r + 2)) for k in range(3)], examples)
    for r in res:
        for got, want in zip(r["deployed"], glob, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # an equal average would be another model: the weights matter here
    plain = [sum(m[i] for m in [local_sgd(glob, k, range(4, 6)) for k in range(3)]) / 3 for i in range(len(glob))]
    assert not torch.allclose(plain[0], glob[0], atol=1e-3)


@pytest.mark.parametrize("processes", [4, 1])
def test_a_cohort_per_round_trains_downloads_the_global_model_and_averages(processes):
    n, H, rounds, seed, examples = 4, 2, 3, 11, [50, 150, 100, 200]
    res = run_nodes(node_programs.train_tiny_cohorts, n, ("FedAvg(H=2, clients_per_round=2)", H * rounds, examples,
                                                          seed), processes=processes)
    glob = [p.detach().clone() for p in tiny_model().parameters()]
    holders = set(range(n))
    for r in range(rounds):
        members = cohort(n, 2, seed, r)
        for m in members:   # only the cohort trains, on the steps of its round
            assert [s for s in res[m]["trained"] if H * r <= s < H * (r + 1)] == [H * r, H * r + 1]
        for m in set(range(n)) - set(members):
            assert not [s for s in res[m]["trained"] if H * r <= s < H * (r + 1)]
        glob = weighted([local_sgd(glob, m, range(H * r, H * (r + 1))) for m in members],
                        [examples[m] for m in members])
        holders = set(members)
    assert len({cohort(n, 2, seed, r) for r in range(rounds)}) > 1   # the cohorts really change
    deployer = res[0]["deployer"]
    assert deployer == min(cohort(n, 2, seed, rounds - 1)) and deployer in holders
    for got, want in zip(res[deployer]["deployed"], glob, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the downloads and averages are on the trace: a broadcast to newcomers, an all-reduce of the cohort
    kinds = [(e.op, e.groups) for e in res[0]["events"] if isinstance(e, Collective)]
    assert [op for op, _ in kinds].count("allreduce") == rounds and "broadcast" in [op for op, _ in kinds]
    assert all(len([g for g in groups if len(g) > 1]) == 1 for _, groups in kinds)   # one active group each


def test_two_seeds_draw_different_cohorts_and_sparta_indices():
    assert [cohort(10, 3, 0, r) for r in range(4)] != [cohort(10, 3, 1, r) for r in range(4)]
    from pysim.comm import Comm
    from pysim.network import Network
    from pysim.strategies import make_strategy

    def indices(seed: int) -> torch.Tensor:
        s = make_strategy("SPARTA(p=0.1)")
        s.setup(tiny_model(), None, Comm(0, 1, Network.uniform(1, "1Gbps")), seed=seed)
        return s.comm_steps[0].sampler.indices(53, 0)

    assert not torch.equal(indices(0), indices(1))
    explicit = make_strategy("SPARTA(p=0.1, seed=5)")     # an explicit seed wins over the run's
    explicit.setup(tiny_model(), None, Comm(0, 1, Network.uniform(1, "1Gbps")), seed=1)
    assert explicit.comm_steps[0].sampler.seed == 5


def test_bad_cohorts_are_one_line_errors():
    from pysim.strategies import make_strategy

    for kwargs, message in (({"clients_per_round": 0}, "clients_per_round"), ({"clients_per_round": 1.5}, "fraction"),
                            ({"clients_per_round": 2, "island_size": 2}, "not both")):
        with pytest.raises(ValueError, match=message):
            make_strategy("FedAvg", **kwargs)
