"""Evaluation inside a run: which examples, on which processes, and the first step reaching the target.

Evaluation is simulator bookkeeping: it costs real time, never simulated time,
and the weights and metrics it moves between worker processes (gloo, outside
the simulated network) are not charged.

- :func:`eval_subset`: the fixed examples evaluated between full evaluations.
- :class:`Evaluator`: evaluates the deployed model of one node (node 0, or the
  node the strategy names: :meth:`pysim.strategies.Strategy.deployer`). Every node calls it at
  the same points (a meeting of the nodes, :meth:`pysim.host.Host.meet`); the
  examples are cut into shares held by nodes (one per node, or fewer where a
  share would have under :data:`SHARE_EXAMPLES`: :func:`split_shares`), each
  share is evaluated on the holder's weights by the process hosting its node,
  and the shares' metrics are combined as example-weighted means, so an
  evaluation takes about 1/P of the real time it takes in one process (P worker
  processes). That is exact
  for metrics that are means over examples (the built-ins' loss and accuracy);
  a workload with other metrics sets ``split_evaluation=False`` and the holder's
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
from pysim.workload import Batches, Target, evaluation_mode

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
    """``metrics(model, data)`` of one node's model, computed by the worker processes of a run (see
    the module docstring). Every node calls it at once: the holder with the model to evaluate, the
    others with their own model as a template of the architecture (or None: the template of the
    last call). ``metrics`` gets the model in evaluation mode (``Module.eval``: no dropout,
    batch norm's running statistics); the model is back in its mode after.

    Split, the examples are cut into shares held by nodes (:func:`split_shares`: one per node
    while each gets ``SHARE_EXAMPLES`` or more) and each process evaluates its own nodes'
    shares; the shares' metrics are combined in node order, so the result does not depend on
    how the nodes are spread over processes."""

    def __init__(self, host: Host, metrics: Callable[..., dict[str, float]], split: bool = True) -> None:
        self.host, self.metrics = host, metrics
        self.split = split and host.world > 1

    def __call__(self, model: nn.Module | None, data: Batches | Subset, holder: int = 0) -> dict[str, float]:
        """Every node at once: ``holder`` (the same on every node) passes the model to evaluate,
        the others their own model as a template, or None (the template of the last call)."""
        return self.host.meet("evaluate", (model, data, holder), self._evaluate)

    def _evaluate(self, requests: dict[int, tuple]) -> dict[int, dict]:
        _, data, holder = next(iter(requests.values()))
        if not self.split:
            metrics = None
            if holder in requests:
                with evaluation_mode(requests[holder][0]):
                    metrics = self.metrics(requests[holder][0], data)
            return dict.fromkeys(requests, self._from(holder, metrics))
        model = self._holders_weights(requests, holder)
        world = self.host.world
        held = split_shares(len(data), world)
        shares = {n: Subset(data, held.get(n, torch.arange(0))) for n in requests}   # empty: a node that holds none
        with evaluation_mode(model):   # once for all the shares, not once per share
            mine = {n: self.metrics(model, share) if len(share) else {} for n, share in shares.items()}
        keys = self._from(0, sorted(mine[0]) if 0 in requests else None)  # the names on node 0's share
        for n, m in mine.items():
            if len(shares[n]) and sorted(m) != keys:
                raise ValueError(f"the metrics {sorted(m)} on node {n}'s share of the data differ from {keys} on "
                                 f"node 0's: metrics must name the same values on every share (or set "
                                 "split_evaluation=False)")
        rows = {n: np.array([m.get(k, 0.0) * len(shares[n]) for k in keys] + [float(len(shares[n]))])
                for n, m in mine.items()}
        table = self.host.transport.gather_rows(rows)
        sums = [0.0] * (len(keys) + 1)
        for row in table:          # in node order: the same arithmetic for any placement
            for i, v in enumerate(row):
                sums[i] += float(v)
        return dict.fromkeys(requests, {k: sums[i] / sums[-1] for i, k in enumerate(keys)})

    def _from(self, holder: int, value):
        """``value`` of node ``holder``'s process, in every process (a one-object broadcast, uncharged)."""
        return self.host.transport.broadcast_object(value, holder)

    def _holders_weights(self, requests: dict, holder: int) -> nn.Module:
        """The holder's model to evaluate; in the other processes a copy of a local node's model
        (the same architecture) holding the holder's weights (broadcast)."""
        t = self.host.transport
        if holder in requests:
            model = requests[holder][0]
            if model is None:
                raise ValueError(f"node {holder} must pass the model to evaluate")
            t.broadcast_from(holder, [v.detach().contiguous() for v in model.state_dict().values()])
            return model

        last = self.host.shared("evaluation model, last", dict)   # any node's Evaluator may run this
        local = next((r[0] for r in requests.values() if r[0] is not None), None)
        if local is not None:
            shapes = tuple((k, tuple(v.shape)) for k, v in local.state_dict().items())
            last["copy"] = self.host.shared(("evaluation model", type(local), shapes), lambda: copy.deepcopy(local))
        elif "copy" not in last:
            raise ValueError("the first evaluation needs every node's model as a template of the holder's")
        copy_ = last["copy"]
        with torch.no_grad():
            for v in copy_.state_dict().values():
                buf = v.contiguous()
                t.broadcast_from(holder, [buf])
                if buf.data_ptr() != v.data_ptr():
                    v.copy_(buf)
        return copy_


SHARE_EXAMPLES = 32   # the fewest examples of a share of a split evaluation, where there are that many


def split_shares(examples: int, nodes: int) -> dict[int, torch.Tensor]:
    """Which rows of a set of ``examples`` each node evaluates in a split evaluation: S =
    min(nodes, examples // SHARE_EXAMPLES) shares (at least 1), share j the rows j, j + S, ...,
    held by node j * nodes // S (spread over the nodes, so over the worker processes). One share
    per node where there are enough examples; at 256 nodes, 500 examples make 15 shares of 33,
    not 256 of 1-2: a forward pass of the CNN costs 0.32 ms for 2 examples and 1.4 ms for 33."""
    count = max(1, min(nodes, examples // SHARE_EXAMPLES))
    return {j * nodes // count: torch.arange(j, examples, count) for j in range(count)}


class CrossingFinder:
    """Finds the first step whose deployed model reaches ``target`` (see :mod:`pysim.node`).

    ``keep(step, model, holder)`` records, while the target is not reached, that node
    ``holder`` deployed a model after ``step``; the node that holds it (``model`` given) keeps a
    copy. ``evaluated(step, metrics)`` is told every regular evaluation and, at the first one
    that reaches the target, evaluates the kept models in step order from the last evaluation
    below the target until one reaches it, and returns those (step, metrics). Every kept model
    is looked at, not a bisection of them: the crossing found is the first one, whether or not
    the metric rises steadily between evaluations. ``evaluate(model or None, holder)`` is a
    meeting of every node (each passes its copy or None)."""

    def __init__(self, target: Target, evaluate: Callable[[nn.Module | None, int], dict[str, float]]) -> None:
        self.target, self.evaluate = target, evaluate
        self.reached = False
        self.last_step = 0                      # step of the last evaluation below the target
        self.kept: dict[int, tuple[int, list[torch.Tensor] | None]] = {}   # step -> (holder, weights here)
        self._scratch: nn.Module | None = None

    def state(self) -> tuple:
        """What a checkpoint keeps of it: whether the target is reached, the last evaluation below
        it, and the kept models."""
        return self.reached, self.last_step, self.kept

    def restore(self, state: tuple, template: nn.Module) -> None:
        """Back to a checkpoint's ``state``; ``template``: a model of the kept ones' architecture
        (the node's deployed model), which the kept weights are loaded into to evaluate them."""
        self.reached, self.last_step, self.kept = state
        if any(tensors is not None for _, tensors in self.kept.values()):
            self._scratch = copy.deepcopy(template)

    def keep(self, step: int, model: nn.Module | None, holder: int) -> None:
        if self.reached:
            return
        if model is None:
            self.kept[step] = (holder, None)
            return
        if self._scratch is None:
            self._scratch = copy.deepcopy(model)
        self.kept[step] = (holder, [t.detach().clone() for t in model.state_dict().values()])

    def _kept_model(self, step: int) -> nn.Module | None:
        tensors = self.kept[step][1]
        if tensors is None:
            return None   # another node holds it: the evaluation takes its weights
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
        found = []
        for k in range(self.last_step + 1, step):
            if k not in self.kept:
                break
            m = self.evaluate(self._kept_model(k), self.kept[k][0])
            found.append((k, m))
            if self.target.reached(m[self.target.metric]):
                break
        self.kept.clear()
        return found
