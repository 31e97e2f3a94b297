"""DeMo (Peng, Quesnelle & Kingma 2024, "Decoupled Momentum Optimization").

Per step, on every node, for each parameter (viewed as a matrix ``shape[0] x rest``,
or a vector):

1. ``accumulate``: p *= 1 - lr*weight_decay; m = beta*m + lr*g (momentum scaled by lr,
   as in the authors' optimizer);
2. ``compress``: cut m into chunks (per dimension, the largest divisor of the size that
   is <= ``chunk``), take the orthonormal DCT-II of each chunk (2-D chunks for matrices)
   and keep the ``topk`` coefficients of largest magnitude per chunk;
3. ``decouple``: remove what is sent from m: m -= IDCT(kept coefficients);
4. all-gather every node's kept coefficients as one top-k packet (values + Elias-Fano
   indices) and average each coefficient over the nodes that sent it (the reference
   implementation's ``scatter_reduce(..., reduce="mean", include_self=False)``: a
   coefficient two of eight nodes kept is the mean of those two, not their sum over eight);
5. ``decompress``: q = IDCT(mean coefficients); p -= lr * sign(q).

The paper's defaults are beta = 0.999, chunk = 64, topk = 32. Nodes stay identical.
The trainer's optimizer provides the learning rate (and its scheduler steps); its
own update rule is replaced by the sign step above.
"""

from __future__ import annotations

import math

import torch

from pysim.compress import TopKCodec, sparse_entries
from pysim.strategies.base import FLOAT32_MAX, CommStep, Strategy, real_in
from pysim.strategies.chunks import Chunks, keep_topk_per_chunk


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): coefficients = D @ x, and x = D.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


class ChunkedDCT:
    """DCT-II of a tensor in chunks (:class:`pysim.strategies.chunks.Chunks`): a matrix in
    (a x b) blocks, each transformed in 2-D, a vector in runs of c."""

    def __init__(self, shape: torch.Size, target: int) -> None:
        self.chunks = Chunks(shape, target)
        self.shape = self.chunks.shape
        self.mats = [dct_matrix(c) for c in self.chunks.sides]

    @property
    def chunk_numel(self) -> int:
        return self.chunks.chunk_numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients, shaped (number of chunks, coefficients per chunk)."""
        blocks = self.chunks.tiles(x)
        if len(self.mats) == 1:
            return blocks @ self.mats[0].T
        da, db = self.mats
        return (da @ blocks @ db.T).reshape(-1, self.chunk_numel)

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        if len(self.mats) == 1:
            (c,), (d,) = self.chunks.sides, self.mats
            return self.chunks.untile(coeffs.reshape(-1, c) @ d)
        (a, b), (da, db) = self.chunks.sides, self.mats
        return self.chunks.untile(da.T @ coeffs.reshape(-1, a, b) @ db)


class DecoupledMomentum(CommStep):
    """Steps 1-5 of the module docstring; leaves q in every ``p.grad`` for the sign step."""

    def __init__(self, beta: float, chunk: int, topk: int, weight_decay: float | None) -> None:
        real_in(beta, "DeMo beta (momentum decay)", 0, 1, low_closed=True)
        for arg, v in (("chunk", chunk), ("topk", topk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DeMo {arg} must be an integer >= 1, got {v!r}")
        if weight_decay is not None:
            real_in(weight_decay, "DeMo weight_decay (None: the optimizer's)", 0, FLOAT32_MAX, low_closed=True,
                    high_closed=True)
        self.beta, self.chunk, self.topk, self.weight_decay = beta, chunk, topk, weight_decay
        self.label = f"top{topk}/chunk{chunk} beta={beta:g}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.momentum = [torch.zeros_like(p) for p in strategy.params]
        self.dcts = [ChunkedDCT(p.shape, self.chunk) for p in strategy.params]
        self.count = sum(min(self.topk, d.chunk_numel) * (p.numel() // d.chunk_numel)
                         for p, d in zip(strategy.params, self.dcts, strict=True))
        # every block below does the same work at every step (fixed shapes, k and number of
        # nodes): counted twice, then reused (counting costs more real time than the work)
        self._work = f"{strategy.param_shapes}, chunk {self.chunk}, top {self.topk}"

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        lr = s.lr()
        wd = s.optimizer.param_groups[0].get("weight_decay", 0.0) if self.weight_decay is None else self.weight_decay
        every_grad = all(p.grad is not None for p in s.params)   # else zeros stand in (other work)
        with s.compute(reuse=f"demo compress {self._work}" if every_grad else None):
            sent = []
            for p, g, m, dct in zip(s.params, s.grads(), self.momentum, self.dcts, strict=True):
                with torch.no_grad():
                    p.mul_(1 - lr * wd)
                m.mul_(self.beta).add_(g, alpha=lr)
                kept = keep_topk_per_chunk(dct.encode(m), self.topk)
                m.sub_(dct.decode(kept))
                sent.append(kept.reshape(-1))
            flat = torch.cat(sent)
        avg = self.mean_over_senders(flat, step)
        with s.compute(reuse=f"demo decompress {self._work}"):
            offset = 0
            for p, dct in zip(s.params, self.dcts, strict=True):
                n = p.numel()
                p.grad = dct.decode(avg[offset:offset + n])
                offset += n


    def mean_over_senders(self, kept: torch.Tensor, step: int) -> torch.Tensor:
        """Every node's kept coefficients (``kept``: zeros elsewhere) as one top-k packet of the
        ``count`` kept positions, all-gathered; each coefficient's mean over the nodes whose packet
        holds it (zero where none does)."""
        s = self.strategy
        with s.compute(reuse=f"demo pack {self._work}"):
            packet = TopKCodec(max(1, min(self.count, kept.numel()))).pack(kept, key="demo", step=step)
        packets = s.comm.allgather(packet)
        with s.compute(reuse=f"demo mean {self._work}, {len(packets)} packets"):
            sums = torch.zeros(kept.numel())
            senders = torch.zeros(kept.numel())
            for p in packets:
                idx, val = sparse_entries(p, expect_shape=kept.shape)
                sums.index_add_(0, idx, val)
                senders.index_add_(0, idx, torch.ones(len(idx)))
            return torch.where(senders > 0, sums / senders.clamp_min(1), sums)


class DeMo(Strategy):
    """DeMo: decoupled momentum, top-k DCT coefficients exchanged, sign-SGD step (see module doc).
    ``weight_decay`` None takes the inner optimizer's."""

    def __init__(self, beta: float = 0.999, chunk: int = 64, topk: int = 32,
                 weight_decay: float | None = None) -> None:
        self.comm_steps = (DecoupledMomentum(beta, chunk, topk, weight_decay),)

    def local_step(self) -> None:
        """Sign-SGD with the inner optimizer's learning rate; its scheduler steps."""
        lr = self.lr()
        with self.compute(reuse="demo sign step"), torch.no_grad():
            for p in self.params:
                p.sub_(p.grad.sign(), alpha=lr)
            self.step_schedule()
