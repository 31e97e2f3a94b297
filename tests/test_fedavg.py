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
    # the equal average of the same rounds is another model, farther from the run's than the tolerance
    plain = [p.detach().clone() for p in tiny_model().parameters()]
    for r in range(2):
        plain = weighted([local_sgd(plain, k, range(2 * r, 2 * r + 2)) for k in range(3)], [1, 1, 1])
    assert max(float((a - b).abs().max()) for a, b in zip(plain, res[0]["deployed"], strict=True)) > 1e-3


@pytest.mark.parametrize("processes", [4, 1])
def test_a_cohort_per_round_trains_downloads_the_global_model_and_averages(processes):
    n, H, rounds, seed, examples = 4, 2, 3, 10, [50, 150, 100, 200]   # cohorts (2, 3), (1, 3), (2, 3)
    res = run_nodes(node_programs.train_tiny_cohorts, n, ("FedAvg(H=2, clients_per_round=2)", H * rounds, examples,
                                                          seed), processes=processes)
    glob = [p.detach().clone() for p in tiny_model().parameters()]
    for r in range(rounds):
        members = cohort(n, 2, seed, r)
        for m in members:   # only the cohort trains, on the steps of its round
            assert [s for s in res[m]["trained"] if H * r <= s < H * (r + 1)] == [H * r, H * r + 1]
        for m in set(range(n)) - set(members):
            assert not [s for s in res[m]["trained"] if H * r <= s < H * (r + 1)]
        glob = weighted([local_sgd(glob, m, range(H * r, H * (r + 1))) for m in members],
                        [examples[m] for m in members])
    assert len({cohort(n, 2, seed, r) for r in range(rounds)}) > 1   # the cohorts really change
    deployer = res[0]["deployer"]
    assert deployer == min(cohort(n, 2, seed, rounds - 1)) and {r["deployer"] for r in res} == {deployer}
    # mid-round, the last finished round's cohort holds the global model (node 0 before the first)
    finished = [(s + 1) // H - 1 for s in range(H * rounds)]
    assert res[0]["deployers"] == [0 if r < 0 else min(cohort(n, 2, seed, r)) for r in finished]
    assert len({min(cohort(n, 2, seed, r)) for r in range(rounds)}) > 1   # a wrong round would show
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


def test_a_fraction_of_the_clients_is_floored_as_written_and_at_least_one():
    from pysim.strategies.fedavg import AverageModels

    for c, nodes, k in ((0.5, 4, 2), (0.5, 5, 2), (0.1, 4, 1), (0.29, 100, 29), (0.57, 100, 57), (0.3, 10, 3),
                        (1.0, 7, 7), (0.999, 1000, 999)):
        assert AverageModels(2, clients_per_round=c).clients(nodes) == k, (c, nodes)
    assert AverageModels(2, clients_per_round=3).clients(100) == 3      # an int is a count
    assert AverageModels(2).clients(6) == 6


def test_a_fraction_of_the_clients_trains_each_round():
    n, H, rounds, seed = 4, 2, 3, 5
    res = run_nodes(node_programs.train_tiny_cohorts, n, ("FedAvg(H=2, clients_per_round=0.5)", H * rounds,
                                                          [100] * n, seed), processes=1)
    for r in range(rounds):
        members = cohort(n, 2, seed, r)
        trained = [k for k in range(n) if H * r in res[k]["trained"]]
        assert trained == sorted(members)


@pytest.mark.parametrize("processes", [1, 3])
def test_a_cohort_of_one_client_trains_alone_and_hands_its_model_on(processes):
    # every group a single node: no ring anywhere (three nodes in one process ended in an IndexError)
    n, H, rounds, seed = 3, 2, 6, 0
    members = [cohort(n, 1, seed, r)[0] for r in range(rounds)]
    assert len(set(members)) > 1
    res = run_nodes(node_programs.train_tiny_cohorts, n, ("FedAvg(H=2, clients_per_round=1)", H * rounds, [10] * n,
                                                          seed), processes=processes)
    glob = [p.detach().clone() for p in tiny_model().parameters()]
    for r, m in enumerate(members):
        glob = local_sgd(glob, m, range(H * r, H * (r + 1)))
    deployer = res[0]["deployer"]
    assert deployer == members[-1]
    for got, want in zip(res[deployer]["deployed"], glob, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    handovers = sum(a != b for a, b in zip(members, members[1:], strict=False))
    assert sum(r["sent"] for r in res) == handovers * (24 + 4 + 4 * sum(p.numel() for p in glob))


@pytest.mark.parametrize("epochs", [1, 2])
def test_epochs_give_each_client_e_passes_over_its_own_data_a_round(epochs):
    """McMahan et al.'s E: client k takes E x floor(n_k / B) steps a round, the round lasts the
    longest client's, and the average is weighted by n_k."""
    examples, batch_size = [64, 175, 96], 32               # 2, 5 and 3 full batches a pass
    local = [epochs * 2, epochs * 5, epochs * 3]
    length, rounds = max(local), 2
    res = run_nodes(node_programs.train_tiny_cohorts, 3, (f"FedAvg(epochs={epochs})", length * rounds, examples, 0,
                                                          batch_size))
    glob = [p.detach().clone() for p in tiny_model().parameters()]
    for r in range(rounds):
        glob = weighted([local_sgd(glob, k, range(length * r, length * r + local[k])) for k in range(3)], examples)
    for k, r in enumerate(res):
        assert r["trained"] == [length * i + s for i in range(rounds) for s in range(local[k])]
        for got, want in zip(r["deployed"], glob, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # a ring all-reduce of the model per round, nothing else (a client done early sends nothing):
    # each node sends 2 (N - 1) chunk packets of 28 header bytes, and every value crosses 2 (N - 1) times
    n = sum(p.numel() for p in glob)
    assert sum(r["sent"] for r in res) == rounds * (3 * 4 * 28 + 4 * 2 * 2 * n)


def test_epochs_with_equal_shards_are_h_steps():
    from pysim.strategies import make_strategy

    assert make_strategy("FedAvg(epochs=3)").label == "FedAvg E=3"
    res = run_nodes(node_programs.train_tiny_cohorts, 2, ("FedAvg(epochs=1)", 6, [96, 96], 0, 32))
    same = run_nodes(node_programs.train_tiny_cohorts, 2, ("FedAvg(H=3)", 6, [96, 96], 0, 32))
    for a, b in zip(res, same, strict=True):
        assert a["trained"] == b["trained"] == list(range(6))
        assert all(torch.equal(x, y) for x, y in zip(a["deployed"], b["deployed"], strict=True))


def test_epochs_in_a_run_with_unequal_shards():
    """Through the trainer (which tells the strategy the batch size) with Dirichlet shards: each
    node computes on E x floor(n_k / B) steps a round and sits out the rest."""
    from pysim.config import TrainConfig, training_shards
    from pysim.network import Network
    from pysim.trainer import run
    from pysim.workload import Batches, image_workload

    cfg = TrainConfig(workload=image_workload(lr=3e-3), strategy="FedAvg", strategy_args={"epochs": 1}, nodes=3,
                      steps=30, eval_every=30, eval_subset=120, train_examples=600, batch_size=16,
                      sharding="dirichlet:1", compute="cpu", network=Network.uniform(3, "100Mbit", "5ms"))
    train = Batches(cfg.workload.data()[0])
    shards = training_shards(cfg, 3, len(train), train.labels())
    local = [len(s) // 16 for s in shards]
    assert len(set(local)) == 3 and max(local) < 30   # unequal shards, more than one round
    result = run(cfg)
    step_s = max(max(seg) for seg in result.trace.compute_s)   # a training step; packing models costs ~1/50
    trained = [sum(1 for seg in result.trace.compute_s if seg[k] > step_s / 2) for k in range(3)]
    length = max(local)
    assert trained == [sum(min(local[k], length, 30 - start) for start in range(0, 30, length)) for k in range(3)]


def test_bad_cohorts_are_one_line_errors():
    from pysim.strategies import make_strategy

    for kwargs, message in (({"clients_per_round": 0}, "clients_per_round"), ({"clients_per_round": 1.5}, "fraction"),
                            ({"clients_per_round": 2, "island_size": 2}, "not both"),
                            ({"epochs": 0}, "epochs .* must be an integer >= 1, got 0"),
                            ({"epochs": 1.0}, "epochs .* got 1.0"), ({"epochs": True}, "epochs"),
                            ({"H": 5, "epochs": 1}, "H .* or epochs .* not both")):
        with pytest.raises(ValueError, match=message):
            make_strategy("FedAvg", **kwargs)
    # epochs need the batch size and shards of at least a batch
    import torch.nn as nn

    from pysim.comm import Comm
    from pysim.network import Network

    model = nn.Linear(2, 2)
    fits = make_strategy("FedAvg(epochs=1)")   # a client of exactly one batch takes one step a pass
    fits.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), Comm(0, 2, Network.uniform(2, "1Gbps")),
               examples=[32, 64], batch_size=32)
    assert fits.comm_steps[0].local_steps == [1, 2] and fits.comm_steps[0].H == 2
    for batch_size, examples in ((None, [64, 64]), (32, [64, 16])):
        with pytest.raises(ValueError, match="needs the run's batch size and every client's number of training"):
            make_strategy("FedAvg(epochs=1)").setup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                    Comm(0, 2, Network.uniform(2, "1Gbps")), examples=examples,
                                                    batch_size=batch_size)
