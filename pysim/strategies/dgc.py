"""DGC: Deep Gradient Compression (Lin et al. 2018, Algorithm 4).

Per step, on every node, with N nodes:

1. ``clip``: local gradient clipping: g *= min(1, clip_norm * sqrt(N) / ||g||). The paper
   clips each node's share of the global gradient, its G^k = (1/(N b)) sum of the batch's
   gradients, at the global threshold times N^-1/2 (section 3.2: the share of N nodes with
   identical gradient distributions); g, the node's mean gradient, is N G^k, so its
   threshold is clip_norm * N^-1/2 * N. ``clip_norm`` is the threshold on the global (mean)
   gradient, as in one-node training;
2. momentum correction: u = momentum*u + g; v = v + u;
3. per tensor, select the ``density(step)`` fraction of entries of v with the largest |v|
   (at least one per tensor); all-gather every node's selection as one top-k packet and
   average;
4. momentum factor masking: u = v = 0 where this node sent;
5. the update is plain SGD on the average, w -= lr * avg (Algorithm 4's last line: the
   momentum lives in u, so no optimizer adds another), with DGC's own ``lr`` times the run's
   warm-up/cosine schedule factor. Weight decay (Algorithm 4 has none) is the authors'
   optimizer's: local, never sent, with momentum of its own, b = momentum * b + wd * w and
   w -= lr * (avg + b). ``optimizer="inner"`` hands the average to the workload's
   optimizer instead (AdamW in the built-in workloads: Adam's normalisation on top of DGC's
   momentum), a labelled variant.

Steps 2-4 apply to the tensors of two or more dimensions (weight matrices, convolution
kernels), as in the authors' code (``train.py`` hands the compressor the parameters with
``dim() > 1``). Vectors (biases, norm scales) cross dense: the mean of their clipped
gradients is stepped with momentum SGD, u = momentum * u + avg, w -= lr * u (the authors'
dense path; top-k with masking would send one entry of a 10-entry bias per step and, at
density 1, drop its momentum altogether). The authors all-reduce them; here their fp32
packet rides in the same all-gather bundle as the top-k packet, one collective per step (a
ring all-reduce of a few hundred values of its own would add 2(N-1) link latencies to
every step; the all-gather sends them to N-1 nodes instead of 2(N-1)/N, a few KB).

Warm-up: the density starts at 25% and is divided by 4 every ``warmup_steps / 4`` steps
(sparsity 75%, 93.75%, 98.44%, 99.61%), then stays at ``k`` (99.9% sparsity for the
paper's k = 0.001); a stage whose density would be below ``k`` uses ``k``. Nodes stay
identical.

Defaults for pysim's MNIST study (2 nodes, 600 steps of 64): k = 0.01 (the paper's 0.001
ends lower in short runs), lr = 0.2 (see bench/RESULTS.md for the lr and k tried).
"""

from __future__ import annotations

import math

import torch

from pysim.compress import DenseCodec, TopKCodec
from pysim.strategies.base import FLOAT32_MAX, CommStep, OwnUpdate, real_in

WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.00390625)


