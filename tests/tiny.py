"""A tiny model, its per-node batches and a training loop in node processes, shared by the tests
that check strategies' update rules and timelines by hand."""

import torch
from torch import nn

from pysim.comm import Comm
from pysim.compute import ComputeMeter, ComputeProfile, Work
from pysim.network import Network
from pysim.strategies import make_strategy


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))   # 35 + 18 parameters


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(rank: int, world: int, spec: str, steps: int, net: Network, profile: ComputeProfile, opt: str = "adamw",
          lr: float = 0.05) -> dict:
    """``steps`` steps of ``spec`` on the tiny model; forward+backward costs ``profile.steps["step"]``."""
    model = tiny_model()
    optimizer = (torch.optim.SGD if opt == "sgd" else torch.optim.AdamW)(model.parameters(), lr=lr)
    meter = ComputeMeter(profile)
    comm = Comm(rank, world, net, meter)
    strategy = make_strategy(spec)
    strategy.setup(model, optimizer, comm)
    clocks = []
    for step in range(steps):
        x, y = batch(rank, step)
        with meter.measure(work=Work(), key="step"):
            loss = nn.functional.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
        strategy.step(step, last=step == steps - 1)
        clocks.append(comm.end_step())
    local = [p.detach().clone() for p in model.parameters()]
    return {"params": local, "local": local, "global": [p.detach().clone() for p in strategy.eval_model().parameters()],
            "clocks": clocks, "sent": comm.bytes_sent, "label": strategy.label,
            "segments": [(c, e) for c, _, e in comm.segments],
            "events": [type(e).__name__ for _, _, e in comm.segments]}
