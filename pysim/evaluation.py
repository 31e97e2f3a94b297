"""Evaluation inside a run: which examples, on which nodes, and the first step reaching the target.

Evaluation is simulator bookkeeping: it costs real time, never simulated time,
and the weights and metrics it moves between node processes (gloo, outside the
simulated network) are not charged.

- :func:`eval_subset`: the fixed examples evaluated between full evaluations.
- :class:`NodeEvaluation`: evaluates node 0's deployed model. Split (the
  default), every node evaluates an equal share of the examples on a copy of
  node 0's weights and the shares' metrics are combined as example-weighted
  means, so an evaluation takes 1/n of the real time it takes on node 0
  alone. That is exact for metrics that are means over examples (the
  built-ins' loss and accuracy); a workload with other metrics sets
  ``split_evaluation=False`` and node 0 evaluates alone.
- :class:`CrossingFinder`: time to target at step resolution (see
  :mod:`pysim.node`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from pysim.workload import Batches, Target

EVAL_SUBSET_SEED = 7919


def eval_subset(n: int, size: int | None, seed: int = EVAL_SUBSET_SEED) -> torch.Tensor:
    """The fixed evaluation examples used between full evaluations: ``size`` of ``n``. The same
    for every run seed: the evaluation set is the ruler, and a subset drawn per seed would add
    its own difficulty (+-0.4% accuracy for 1000 MNIST images) to the spread over seeds."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


class Subset:
    """The rows ``idx`` of a ``Batches`` set, as a set of its own."""

    def __init__(self, data: Batches, idx: torch.Tensor) -> None:
        self.data, self.idx = data, idx

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(self.idx[idx])


class NodeEvaluation:
    """``metrics(model, data)`` of node 0's model, on the nodes that take part (see the module
    docstring). Split: every node calls it at once with its own ``model`` argument ignored except
    on node 0 (others may pass None) and every node gets the combined metrics. Not split (or one
    node): only node 0 calls it."""

    def __init__(self, rank: int, world: int, metrics: Callable[..., dict[str, float]], split: bool = True) -> None:
        self.rank, self.world, self.metrics = rank, world, metrics
        self.split = split and world > 1
        self._copy: nn.Module | None = None   # node 0's weights, on the other nodes

    @property
    def takes_part(self) -> bool:
        """Whether this node runs evaluations."""
        return self.split or self.rank == 0

    def __call__(self, model: nn.Module | None, data: Batches | Subset) -> dict[str, float]:
        if not self.split:
            return self.metrics(model, data)
        model = self._node0_weights(model)
        share = Subset(data, torch.arange(self.rank, len(data), self.world))
        mine = self.metrics(model, share) if len(share) else {}
        keys = sorted(mine)
        # every node must name the same metrics: node 0's names travel first (an empty share has none)
        names = [keys]
        dist.broadcast_object_list(names, 0)
        keys = names[0]
        if len(share) and sorted(mine) != keys:
            raise ValueError(f"node {self.rank}'s metrics {sorted(mine)} differ from node 0's {keys}: metrics must "
                             "name the same values on every share of the data (or set split_evaluation=False)")
        sums = torch.tensor([mine.get(k, 0.0) * len(share) for k in keys] + [float(len(share))], dtype=torch.float64)
        dist.all_reduce(sums)
        count = float(sums[-1])
        return {k: float(sums[i]) / count for i, k in enumerate(keys)}

    def _node0_weights(self, model: nn.Module | None) -> nn.Module:
        """Node 0's ``model``; on the other nodes a copy of it with node 0's weights (broadcast)."""
        if self.rank == 0:
            if model is None:
                raise ValueError("node 0 must pass the model to evaluate")
            for t in model.state_dict().values():
                dist.broadcast(t.detach().contiguous(), 0)
            return model
        if self._copy is None:
            if model is None:
                raise ValueError("the first evaluation on a node needs a model of the same architecture")
            self._copy = copy.deepcopy(model)
        with torch.no_grad():
            for t in self._copy.state_dict().values():
                buf = t.contiguous()
                dist.broadcast(buf, 0)
                if buf.data_ptr() != t.data_ptr():
                    t.copy_(buf)
        return self._copy


class CrossingFinder:
    """Finds the first step whose deployed model reaches ``target`` (see :mod:`pysim.node`).

    ``keep(step, model)`` stores a copy of the model deployed after ``step`` while the target
    is not reached (``store=False``: only the step, on nodes that evaluate node 0's copies);
    ``evaluated(step, metrics)`` is told every regular evaluation and, at the first one that
    reaches the target, returns the (step, metrics) of the bisection evaluations it ran on the
    stored copies (``evaluate(model or None) -> metrics``: collective when split)."""

    def __init__(self, target: Target, evaluate: Callable[[nn.Module | None], dict[str, float]],
                 store: bool = True) -> None:
        self.target, self.evaluate, self.store = target, evaluate, store
        self.reached = False
        self.last_step = 0                      # step of the last evaluation below the target
        self.kept: dict[int, list[torch.Tensor] | None] = {}
        self._scratch: nn.Module | None = None

    def state(self) -> tuple:
        """What a checkpoint keeps of it: whether the target is reached, the last evaluation below
        it, and the kept models."""
        return self.reached, self.last_step, self.kept

    def restore(self, state: tuple) -> None:
        self.reached, self.last_step, self.kept = state

    def keep(self, step: int, model: nn.Module) -> None:
        if self.reached:
            return
        if not self.store:
            self.kept[step] = None
            return
        if self._scratch is None:
            self._scratch = copy.deepcopy(model)
        self.kept[step] = [t.detach().clone() for t in model.state_dict().values()]

    def _kept_model(self, step: int) -> nn.Module | None:
        tensors = self.kept[step]
        if tensors is None:
            return None   # not stored here: the evaluation takes node 0's weights
        with torch.no_grad():
            for dst, src in zip(self._scratch.state_dict().values(), tensors, strict=True):
                dst.copy_(src)
        return self._scratch

    def evaluated(self, step: int, metrics: dict[str, float]) -> list[tuple[int, dict[str, float]]]:
        if self.reached:
            return []
        value = metrics.get(self.target.metric)
        if value is None or not self.target.reached(value):
            self.last_step = step
            self.kept.clear()
            return []
        self.reached = True
        lo, hi, found = self.last_step, step, []
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if mid not in self.kept:
                break
            m = self.evaluate(self._kept_model(mid))
            found.append((mid, m))
            if self.target.reached(m[self.target.metric]):
                hi = mid
            else:
                lo = mid
        self.kept.clear()
        return sorted(found, key=lambda e: e[0])
