"""Evaluation inside a run: which examples, on which processes, and the first step reaching the target.

Evaluation is simulator bookkeeping: it costs real time, never simulated time,
and the weights and metrics it moves between worker processes (gloo, outside
the simulated network) are not charged.

- :func:`eval_subset`: the fixed examples evaluated between full evaluations.
- :class:`Evaluator`: evaluates node 0's deployed model. Every node calls it at
  the same points (a meeting of the nodes, :meth:`pysim.host.Host.meet`); each
  node's share of the examples is evaluated on node 0's weights by the process
  hosting the node, and the shares' metrics are combined as example-weighted
  means, so an evaluation takes 1/P of the real time it takes in one process
  (P worker processes). That is exact
  for metrics that are means over examples (the built-ins' loss and accuracy);
  a workload with other metrics sets ``split_evaluation=False`` and node 0's
  process evaluates alone. Every node gets the metrics.
- :class:`CrossingFinder`: time to target at step resolution (see
  :mod:`pysim.node`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pysim.host import Host
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


class Evaluator:
    """``metrics(model, data)`` of node 0's model, computed by the worker processes of a run (see
    the module docstring). Every node calls it at once: node 0 with the model to evaluate, the
    others with their own model as a template of the architecture (or None: the template of the
    last call).

    Split, the examples are cut into one share per *node* (node i takes examples i, i+N, ...,
    as before nodes shared processes) and each process evaluates its own nodes' shares; the
    shares' metrics are combined in node order, so the result does not depend on how the
    nodes are spread over processes."""

    def __init__(self, host: Host, metrics: Callable[..., dict[str, float]], split: bool = True) -> None:
        self.host, self.metrics = host, metrics
        self.split = split and host.world > 1

    def __call__(self, model: nn.Module | None, data: Batches | Subset) -> dict[str, float]:
        return self.host.meet("evaluate", (model, data), self._evaluate)

    def _evaluate(self, requests: dict[int, tuple[nn.Module | None, Batches | Subset]]) -> dict[int, dict]:
        data = next(iter(requests.values()))[1]
        if not self.split:
            metrics = self.metrics(requests[0][0], data) if 0 in requests else None
            return dict.fromkeys(requests, self._from_node0(metrics))
        model = self._node0_weights(requests)
        world = self.host.world
        shares = {n: Subset(data, torch.arange(n, len(data), world)) for n in requests}
        mine = {n: self.metrics(model, share) if len(share) else {} for n, share in shares.items()}
        keys = self._from_node0(sorted(mine[0]) if 0 in requests else None)  # every process names node 0's metrics
        for n, m in mine.items():
            if len(shares[n]) and sorted(m) != keys:
                raise ValueError(f"the metrics {sorted(m)} on node {n}'s share of the data differ from {keys} on "
                                 "node 0's: metrics must name the same values on every share (or set "
                                 "split_evaluation=False)")
        rows = {n: np.array([m.get(k, 0.0) * len(shares[n]) for k in keys] + [float(len(shares[n]))])
                for n, m in mine.items()}
        table = self.host.transport.gather_rows(rows)
        sums = [0.0] * (len(keys) + 1)
        for row in table:          # in node order: the same arithmetic for any placement
            for i, v in enumerate(row):
                sums[i] += float(v)
        return dict.fromkeys(requests, {k: sums[i] / sums[-1] for i, k in enumerate(keys)})

    def _from_node0(self, value):
        """``value`` of node 0's process, in every process (a one-object broadcast, uncharged)."""
        return self.host.transport.broadcast_object(value, 0)

    def _node0_weights(self, requests: dict) -> nn.Module:
        """Node 0's model to evaluate; in the other processes a copy of a local node's model (the
        same architecture) holding node 0's weights (broadcast)."""
        t = self.host.transport
        if 0 in requests:
            model = requests[0][0]
            if model is None:
                raise ValueError("node 0 must pass the model to evaluate")
            t.broadcast_from(0, [v.detach().contiguous() for v in model.state_dict().values()])
            return model

        last = self.host.shared("evaluation model, last", dict)   # any node's Evaluator may run this
        local = next((m for m, _ in requests.values() if m is not None), None)
        if local is not None:
            shapes = tuple((k, tuple(v.shape)) for k, v in local.state_dict().items())
            last["copy"] = self.host.shared(("evaluation model", type(local), shapes), lambda: copy.deepcopy(local))
        elif "copy" not in last:
            raise ValueError("the first evaluation needs every node's model as a template of node 0's")
        copy_ = last["copy"]
        with torch.no_grad():
            for v in copy_.state_dict().values():
                buf = v.contiguous()
                t.broadcast_from(0, [buf])
                if buf.data_ptr() != v.data_ptr():
                    v.copy_(buf)
        return copy_


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
