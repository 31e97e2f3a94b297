"""Reducers: how a strategy averages named tensors over the nodes, chosen from a codec spec.

``make_reducer(spec)`` picks the collective from the codec, so strategies never
branch on codec types:

- ``dense``, ``dense:fp16``, ``dense:bf16`` (any summable codec): one ring
  all-reduce of all tensors flattened, ``2(n-1)/n * S`` bytes per node. A lossy
  dense codec gets *local* error feedback: ``c = x + r``; ``r = c - unpack(pack(c))``.
- ``powersgd:R``: PowerSGD (Vogels et al. 2019): a Q shared by all nodes, P and
  then Q all-reduced, error feedback, warm start.
- anything else (``topk:0.01``, ``randomk:0.05``, ``lowrank:R``...): each node
  packs every tensor (with error feedback when lossy) and the packets are
  all-gathered; ``lowrank:R`` is one power iteration *per node* whose factors
  are gathered (unlike ``powersgd:R``).
"""

from __future__ import annotations

import torch

from pysim.comm import Comm
from pysim.compress import (
    Codec,
    DenseCodec,
    ErrorFeedback,
    LowRankCodec,
    TopKCodec,
    get_codec,
    lowrank_mq,
    lowrank_mtp,
    orthonormalize,
)
from pysim.strategies.base import check_seed, split_like


def summable(codec: Codec) -> bool:
    """Whether packets of ``codec`` can be summed on the wire (all-reduce) rather than gathered."""
    return isinstance(codec, DenseCodec) or bool(getattr(codec, "summable", False))


