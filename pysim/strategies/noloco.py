"""NoLoCo (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication Training Method for
Large Models").

No collective over all nodes: every H inner steps each node averages with a small
random group (pairs by default), drawn afresh each outer step from the run's seed,
and every group exchanges at the same time (one grouped all-reduce on the clock).
Node i keeps its outer weights phi_i (where its last inner phase began), its local
weights theta_i and an outer momentum m_i. With the means over i's group G_i:

    g_i = mean_{j in G_i} (theta_j - phi_j)        (the group's mean local progress)
    c_i = mean_{j in G_i} phi_j - phi_i            (the pull towards the group's outer weights)
    m_i = beta * m_i + outer_lr * g_i + gamma * c_i
    phi_i = phi_i + m_i;  theta_i = phi_i

as in the reference implementation (one message per node of phi and theta - phi,
averaged within the group; ``gamma`` defaults to ``outer_lr``, as there). Groups:
a seeded permutation of the nodes, member k of group j being permutation entry
j + k * (N / group_size). Nodes never hold the same model; a run scores node 0's.
"""

from __future__ import annotations

import numpy as np
import torch

from pysim.strategies.base import FLOAT32_MAX, CommStep, Strategy, check_outer_step, check_seed, real_in, split_like


def random_groups(nodes: int, size: int, seed: int, step: int) -> list[list[int]]:
    """The groups of outer step ``step``: a permutation of the nodes drawn from (seed, step), cut
    into ``nodes // size`` groups by striding (entry k of the permutation goes to group k mod that)."""
    if nodes % size:
        raise ValueError(f"NoLoCo groups of {size} need a number of nodes divisible by {size}, got {nodes}")
    perm = np.random.default_rng([seed, step]).permutation(nodes)
    count = nodes // size
    return [sorted(int(v) for v in perm[j::count]) for j in range(count)]


class GossipOuterStep(CommStep):
    """The outer step of the module docstring."""

    def __init__(self, H: int, group_size: int, outer_lr: float, outer_momentum: float, gamma: float | None,
                 seed: int | None) -> None:
        for name, v, low in (("H (local steps per outer step)", H, 1), ("group_size", group_size, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        check_outer_step(outer_lr, outer_momentum)
        if gamma is not None:
            real_in(gamma, "gamma (pull towards the group)", 0, FLOAT32_MAX, low_closed=True, high_closed=True)
        check_seed(seed, "NoLoCo")
        self.H, self.size, self.outer_lr, self.beta = H, group_size, outer_lr, outer_momentum
        self.gamma = outer_lr if gamma is None else gamma
        self.seed = seed
        self.label = f"H={H} groups of {group_size} outer {outer_lr}/{outer_momentum}" + \
            (f" gamma {gamma:g}" if gamma is not None else "")

    def check(self, nodes: int, model, optimizer) -> None:
        if nodes % self.size:
            raise ValueError(f"NoLoCo groups of {self.size} need a number of nodes divisible by {self.size}, "
                             f"got {nodes}")

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.outer = [p.detach().clone() for p in strategy.params]     # phi_i
        self.momentum = [torch.zeros_like(p) for p in strategy.params]
        self.group_seed = strategy.seeded(self.seed)

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        with s.compute(reuse=f"noloco gather {s.param_shapes}"):
            phi = torch.cat([f.reshape(-1) for f in self.outer])
            progress = torch.cat([(p.detach() - f).reshape(-1) for p, f in zip(s.params, self.outer, strict=True)])
        groups = random_groups(s.comm.world, self.size, self.group_seed, step)
        mean = s.comm.allreduce_mean(torch.cat([phi, progress]), groups=groups)
        n = phi.numel()
        with s.compute(reuse=f"noloco outer step {s.param_shapes}"), torch.no_grad():
            g_mean, phi_mean = mean[n:], mean[:n]
            for f, m, p, g, c in zip(self.outer, self.momentum, s.params, split_like(g_mean, self.outer),
                                     split_like(phi_mean, self.outer), strict=True):
                m.mul_(self.beta).add_(g, alpha=self.outer_lr).add_(c - f, alpha=self.gamma)
                f.add_(m)
                p.copy_(f)


class NoLoCo(Strategy):
    """NoLoCo: gossip averaging within random groups and a modified Nesterov outer step, no
    all-reduce (see the module docstring). Defaults: pairs, DiLoCo's outer lr and momentum."""

    def __init__(self, H: int = 50, group_size: int = 2, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 gamma: float | None = None, seed: int | None = None) -> None:
        self.comm_steps = (GossipOuterStep(H, group_size, outer_lr, outer_momentum, gamma, seed),)
