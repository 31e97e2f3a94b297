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


# ---------------------------------------------------------------- factories that are not what pysim expects
# (tests/test_probe.py: each must fail before any node starts, in one line naming it)


def five_class_blobs() -> tuple[TensorDataset, TensorDataset]:
    """Labels 0..4, for tiny_mlp's 3 outputs."""
    train, test = blobs()
    return TensorDataset(train.tensors[0], train.tensors[1] + 2), test


def unpaired() -> tuple[list, list]:
    return [torch.randn(8) for _ in range(50)], [torch.randn(8) for _ in range(10)]


def one_set() -> TensorDataset:
    return blobs()[0]


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def no_optimizer(params) -> None:
    return None


def worded_metrics(model, data) -> dict:
    return {"accuracy": "high"}
