"""DiLoCo's outer step, and the DiLoCo strategy."""

from __future__ import annotations

import copy

import torch

from pysim.strategies.base import CommStep, Strategy, check_outer_step
from pysim.strategies.reducers import make_reducer


class OuterStep(CommStep):
    """Every ``H`` local steps (and at the last step): average the pseudo-gradient
    delta = theta_global - theta_local over nodes through the codec's reducer, apply an
    outer SGD step (Nesterov momentum when ``outer_momentum`` > 0) to the global model,
    and restart the local model from it. Deploys the global model."""

    def __init__(self, H: int, outer_lr: float, outer_momentum: float, codec: str | None) -> None:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H (local steps per outer step) must be an integer >= 1, got {H!r}")
        check_outer_step(outer_lr, outer_momentum)
        self.H, self.outer_lr, self.outer_momentum = H, outer_lr, outer_momentum
        self.reducer = make_reducer(codec)
        codec_label = "" if self.reducer.label == "dense" else f" {self.reducer.label}"
        self.label = f"H={H}{codec_label} outer {outer_lr}/{outer_momentum}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.reducer.setup(strategy.comm, strategy.run_seed)
        self.global_model = copy.deepcopy(strategy.model)
        self.global_params = list(self.global_model.parameters())
        self.outer = torch.optim.SGD(self.global_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                     nesterov=self.outer_momentum > 0)
        # the outer step's blocks do the same work at every sync: counted twice, then reused
        self._work = f"{strategy.param_shapes}, momentum {self.outer_momentum > 0}"

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        with s.compute(reuse=f"diloco deltas {self._work}"):
            deltas = {name: (g.detach() - p.detach()) for name, g, p in zip(s.names, self.global_params, s.params,
                                                                             strict=True)}
        avg = self.reducer.mean(deltas, step)
        with s.compute(reuse=f"diloco outer step {self._work}, buffers {bool(self.outer.state)}"):
            self.outer.zero_grad()
            for g, d in zip(self.global_params, avg.values(), strict=True):
                g.grad = d.clone()
            self.outer.step()
            with torch.no_grad():
                for g, p in zip(self.global_params, s.params, strict=True):
                    p.copy_(g)

    def eval_model(self):
        return self.global_model


class DiLoCo(Strategy):
    """DiLoCo (Douillard et al. 2023): H local steps of the inner optimizer, then an outer
    Nesterov SGD step on the averaged pseudo-gradient. ``codec`` compresses the
    pseudo-gradient (see :mod:`pysim.strategies.reducers`): "dense:fp16" (all-reduce, local
    error feedback), "lowrank:R" (per-node factors, all-gathered), "powersgd:R" (shared Q,
    all-reduced), "topk:0.05"... Deploys the global model."""

    def __init__(self, H: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 codec: str | None = None) -> None:
        self.comm_steps = (OuterStep(H, outer_lr, outer_momentum, codec),)
