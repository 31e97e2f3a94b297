"""Write your own strategy: gradients averaged as 8-bit integer codes.

A strategy is a local optimizer step plus a list of communication steps. This one
adds one step before the local step: every node scales its gradient by a scale
shared by all nodes (the largest node's max|g| / 127), rounds it to integers in
[-127, 127] and all-reduces the codes. The codes travel as fp16, which holds them
(and their sums over up to 16 nodes) exactly, so 2 bytes per value cross the wire.
Subclassing Strategy registers it: ``make_strategy("Int8")`` now works too.

    python example/custom_strategy.py      # 2 nodes, a tiny model, ~5 s
"""

import torch
from torch import nn

from pysim.comm import Comm
from pysim.compress import DenseCodec
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.strategies import CommStep, Strategy, make_strategy

FP32, FP16 = DenseCodec("fp32"), DenseCodec("fp16")


class AverageInt8Gradients(CommStep):
    label = "codes as fp16"

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        flat = s.flat_grads()
        with s.compute():
            my_scale = flat.abs().max().clamp_min(1e-12).reshape(1) / 127
        scales = s.comm.allgather(FP32.pack(my_scale))  # every node's scale, one small packet each
        with s.compute():
            scale = max(float(FP32.unpack(p)) for p in scales)
            codes = torch.round(flat / scale)
        s.set_grads(s.comm.allreduce_mean(codes, FP16) * scale)


class Int8(Strategy):
    """Gradients averaged as int8 codes on a shared scale, then the inner optimizer steps."""

    def __init__(self) -> None:
        self.comm_steps = (AverageInt8Gradients(),)


def train(rank: int, world: int, spec: str, steps: int = 20) -> dict:
    """One node: a tiny regression model, this rank's own random data, SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    comm = Comm(rank, world, Network.uniform(world, "100Mbit", "20ms"))
    strategy = make_strategy(spec)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.05), comm)
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x = torch.randn(32, 10, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        model.zero_grad()
        loss.backward()
        strategy.step(step, last=step == steps - 1)
        comm.end_step()
    return {"label": strategy.label, "loss": loss.item(), "sent": comm.bytes_sent, "clock_s": comm.clock_s,
            "params": torch.cat([p.detach().reshape(-1) for p in strategy.eval_model().parameters()])}


def main() -> dict:
    results = {spec: run_nodes(train, 2, (spec,)) for spec in ("SimpleReduce", "Int8")}
    for r0, r1 in results.values():
        assert torch.equal(r0["params"], r1["params"]), "nodes disagree"
        print(f"{r0['label']:<22} last loss {r0['loss']:.3f}  bytes sent/node {r0['sent']:>7,}  "
              f"simulated {r0['clock_s']:.3f} s")
    gap = (results["Int8"][0]["params"] - results["SimpleReduce"][0]["params"]).abs().max()
    print(f"largest parameter difference from SimpleReduce: {gap:.2e}")
    return results


if __name__ == "__main__":
    main()
