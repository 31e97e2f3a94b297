"""FedAvg's model averaging (over all nodes or within random islands), and the FedAvg strategy."""

from __future__ import annotations

import copy

import numpy as np
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pysim.strategies.base import CommStep, Strategy


def islands(n: int, size: int, seed: int, round_: int) -> tuple[tuple[int, ...], ...]:
    """The random islands of averaging round ``round_`` (0-based): a permutation of the ``n``
    nodes drawn from ``numpy.random.default_rng([seed, round_])`` (the same on every node), cut
    into ``n // size`` consecutive islands of ``size`` nodes; the ``n % size`` nodes left over
    join the last island (so it has ``size + n % size`` members). ``size >= n``: one island of
    all nodes. Each island lists its nodes in increasing order (its ring order)."""
    if n < 1 or size < 1:
        raise ValueError(f"islands need n >= 1 nodes and a size >= 1, got n={n}, size={size}")
    count = max(n // size, 1)
    perm = [int(v) for v in np.random.default_rng([seed, round_]).permutation(n)]
    cuts = [size * k for k in range(count)] + [n]
    return tuple(tuple(sorted(perm[cuts[k]:cuts[k + 1]])) for k in range(count))


class AverageModels(CommStep):
    """Every ``H`` local steps (and at the last step): replace every node's parameters by
    their mean over nodes (one dense fp32 all-reduce). With ``island_size`` g, each averaging
    round r splits the nodes into random islands of g (:func:`islands` with ``seed`` and r)
    and every node takes the mean over its island only (one grouped all-reduce: each island a
    ring of its own, all at once). Deploys this node's last averaged model; with more than one
    island the nodes' models differ, and a run scores node 0's (its island's average): a model
    a node really holds, not an average over every node that no exchange paid for."""

    def __init__(self, H: int, island_size: int | None = None, seed: int = 0) -> None:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H (local steps per averaging round) must be an integer >= 1, got {H!r}")
        if island_size is not None and (isinstance(island_size, bool) or not isinstance(island_size, int)
                                        or island_size < 1):
            raise ValueError(f"island_size must be an integer >= 1 or None (all nodes), got {island_size!r}")
        self.H, self.island_size, self.seed = H, island_size, seed
        self.label = f"H={H}" if island_size is None else f"H={H} islands of {island_size}"
        self.round = 0   # averaging rounds done

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.averaged = copy.deepcopy(strategy.model)
        self.round = 0

    def groups(self, round_: int) -> tuple[tuple[int, ...], ...] | None:
        """The islands of averaging round ``round_``, or None for one group of all nodes."""
        n = self.strategy.comm.world
        if self.island_size is None or self.island_size >= n:
            return None
        return islands(n, self.island_size, self.seed, round_)

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        with s.compute():
            flat = parameters_to_vector(s.params).detach()
        avg = s.comm.allreduce_mean(flat, groups=self.groups(self.round))
        self.round += 1
        with s.compute():
            vector_to_parameters(avg, s.params)
            # a copy: vector_to_parameters makes the parameters views of avg, which local steps change
            vector_to_parameters(avg.clone(), self.averaged.parameters())

    def eval_model(self):
        return self.averaged


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017) without client sampling: ``H`` local steps of the inner
    optimizer (whose state each node keeps), then every node takes the average model: over
    all nodes, or with ``island_size`` g over its random island of g nodes, drawn anew each
    round from ``seed`` (EXO Gym's FedAvg with islands; n % g leftover nodes join the last
    island)."""

    def __init__(self, H: int = 10, island_size: int | None = None, seed: int = 0) -> None:
        self.comm_steps = (AverageModels(H, island_size, seed),)
