"""A user-defined workload for the tests: module level, so spawned node processes can import it."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def blobs() -> tuple[TensorDataset, TensorDataset]:
    """Three Gaussian blobs in 8-D: easy to separate."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorDataset(centres[y] + torch.randn(n, 8, generator=g), y)

    return make(1200), make(300)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05)