class Reducer:
    """``mean(tensors, step)``: every node's tensors in, their mean over nodes out (same names
    and shapes). Bound to a node's comm by ``setup``. ``label`` names it, e.g. "topk:0.01+EF"."""

    label = ""
    #: True where ``mean`` returns new tensors that nothing else holds or writes (views of one
    #: new tensor count): the caller may keep them as they are, without a copy
    owned_result: bool = False

    def setup(self, comm: Comm, seed: int = 0) -> None:
        """Binds the reducer to a node's comm; ``seed``: the run's (for a reducer's own randomness)."""
        self.comm = comm
        self.run_seed = seed

    def mean(self, tensors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def local_error_feedback(codec: Codec, x: torch.Tensor, residual: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Error feedback for a lossy summable codec, kept on the node: returns (c, r) with
    c = x + residual (what goes into the all-reduce) and r = c - unpack(pack(c)) (the next
    residual). ``residual`` None: none yet."""
    c = x.float() + (residual if residual is not None else 0.0)
    return c, c - codec.unpack(codec.pack(c)).float()


class AllReduce(Reducer):
    """All tensors flattened into one all-reduce of a summable codec; local error feedback if lossy.
    Its outputs are views of the collective's result, a new tensor per node (``owned_result``)."""

    owned_result = True

    def __init__(self, codec: Codec, label: str = "dense") -> None:
        self.codec, self.label = codec, label
        self.residual: torch.Tensor | None = None

    def mean(self, tensors, step):
        flat = torch.cat([t.reshape(-1) for t in tensors.values()]) if len(tensors) > 1 \
            else next(iter(tensors.values())).reshape(-1)   # read only: the collective never writes its input
        if self.codec.lossy:   # the same work at every call after the first (no residual yet)
            work = f"error feedback {self.codec.name}, {flat.numel()} values, residual {self.residual is not None}"
            with self.comm.meter.measure(reuse=work if self.codec.fixed_work else None):
                flat, self.residual = local_error_feedback(self.codec, flat, self.residual)
        avg = self.comm.allreduce_mean(flat, self.codec)
        return dict(zip(tensors, split_like(avg, tensors.values()), strict=True))


class AllGather(Reducer):
    """Each node's packets (error feedback for lossy codecs) all-gathered in one bundle and averaged."""

    def __init__(self, codec: Codec, label: str) -> None:
        self.codec = ErrorFeedback(codec) if codec.lossy and not isinstance(codec, ErrorFeedback) else codec
        self.label = label

    def mean(self, tensors, step):
        return self.comm.allgather_mean_many(tensors, self.codec, step)


class PowerSGDReduce(Reducer):
    """PowerSGD of rank ``rank`` with error feedback and a warm-started Q shared by all nodes.

    For each matrix M = (x + residual) viewed as rows x cols (vectors and matrices too small
    to gain go dense with P):

    1. ``compute_ps``: P = M Q (Q drawn from ``seed``, default the run's, on the first call, the
       same on every node);
    2. all-reduce every P and the dense tensors in one message;
    3. ``compute_qs``: orthonormalise the mean P, Q = M^T P;
    4. all-reduce every Q in a second message;
    5. ``decompress``: mean ~= P Q^T; residual = M - P Q^T; Q is kept as the next warm start.
    """

    def __init__(self, rank: int, seed: int | None = None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"PowerSGD rank must be an integer >= 1, got {rank!r}")
        check_seed(seed, "PowerSGD")
        self.rank, self.seed = rank, seed
        self.shapes = LowRankCodec(rank)  # decides, as for the lowrank codec, which tensors are factored
        self.label = f"powersgd:{rank}+EF"
        self.residual: list[torch.Tensor] | None = None
        self.q: list[torch.Tensor | None] = []

    def _init_state(self, xs: list[torch.Tensor]) -> None:
        self.residual = [torch.zeros_like(x, dtype=torch.float32) for x in xs]
        gen = torch.Generator().manual_seed(self.run_seed if self.seed is None else self.seed)
        self.q = [torch.randn(x[0].numel(), self.rank, generator=gen) if self.shapes.compresses(x.shape) else None
                  for x in xs]
        self._work = f"rank {self.rank}, {[tuple(x.shape) for x in xs]}"

    def mean(self, tensors, step):
        xs = list(tensors.values())
        if self.residual is None:
            self._init_state(xs)
        meter, work = self.comm.meter, self._work   # each block the same work at every call: reused
        with meter.measure(reuse=f"powersgd P {work}"):
            ms, ps = self.compute_ps(xs)
        reduced = self.comm.allreduce_mean(torch.cat([p.reshape(-1) for p in ps]))
        with meter.measure(reuse=f"powersgd Q {work}"):
            qs = self.compute_qs(ms, ps, reduced)
        q_avg = self.comm.allreduce_mean(torch.cat([q.reshape(-1) for q in qs])) if qs else None
        with meter.measure(reuse=f"powersgd decompress {work}"):
            out = self.decompress(ms, ps, q_avg)
        return {name: o.view_as(x) for (name, x), o in zip(tensors.items(), out, strict=True)}

    def compute_ps(self, xs):
        ms = [(x + r).reshape(x.shape[0], -1) if q is not None else x + r
              for x, r, q in zip(xs, self.residual, self.q, strict=True)]
        ps = [lowrank_mq(m, q) if q is not None else m.reshape(-1)
              for m, q in zip(ms, self.q, strict=True)]
        return ms, ps

    def compute_qs(self, ms, ps, reduced):
        """Overwrites ``ms`` of dense tensors with their mean and ``ps`` with the orthonormal mean P."""
        offset, qs = 0, []
        for i, (m, q, p) in enumerate(zip(ms, self.q, ps, strict=True)):
            part = reduced[offset:offset + p.numel()]
            offset += p.numel()
            if q is None:
                ms[i] = part.view_as(m)  # dense: already the average
                continue
            ps[i] = orthonormalize(part.reshape(p.shape))
            qs.append(lowrank_mtp(m, ps[i]))
        return qs

    def decompress(self, ms, ps, q_avg):
        offset, out = 0, []
        for i, (m, q, r) in enumerate(zip(ms, self.q, self.residual, strict=True)):
            if q is None:
                out.append(m)
                r.zero_()
                continue
            new_q = q_avg[offset:offset + q.numel()].view_as(q).clone()
            offset += q.numel()
            self.q[i] = new_q
            approx = ps[i] @ new_q.T
            r.copy_((m - approx).view_as(r))
            out.append(approx)
        return out


def make_reducer(spec: str | None) -> Reducer:
    """The reducer for a codec spec (see the module docstring); None means dense fp32."""
    text = "dense" if spec is None else str(spec).strip()
    base = text[:-3] if text.lower().endswith("+ef") else text
    if base.startswith("powersgd"):
        parts = base.split(":")
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"bad codec spec {spec!r}: use 'powersgd:R' with an integer rank R, e.g. 'powersgd:4'")
        return PowerSGDReduce(int(parts[1]))
    codec = get_codec(base)
    if summable(codec):
        return AllReduce(codec, base + ("+EF" if codec.lossy else ""))
    return AllGather(codec, base + "+EF")


def sparse_mean(comm: Comm, sparse: torch.Tensor, count: int, key: str, step: int) -> torch.Tensor:
    """Mean over nodes of each node's ``sparse`` vector, which has at most ``count`` non-zeros
    chosen by the caller: they travel as a top-``count`` packet (values + Elias-Fano indices,
    exact bytes), all-gathered."""
    return comm.allgather_mean(sparse, TopKCodec(max(1, min(count, sparse.numel()))), key=key, step=step)