def dgc_density(step: int, k: float, warmup_steps: int) -> float:
    """The fraction of entries sent at ``step`` (0-based): the warm-up stages, then ``k``."""
    if step < warmup_steps:
        return max(k, WARMUP_DENSITIES[step * len(WARMUP_DENSITIES) // warmup_steps])
    return k


class MomentumCorrectedTopK(CommStep):
    """Steps 1-4 of the module docstring; leaves the average in every ``p.grad``."""

    def __init__(self, k: float, momentum: float, clip_norm: float | None, warmup_steps: int) -> None:
        if isinstance(k, bool) or not isinstance(k, float) or not 0 < k <= 1:
            raise ValueError(f"DGC k is the final fraction of entries sent, a float in (0, 1]; got {k!r}")
        real_in(momentum, "DGC momentum", 0, 1, low_closed=True)
        if clip_norm is not None:
            real_in(clip_norm, "DGC clip_norm (None: no clipping)", 0, math.inf)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"DGC warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.k, self.momentum, self.clip_norm, self.warmup_steps = k, momentum, clip_norm, warmup_steps
        self.label = f"k={k:g} warmup={warmup_steps}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.u = [torch.zeros_like(p) for p in strategy.params]
        self.v = [torch.zeros_like(p) for p in strategy.params]
        self.sparse = [p.dim() > 1 for p in strategy.params]

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        density = dgc_density(step, self.k, self.warmup_steps)
        # the same work at every step of one density (each tensor's count n follows from it)
        work = f"dgc density {density!r} {s.param_shapes}"
        with s.compute(reuse=work if all(p.grad is not None for p in s.params) else None):
            grads = self._clipped(s.grads())
            selected, count = self._select(grads, density)
            vectors = [g.reshape(-1) for g, sparse in zip(grads, self.sparse, strict=True) if not sparse]
            dense = torch.cat(vectors) if vectors else None
        tensors, codecs = {}, {}
        if count:
            tensors["dgc"], codecs["dgc"] = selected, TopKCodec(count)
        if dense is not None:
            tensors["dgc vectors"], codecs["dgc vectors"] = dense, DenseCodec()
        avg = s.comm.allgather_mean_many(tensors, codecs, step)
        with s.compute(reuse=f"dgc vector momentum {s.param_shapes}"):
            s.set_grads(self._average(avg.get("dgc"), avg.get("dgc vectors")), copy=False)

    def _clipped(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Step 1: local clipping at clip_norm * sqrt(N)."""
        if self.clip_norm is not None:
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            scale = min(1.0, self.clip_norm * math.sqrt(self.strategy.comm.world) / (float(norm) + 1e-12))
            grads = [g * scale for g in grads]
        return grads

    def _select(self, grads: list[torch.Tensor], density: float) -> tuple[torch.Tensor, int]:
        """Steps 2-4 on the sparsified tensors: their selections as one vector, and the entries sent."""
        sent, count = [], 0
        for g, u, v, sparse in zip(grads, self.u, self.v, self.sparse, strict=True):
            if not sparse:
                continue
            u.mul_(self.momentum).add_(g)
            v.add_(u)
            n = max(1, round(density * v.numel()))
            idx = v.reshape(-1).abs().topk(n).indices
            flat = torch.zeros(v.numel())
            flat[idx] = v.reshape(-1)[idx]
            u.view(-1)[idx] = 0.0
            v.view(-1)[idx] = 0.0
            sent.append(flat)
            count += n
        return (torch.cat(sent) if sent else torch.zeros(0)), count

    def _average(self, sparse_avg: torch.Tensor | None, dense_avg: torch.Tensor | None) -> torch.Tensor:
        """The update direction of every tensor, in parameter order: a sparsified tensor's
        average as it came; a vector's, u = momentum * u + average (momentum SGD on it)."""
        pieces, at_sparse, at_dense = [], 0, 0
        for u, sparse in zip(self.u, self.sparse, strict=True):
            n = u.numel()
            if sparse:
                pieces.append(sparse_avg[at_sparse:at_sparse + n])
                at_sparse += n
            else:
                u.view(-1).mul_(self.momentum).add_(dense_avg[at_dense:at_dense + n])
                pieces.append(u.reshape(-1).clone())
                at_dense += n
        return torch.cat(pieces)


class DGC(OwnUpdate):
    """Deep Gradient Compression: momentum correction, local clipping, momentum factor masking,
    a sparsity warm-up, and plain SGD on the average with DGC's own ``lr`` (times the run's
    warm-up/cosine schedule; the run's ``--lr`` moves only the workload's optimizer), as in Lin
    et al.'s Algorithm 4 (see module doc). ``k`` is the final fraction of entries sent.
    ``optimizer="inner"``: the workload's optimizer steps on the average instead (a variant,
    labelled)."""

    # 1: the paper's clipping threshold, clip_norm * sqrt(N) (clip_norm / sqrt(N) before);
    # 2: vectors cross dense, with momentum SGD on their mean (top-k like the matrices before);
    # 3: weight decay local, with its own momentum (added to the sent gradient before)
    revision = 3

    def __init__(self, k: float = 0.01, momentum: float = 0.9, lr: float = 0.2, clip_norm: float | None = 1.0,
                 warmup_steps: int = 100, weight_decay: float = 0.0, optimizer: str = "sgd") -> None:
        self.choose_optimizer(optimizer, own=("lr", "weight_decay"))
        real_in(lr, "DGC lr", 0, FLOAT32_MAX, high_closed=True)
        real_in(weight_decay, "DGC weight_decay", 0, FLOAT32_MAX, low_closed=True, high_closed=True)
        step = MomentumCorrectedTopK(k, momentum, clip_norm, warmup_steps)
        if optimizer == "inner":
            step.label += " +inner optimizer"
        elif lr != 0.2:
            step.label += f" lr={lr:g}"
        if weight_decay:
            step.label += f" wd={weight_decay:g}"
        self.comm_steps = (step,)
        self.dgc_lr, self.weight_decay, self.momentum = lr, weight_decay, momentum
        self.decay: list[torch.Tensor] | None = None   # the weight decay's momentum, one buffer per parameter

    def own_update(self, factor: float) -> None:
        """Algorithm 4's update, w -= lr_t * avg; with weight decay, the authors' optimizer's
        b = momentum * b + wd * w, w -= lr_t * (avg + b)."""
        if not self.weight_decay:
            for p in self.params:
                p.sub_(p.grad, alpha=self.dgc_lr * factor)
            return
        if self.decay is None:
            self.decay = [torch.zeros_like(p) for p in self.params]
        for p, b in zip(self.params, self.decay, strict=True):
            b.mul_(self.momentum).add_(p, alpha=self.weight_decay)
            p.sub_(p.grad + b, alpha=self.dgc_lr * factor)
