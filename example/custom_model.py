"""Your own model and data on simulated nodes: a complete, runnable example.

    python example/custom_model.py                                  # 2 node processes on this machine
    torchrun --nproc-per-node 2 example/custom_model.py             # the same code, one process per rank

The factories live at module level and the entry point is guarded by
``if __name__ == "__main__":``: node processes are spawned and import this
file to find them (a lambda or a nested function could not reach them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import pysim


def model() -> nn.Module:
    """Any nn.Module: a two-layer MLP here."""
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def data() -> tuple[TensorDataset, TensorDataset]:
    """(training set, evaluation set): any map-style Dataset of (input, target) pairs."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 4, generator=g)

    def make(n: int) -> TensorDataset:
        x = torch.randn(n, 20, generator=g)
        return TensorDataset(x, (x @ w).argmax(1))

    return make(4000), make(1000)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3)


if __name__ == "__main__":
    workload = pysim.Workload("linear-teacher", model=model, data=data, optimizer=optimizer, target="accuracy>=0.9")
    for strategy in ("SimpleReduce", "DiLoCo(H=10)"):
        cfg = pysim.TrainConfig(workload=workload, strategy=strategy, nodes=2, steps=200, batch_size=32,
                                eval_every=10, network=pysim.Network.uniform(2, "100Mbit", "20ms"))
        result = pysim.run(cfg)
        if result is not None:  # under torchrun only rank 0 gets the result
            f = result.final
            print(f"{strategy}: accuracy {f.metrics['accuracy']:.3f}, simulated {f.sim_time_s:.2f} s, "
                  f"time to target {f.time_to_target_s}, {f.bytes_sent_per_node:.0f} bytes sent per node")
