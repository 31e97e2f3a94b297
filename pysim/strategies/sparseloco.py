"""SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM Pre-training with SparseLoCo").

DiLoCo whose outer momentum is replaced by error feedback, with the pseudo-gradients
sent as a few percent of their entries in 2 bits each. Every H inner steps (and
after the last), on every node:

1. delta = theta_global - theta_local (the pseudo-gradient);
2. e = beta * e + delta (the error-feedback accumulator, decayed: it plays the
   outer momentum's part);
3. each parameter's e is cut into chunks as DeMo cuts its momentum
   (:mod:`pysim.strategies.chunks`: a matrix, or a tensor viewed as ``shape[0]`` x
   the rest, into tiles of up to ``tile`` x ``tile``, a vector into runs of up to
   ``tile``; each side the largest divisor of its dimension that fits), as the
   authors' code cuts it, and the ``topk`` entries of largest |e| of each chunk are
   kept (all of a chunk of ``topk`` entries or fewer); they travel as one top-k
   packet with 2-bit values (:class:`pysim.compress.TopKCodec` ``int2``: four levels
   per 64 values), and e -= what the packet decodes to (its quantisation error stays
   in e too);
4. the packets are all-gathered; delta_avg = (1/N) * the sum of the decoded packets;
5. theta_global -= outer_lr * delta_avg, and every node restarts from it.

There is no outer momentum: the global step is plain averaged descent. Every node
applies the same average, so the nodes stay identical. Defaults: 64 x 64 tiles
with 64 kept (1.6% of a full tile, in the paper's 1-3%), beta = 0.95, outer_lr = 1,
H = 30. (Before revision 1 the chunks were runs of 4096 consecutive entries of the
flattened tensor, ``chunk=4096``: a strip of rows rather than a tile.)
"""

from __future__ import annotations

import copy

import torch

from pysim.compress import TopKCodec
from pysim.strategies.base import FLOAT32_MAX, CommStep, Strategy, real_in, split_like
from pysim.strategies.chunks import Chunks, keep_topk_per_chunk


class SparseOuterStep(CommStep):
    """Steps 1-5 of the module docstring."""

    def __init__(self, H: int, tile: int, topk: int, beta: float, outer_lr: float) -> None:
        for name, v in (("H (local steps per outer step)", H), ("tile (a chunk's side)", tile), ("topk", topk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        real_in(beta, "beta (error-feedback decay)", 0, 1, low_closed=True)
        real_in(outer_lr, "outer_lr", 0, FLOAT32_MAX, high_closed=True)
        self.H, self.tile, self.topk, self.beta, self.outer_lr = H, tile, topk, beta, outer_lr
        self.label = f"H={H} top{topk}/{tile}x{tile} int2 EF {beta:g} outer {outer_lr:g}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.global_model = copy.deepcopy(strategy.model)
        self.global_params = list(self.global_model.parameters())
        self.error = [torch.zeros_like(p) for p in strategy.params]
        self.numel = sum(p.numel() for p in strategy.params)
        self.chunks = [Chunks(p.shape, self.tile) for p in strategy.params]
        self.codec = TopKCodec(sum(c.kept(self.topk) for c in self.chunks), "int2")
        # each block below: the same work at every sync (shapes, chunks and the codec's fixed packet)
        self._work = f"{strategy.param_shapes}, tile {self.tile}, top {self.topk}"

    def after_local_step(self, step: int, last: bool) -> None:
        if (step + 1) % self.H and not last:
            return
        s = self.strategy
        with s.compute(reuse=f"sparseloco compress {self._work}"):
            kept = []
            for e, g, p, chunks in zip(self.error, self.global_params, s.params, self.chunks, strict=True):
                e.mul_(self.beta).add_(g.detach() - p.detach())
                kept.append(chunks.untile(keep_topk_per_chunk(chunks.split(e), self.topk)).reshape(-1))
            packet = self.codec.pack(torch.cat(kept), key="sparseloco", step=step)
            sent = self.codec.unpack(packet, expect_shape=(self.numel,))
            for e, d in zip(self.error, split_like(sent, self.error), strict=True):
                e.sub_(d)
        packets = s.comm.allgather(packet)
        with s.compute(reuse=f"sparseloco outer step {self._work}, {len(packets)} packets"):
            total = torch.zeros(self.numel)
            for q in packets:
                total += self.codec.unpack(q, expect_shape=(self.numel,))
            with torch.no_grad():
                for g, p, d in zip(self.global_params, s.params, split_like(total, self.global_params), strict=True):
                    g.sub_(d, alpha=self.outer_lr / len(packets))
                    p.copy_(g)

    def eval_model(self):
        return self.global_model


class SparseLoCo(Strategy):
    """SparseLoCo: chunk-wise top-k pseudo-gradients in 2 bits, error feedback for outer momentum
    (see the module docstring). ``tile``: a chunk's side, at most; ``topk``: entries kept per chunk."""

    revision = 1   # 1: chunks are tiles of up to tile x tile (runs of chunk=4096 flat entries before)

    def __init__(self, H: int = 30, tile: int = 64, topk: int = 64, beta: float = 0.95,
                 outer_lr: float = 1.0) -> None:
        self.comm_steps = (SparseOuterStep(H, tile, topk, beta, outer_lr),)
