"""FedAvg's model averaging, and the FedAvg strategy."""

from __future__ import annotations

import copy

from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pysim.strategies.base import CommStep, Strategy


class AverageModels(CommStep):
    """Every ``H`` local steps (and at the last step): replace every node's parameters by
    their mean over nodes (one dense fp32 all-reduce). Deploys the last averaged model."""

    def __init__(self, H: int) -> None:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H (local steps per averaging round) must be an integer >= 1, got {H!r}")
        self.H = H
        self.label = f"H={H}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.averaged = copy.deepcopy(strategy.model)

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        with s.compute():
            flat = parameters_to_vector(s.params).detach()
        avg = s.comm.allreduce_mean(flat)
        with s.compute():
            vector_to_parameters(avg, s.params)
            vector_to_parameters(avg, self.averaged.parameters())

    def eval_model(self):
        return self.averaged


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017) without client sampling: ``H`` local steps of the inner
    optimizer (whose state each node keeps), then every node takes the average model.
    (Averaging within random islands needs subgroup collectives in comm; not yet.)"""

    def __init__(self, H: int = 10) -> None:
        self.comm_steps = (AverageModels(H),)
