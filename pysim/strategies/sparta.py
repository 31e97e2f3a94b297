"""SPARTA's random-subset averaging, and the SPARTA strategy."""

from __future__ import annotations

from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pysim.compress import RandomKCodec
from pysim.strategies.base import CommStep, Strategy, check_seed


class AverageRandomSubset(CommStep):
    """After every local step, average a random fraction ``p`` of the parameters over nodes
    (one dense all-reduce of the chosen values). The indices come from ``seed`` (default: the
    run's) and the step, the same on every node, so only values cross the wire.

    Nodes' models differ between exchanges; each node deploys its own, and a run scores node
    0's: a model a node really holds (an average of every node's would need a dense exchange
    that SPARTA never pays for)."""

    def __init__(self, p: float, seed: int | None = None) -> None:
        RandomKCodec(p)   # checks p now
        check_seed(seed, "SPARTA")
        self.p, self.seed = p, seed
        self.label = f"p={p:g}" + ("" if seed is None else f" seed={seed}")   # None: the run's seed

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.sampler = RandomKCodec(self.p, strategy.seeded(self.seed))

    def after_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        with s.compute(reuse="sparta.gather"):
            flat = parameters_to_vector(s.params).detach()
            idx = self.sampler.indices(flat.numel(), step)
            values = flat[idx]
        flat[idx] = s.comm.allreduce_mean(values)
        with s.compute(reuse="sparta.scatter"):
            vector_to_parameters(flat, s.params)


class SPARTA(Strategy):
    """SPARTA: after every local step, average a random fraction ``p`` of the parameters."""

    def __init__(self, p: float = 0.005, seed: int | None = None) -> None:
        self.comm_steps = (AverageRandomSubset(p, seed),)
