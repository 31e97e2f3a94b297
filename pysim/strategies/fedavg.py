"""FedAvg's model averaging (over all nodes, a sampled cohort, or random islands), and the FedAvg strategy."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pysim.strategies.base import CommStep, Strategy, check_seed


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


def cohort(n: int, k: int, seed: int, round_: int) -> tuple[int, ...]:
    """The ``k`` clients of ``n`` that train in round ``round_`` (0-based), drawn without
    replacement from ``numpy.random.default_rng([seed, round_, 1])``, in increasing order."""
    if not 1 <= k <= n:
        raise ValueError(f"a cohort of {k} clients out of {n}: give 1 to {n} clients per round")
    if k == n:
        return tuple(range(n))
    return tuple(sorted(int(v) for v in np.random.default_rng([seed, round_, 1]).choice(n, size=k, replace=False)))


class AverageModels(CommStep):
    """FedAvg's rounds of ``H`` local steps, or of ``epochs`` passes over each client's data
    (the last round ends with the run's last step).

    - ``epochs`` E (McMahan et al.'s E): client k takes u_k = E x floor(n_k / B) local steps a
      round (B the run's batch size, n_k its training examples; a pass over a shard draws its
      full batches), so a client with more data trains more steps; the round lasts the
      largest u_k steps, and a client done earlier waits for the average (no compute, no
      bytes). With equal shards every u_k is the same and E epochs are H = u_k steps.

    - Every node, or with ``clients_per_round`` (a count, or a fraction of the nodes) a cohort
      drawn anew each round (:func:`cohort`, seeded), trains; the others sit the round out
      (no compute, no bytes). When a round ends, the next cohort's members that do not hold
      the new global model get it: one grouped broadcast from the lowest-ranked node that does
      (a dense fp32 packet to each, charged). Every node starts from the same initial model.
    - At the round's end the round's nodes average their models, each weighted by its number
      of training examples n_k over the round's total (McMahan et al. 2017; ``weighted=False``:
      equally), in one dense fp32 all-reduce among them (every member sends its model scaled
      by (members x n_k / total), so the mean is the weighted average).
    - With ``island_size`` g (EXO Gym's islands; all nodes train), each round splits the nodes
      into random islands of g (:func:`islands`) that average within themselves at once (one
      grouped all-reduce), weighted within the island.

    Deploys the last global model (with islands: the node's island's), as held by the node
    :meth:`deployer` names: the lowest-ranked node of the last cohort (node 0 when every node
    trains)."""

    def __init__(self, H: int | None = 10, clients_per_round: int | float | None = None,
                 island_size: int | None = None, seed: int | None = None, weighted: bool = True,
                 epochs: int | None = None) -> None:
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"epochs (passes over each client's data per round) must be an integer >= 1, "
                                 f"got {epochs!r}")
            if H is not None:
                raise ValueError("FedAvg takes H (local steps per round) or epochs (passes over each client's "
                                 "data per round), not both")
        elif isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H (local steps per averaging round) must be an integer >= 1, got {H!r}")
        if island_size is not None and (isinstance(island_size, bool) or not isinstance(island_size, int)
                                        or island_size < 1):
            raise ValueError(f"island_size must be an integer >= 1 or None (all nodes), got {island_size!r}")
        if clients_per_round is not None:
            c = clients_per_round
            fraction = isinstance(c, float)
            if isinstance(c, bool) or not isinstance(c, int | float) or not (0 < c <= 1 if fraction else c >= 1):
                raise ValueError(f"clients_per_round must be a count >= 1 or a fraction in (0, 1], got {c!r}")
            if island_size is not None:
                raise ValueError("FedAvg takes clients_per_round or island_size, not both")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted must be True or False, got {weighted!r}")
        check_seed(seed, "FedAvg")
        self.H, self.clients_per_round, self.island_size = H, clients_per_round, island_size
        self.seed, self.weighted, self.epochs = seed, weighted, epochs
        parts = [f"H={H}" if epochs is None else f"E={epochs}"]
        if clients_per_round is not None:
            c = clients_per_round   # a count, or a fraction of the nodes (1 client is not 1.0 of them)
            per_round = f"{c} client/round" if c == 1 else f"{c} clients/round"
            parts.append(f"{100 * c:g}% of clients/round" if isinstance(c, float) else per_round)
        if island_size is not None:
            parts.append(f"islands of {island_size}")
        if not weighted:
            parts.append("unweighted")
        self.label = " ".join(parts)

    def clients(self, nodes: int) -> int:
        """How many clients train in each round of a run on ``nodes`` nodes: a count as given, a
        fraction C of the nodes as McMahan et al.'s max(floor(C x nodes), 1), with C read as the
        decimal it was written as (0.29 of 100 nodes is 29, though the float 0.29 x 100 is
        28.999999999999996)."""
        c = self.clients_per_round
        if c is None:
            return nodes
        return max(1, math.floor(Fraction(repr(c)) * nodes)) if isinstance(c, float) else c

    def check(self, nodes: int, model, optimizer) -> None:
        if self.clients(nodes) > nodes:
            raise ValueError(f"FedAvg: {self.clients(nodes)} clients per round but the run has {nodes} nodes; give "
                             f"clients_per_round={nodes} or fewer, or a fraction such as 0.5")

    def setup(self, strategy) -> None:
        super().setup(strategy)
        n = strategy.comm.world
        self.n, self.k = n, self.clients(n)
        self.local_steps = [self.H] * n if self.epochs is None else self.epoch_steps(strategy)
        self.H = max(self.local_steps)   # the round's length in steps
        self.rng_seed = strategy.seeded(self.seed)
        self.averaged = copy.deepcopy(strategy.model)
        self.holders: tuple[int, ...] = tuple(range(n))   # the nodes holding the latest global model

    def epoch_steps(self, strategy) -> list[int]:
        """Each client's local steps a round, E x floor(n_k / B)."""
        b = strategy.batch_size
        if b is None or min(strategy.examples) < b:
            raise ValueError(f"FedAvg(epochs={self.epochs}) needs the run's batch size and every client's "
                             f"number of training examples, at least a batch each (got batch size {b}, "
                             f"the smallest client {min(strategy.examples)} examples)")
        return [self.epochs * (n_k // b) for n_k in strategy.examples]

    def round_of(self, step: int) -> int:
        return step // self.H

    def members(self, round_: int) -> tuple[int, ...]:
        """The nodes that train in round ``round_``."""
        return cohort(self.n, self.k, self.rng_seed, round_)

    def groups(self, round_: int) -> tuple[tuple[int, ...], ...] | None:
        """The groups that average at the end of ``round_`` (None: all nodes, one group)."""
        if self.island_size is not None:
            return None if self.island_size >= self.n else islands(self.n, self.island_size, self.rng_seed, round_)
        members = self.members(round_)
        if len(members) == self.n:
            return None
        return (members, *((m,) for m in range(self.n) if m not in members))

    def trains(self, step: int) -> bool:
        rank = self.strategy.comm.rank
        return rank in self.members(self.round_of(step)) and step % self.H < self.local_steps[rank]

    def deployer(self, step: int) -> int:
        ends = (step + 1) % self.H == 0 or step + 1 == self.strategy.total_steps
        round_ = self.round_of(step) if ends else self.round_of(step) - 1
        return 0 if round_ < 0 or self.k == self.n else min(self.members(round_))

    def handover(self, next_round: int) -> None:
        """After a round: the next cohort's members that do not hold the new global model get it
        from the lowest-ranked node that does (one grouped broadcast; no collective if none)."""
        missing = [m for m in self.members(next_round) if m not in self.holders]
        if not missing:
            return
        root = min(self.holders)
        groups = ((root, *missing), *((m,) for m in range(self.n) if m != root and m not in missing))
        s = self.strategy
        with s.compute(reuse=f"fedavg handover send {s.param_shapes}"):
            flat = parameters_to_vector(self.averaged.parameters()).detach()
        got = s.comm.broadcast(flat, groups)
        if s.comm.rank in missing:
            with s.compute(reuse=f"fedavg handover take {s.param_shapes}"):
                vector_to_parameters(got.clone(), s.params)
                vector_to_parameters(got, self.averaged.parameters())
        self.holders = tuple(sorted(set(self.holders) | set(missing)))

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        round_ = self.round_of(step)
        groups = self.groups(round_)
        mine = next((g for g in groups if s.comm.rank in g), None) if groups is not None else tuple(range(self.n))
        weights = [s.examples[m] if self.weighted else 1 for m in mine]
        scale = len(mine) * weights[mine.index(s.comm.rank)] / sum(weights)
        with s.compute(reuse=f"fedavg send {s.param_shapes}, scaled {scale != 1.0}"):
            flat = parameters_to_vector(s.params).detach()
            if scale != 1.0:
                flat = flat * scale
        avg = s.comm.allreduce_mean(flat, groups=groups)
        took_part = self.island_size is not None or s.comm.rank in self.members(round_)
        if self.island_size is None:
            self.holders = self.members(round_)
        if took_part:
            with s.compute(reuse=f"fedavg take {s.param_shapes}"):
                vector_to_parameters(avg, s.params)
                # a copy: vector_to_parameters makes the parameters views of avg, which local steps change
                vector_to_parameters(avg.clone(), self.averaged.parameters())
        if self.k < self.n and not last:
            self.handover(round_ + 1)

    def eval_model(self):
        return self.averaged


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): rounds of ``H`` local steps of the inner optimizer (whose
    state each node keeps), or with ``epochs`` E of E passes over each client's data (the
    paper's E; a client with more data takes more steps), then the round's nodes average
    their models weighted by their training examples. ``clients_per_round``: a cohort of that
    many clients (or that fraction of the nodes), drawn each round from the run's seed
    (``seed`` overrides it), trains and averages while the others sit the round out;
    ``island_size``: every node trains and averages within random islands of that size (EXO
    Gym's islands). ``weighted=False``: plain averages. See :class:`AverageModels`."""

    def __init__(self, H: int | None = None, clients_per_round: int | float | None = None,
                 island_size: int | None = None, seed: int | None = None, weighted: bool = True,
                 epochs: int | None = None) -> None:
        H = 10 if H is None and epochs is None else H
        self.comm_steps = (AverageModels(H, clients_per_round, island_size, seed, weighted, epochs),)
