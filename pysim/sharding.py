"""How the training set is split across nodes: IID, contiguous, or label-skewed Dirichlet(alpha).

Every policy is seeded and deterministic: all nodes compute the same split
and each keeps its own part. Shards are disjoint and together cover the data
(:func:`shard_indices` returns all of them; a node takes ``[rank]``).

- ``iid``: a seeded permutation dealt round-robin (shard sizes differ by at most 1).
- ``contiguous``: node i gets the i-th of n consecutive blocks, in data order
  (for a text corpus: a node reads its own part of the book).
- ``dirichlet:ALPHA``: for each class, proportions over nodes are drawn from
  Dirichlet(ALPHA, ..., ALPHA) and that class's examples are dealt out in those
  proportions (Hsu et al. 2019). Small ALPHA (0.1) gives each node a few
  classes; large ALPHA (100) approaches IID. Needs labels.

:class:`ShardSampler` draws one node's batches from its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """A data set read by index: ``batch(indices) -> (inputs, targets)``."""

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Sharding:
    """A sharding policy: ``kind`` in {"iid", "contiguous", "dirichlet"}; ``alpha`` for Dirichlet."""

    kind: str = "iid"
    alpha: float = 0.0

    @classmethod
    def parse(cls, spec: str | Sharding) -> Sharding:
        """From ``"iid"``, ``"contiguous"`` or ``"dirichlet:0.5"``."""
        if isinstance(spec, Sharding):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"bad sharding {spec!r}: use 'iid', 'contiguous' or 'dirichlet:ALPHA'")
        kind, _, arg = spec.strip().partition(":")
        if kind in ("iid", "contiguous") and not arg:
            return cls(kind)
        if kind == "dirichlet" and arg:
            try:
                alpha = float(arg)
            except ValueError:
                alpha = float("nan")
            if not (alpha > 0 and np.isfinite(alpha)):
                raise ValueError(f"bad sharding {spec!r}: Dirichlet alpha must be a positive number "
                                 "(e.g. dirichlet:0.5)")
            return cls("dirichlet", alpha)
        raise ValueError(f"bad sharding {spec!r}: use 'iid', 'contiguous' or 'dirichlet:ALPHA' (e.g. dirichlet:0.5)")

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def shard_indices(n: int, nodes: int, sharding: Sharding, seed: int,
                  labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The example indices (int64, sorted) of every node's shard of a dataset of ``n`` examples."""
    if nodes < 1 or n < nodes:
        raise ValueError(f"cannot split {n} examples over {nodes} nodes; each node needs at least one example")
    if sharding.kind == "iid":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return [perm[r::nodes].sort().values for r in range(nodes)]
    if sharding.kind == "contiguous":
        bounds = [n * r // nodes for r in range(nodes + 1)]
        return [torch.arange(bounds[r], bounds[r + 1]) for r in range(nodes)]
    if sharding.kind == "dirichlet":
        if labels is None:
            raise ValueError("dirichlet sharding needs labels; this dataset has none (use iid or contiguous)")
        return _dirichlet(labels, nodes, sharding.alpha, seed)
    raise ValueError(f"unknown sharding {sharding.kind!r}")


def node_shards(n: int, nodes: int, sharding: Sharding, seed: int, batch_size: int,
                labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """:func:`shard_indices`, with a one-line ValueError where a node's shard is smaller than a
    batch (``batch_size`` examples)."""
    shards = shard_indices(n, nodes, sharding, seed, labels)
    small = [r for r, s in enumerate(shards) if len(s) < batch_size]
    if small:
        raise ValueError(f"node {small[0]}'s shard has {len(shards[small[0]])} examples, fewer than the batch "
                         f"size {batch_size}; use a smaller --batch-size or fewer nodes")
    return shards


def _dirichlet(labels: torch.Tensor, nodes: int, alpha: float, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    parts: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        share = rng.dirichlet(np.full(nodes, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
        for r, piece in enumerate(np.split(members, cuts)):
            parts[r].append(piece)
    shards = [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
    empty = [r for r, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ValueError(f"dirichlet:{alpha:g} with seed {seed} left nodes {empty} without data; "
                         "use a larger alpha or fewer nodes")
    return shards


class ShardSampler:
    """Batches from one node's shard, reshuffled (seeded) at every pass over it."""

    def __init__(self, data: BatchSource, shard: torch.Tensor, batch_size: int, seed: int) -> None:
        self.data, self.shard, self.batch_size = data, shard, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = self.shard[torch.randperm(len(shard), generator=self.gen)], 0

    def state(self) -> dict:
        """Where the sampler is (for checkpoints): the pass order, position and generator."""
        return {"order": self.order, "pos": self.pos, "gen": self.gen.get_state()}

    def restore(self, state: dict) -> None:
        self.order, self.pos = state["order"], state["pos"]
        self.gen.set_state(state["gen"])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.shard[torch.randperm(len(self.shard), generator=self.gen)], 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data.batch(idx)
