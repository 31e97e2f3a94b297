"""Sharding policies: disjoint, covering, seeded; Dirichlet follows the requested skew."""

import numpy as np
import pytest
import torch

from pysim.sharding import Sharding, ShardSampler, node_shards, shard_indices


def assert_partition(shards, n):
    allidx = torch.cat(shards)
    assert len(allidx) == n and len(set(allidx.tolist())) == n


@pytest.mark.parametrize("spec", ["iid", "contiguous", "dirichlet:0.3", "dirichlet:100"])
def test_shards_are_disjoint_cover_and_are_seeded(spec):
    labels = torch.arange(6000) % 10
    a = shard_indices(6000, 4, Sharding.parse(spec), 3, labels)
    b = shard_indices(6000, 4, Sharding.parse(spec), 3, labels)
    assert_partition(a, 6000)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_and_contiguous_layouts():
    iid = shard_indices(10, 3, Sharding.parse("iid"), 0)
    assert sorted(len(s) for s in iid) == [3, 3, 4]
    assert [s.tolist() for s in shard_indices(10, 3, Sharding.parse("contiguous"), 0)] == \
        [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # bounds 10r//3


def test_dirichlet_label_histograms_follow_the_skew():
    labels = torch.arange(20000) % 10

    def skew(alpha: float) -> float:
        """Mean over nodes of the largest class share (0.1 = perfectly balanced)."""
        shards = shard_indices(20000, 4, Sharding("dirichlet", alpha), 0, labels)
        return float(np.mean([np.bincount(labels[s].numpy(), minlength=10).max() / len(s) for s in shards]))

    assert skew(0.05) > 0.5     # most of a node's data is one class
    assert skew(1000.0) < 0.12  # close to IID
    # the per-class proportions are the seeded Dirichlet draws: class c's split follows rng.dirichlet
    rng = np.random.default_rng(0)
    shards = shard_indices(20000, 4, Sharding("dirichlet", 0.5), 0, labels)
    rng.permutation(2000)
    share = rng.dirichlet(np.full(4, 0.5))
    got = [int((labels[s] == 0).sum()) for s in shards]
    assert got == pytest.approx(list(share * 2000), abs=1.0)


def test_bad_specs_and_impossible_splits():
    for bad in ("dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "random", 5):
        with pytest.raises(ValueError, match="bad sharding"):
            Sharding.parse(bad)
    with pytest.raises(ValueError, match="needs labels"):
        shard_indices(100, 2, Sharding("dirichlet", 1.0), 0, None)
    with pytest.raises(ValueError, match="at least one example"):
        shard_indices(3, 4, Sharding("iid"), 0)


def test_iid_shards_follow_the_seed():
    a, b = (shard_indices(100, 2, Sharding("iid"), seed)[0] for seed in (0, 1))
    assert not torch.equal(a, b)


def test_a_shard_as_large_as_a_batch_is_enough():
    assert [len(s) for s in node_shards(8, 2, Sharding("contiguous"), 0, 4)] == [4, 4]
    with pytest.raises(ValueError, match="fewer than the batch size 5"):
        node_shards(8, 2, Sharding("contiguous"), 0, 5)


class Indices:
    """A data set whose batch is its indices."""

    def batch(self, idx):
        return idx, idx


@pytest.mark.parametrize("seed", range(5))
def test_the_sampler_takes_every_example_once_per_pass_then_reshuffles(seed):
    sampler = ShardSampler(Indices(), torch.arange(10, 18), 4, seed)
    passes = [sorted(torch.cat([sampler.next()[0] for _ in range(2)]).tolist()) for _ in range(3)]
    assert passes == [list(range(10, 18))] * 3
    odd = ShardSampler(Indices(), torch.arange(10), 4, seed)   # 10 = 2 batches + 2 left: the rest waits a pass
    first = torch.cat([odd.next()[0] for _ in range(2)]).tolist()
    assert len(set(first)) == 8
