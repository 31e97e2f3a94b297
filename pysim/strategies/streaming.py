"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication").

DiLoCo whose model is split into M fragments that synchronise on a staggered
schedule, each fragment's all-reduce overlapping tau inner steps of training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pysim.comm import Pending
from pysim.compress import get_codec
from pysim.strategies.base import CommStep, Strategy, check_outer_step, real_in, split_like
from pysim.strategies.reducers import summable


def strided_fragments(model: nn.Module, fragments: int) -> list[list[int]]:
    """Parameter indices (``model.parameters()`` order) of each fragment. A *layer* is a module
    that owns parameters directly (a Linear or Conv with its weight and bias), in module order;
    fragment p holds layers p, p+M, p+2M, ... (the paper's strided fragments)."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    layers = [[index[id(p)] for p in m.parameters(recurse=False)] for m in model.modules()
              if any(True for _ in m.parameters(recurse=False))]
    if fragments > len(layers):
        raise ValueError(f"{fragments} fragments for a model of {len(layers)} layers; use at most {len(layers)}")
    return [sorted(i for layer in layers[p::fragments] for i in layer) for p in range(fragments)]


class StreamingOuterStep(CommStep):
    """The fragment-wise outer step of Streaming DiLoCo.

    Fragment p (see :func:`strided_fragments`) synchronises after the steps t with
    (t + 1) % H == (p * H // M) % H, and every fragment after the last step:

    1. at t: delta_p = global_p - local_p (the outer gradient), started as a non-blocking
       all-reduce on stream 0 (one stream, as one communicator: fragments' collectives run
       in the order started; staggered by H/M steps, they rarely queue); training goes on;
    2. at t + tau (after that step's local update): wait for the mean delta, apply the outer
       Nesterov SGD step to global_p, and merge: local_p = alpha * local_p + (1 - alpha) * global_p.

    With tau = 0 the all-reduce blocks (the same event as DiLoCo's), so tau = 0, alpha = 0,
    M = 1 is DiLoCo exactly: same updates, bytes and simulated time. The final sync after
    the last step is blocking, waits any in-flight fragment first, and deploys a global
    model that includes every node's last steps. ``codec``: a summable codec for the outer
    gradients (``"dense:fp16"``, ``"dense:bf16"``, ``"int8"``, ``"int4"``, ``"int4:32"``...),
    without error feedback (quantised on every ring hop). Deploys the global model."""

    def __init__(self, H: int, fragments: int, tau: int, alpha: float, outer_lr: float, outer_momentum: float,
                 codec: str | None) -> None:
        for name, v, low in (("H (inner steps per fragment sync)", H, 1), ("fragments", fragments, 1),
                             ("tau (overlap in inner steps)", tau, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if tau >= H:
            raise ValueError(f"tau ({tau}) must be below H ({H}): a fragment's sync must end before its next one")
        if fragments > H:
            raise ValueError(f"fragments ({fragments}) must be at most H ({H}) to stagger their syncs")
        real_in(alpha, "alpha (weight of the local fragment in the merge)", 0, 1, low_closed=True, high_closed=True)
        check_outer_step(outer_lr, outer_momentum)
        self.codec = get_codec(codec)
        if not summable(self.codec):
            raise ValueError(f"StreamingDiLoCo all-reduces its outer gradients: codec {codec!r} must be summable "
                             "(dense, dense:fp16, dense:bf16, int8, int4)")
        self.H, self.M, self.tau, self.alpha = H, fragments, tau, float(alpha)
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        codec_label = "" if self.codec.name == "dense:fp32" else f" {codec}"
        self.label = f"H={H} M={fragments} tau={tau} alpha={alpha:g}{codec_label} outer {outer_lr}/{outer_momentum}"

    def check(self, nodes: int, model, optimizer) -> None:
        strided_fragments(model, self.M)   # more fragments than layers: said before any node starts

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.global_model = copy.deepcopy(strategy.model)
        self.global_params = list(self.global_model.parameters())
        self.outer = torch.optim.SGD(self.global_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                     nesterov=self.outer_momentum > 0)
        self.fragments = strided_fragments(strategy.model, self.M)
        self.in_flight: dict[int, tuple[int, Pending[torch.Tensor]]] = {}   # fragment -> (step started, mean)

    def due(self, p: int, step: int) -> bool:
        """Whether fragment ``p`` starts a sync after step ``step`` (0-based) on the schedule."""
        return (step + 1) % self.H == (p * self.H // self.M) % self.H

    def after_local_step(self, step: int, last: bool) -> None:
        for p, (started, pending) in sorted(self.in_flight.items()):
            if last or step - started >= self.tau:
                del self.in_flight[p]
                self.apply(p, pending.wait())
        for p in range(self.M):
            if last or self.due(p, step):
                delta = self.outer_gradient(p)
                if last or self.tau == 0:
                    self.apply(p, self.strategy.comm.allreduce_mean(delta, self.codec))
                else:
                    self.in_flight[p] = (step, self.strategy.comm.allreduce_mean_async(delta, self.codec))

    def outer_gradient(self, p: int) -> torch.Tensor:
        """global_p - local_p as one vector (the fragment's parameters in model order). Charged
        like DiLoCo's: the differences as compute, the flattening as packing (uncharged)."""
        s = self.strategy
        with s.compute(reuse=f"streaming outer gradient {p} of {self.M} {s.param_shapes}"):
            deltas = [self.global_params[i].detach() - s.params[i].detach() for i in self.fragments[p]]
        return torch.cat([d.reshape(-1) for d in deltas])

    def apply(self, p: int, mean_delta: torch.Tensor) -> None:
        """Outer Nesterov step on global_p with the mean outer gradient, then the merge into local_p."""
        s = self.strategy
        frag = self.fragments[p]
        buffers = self.global_params[frag[0]] in self.outer.state   # the fragment's first step makes them
        with s.compute(reuse=f"streaming outer step {p} of {self.M} {s.param_shapes}, buffers {buffers}"):
            self.outer.zero_grad(set_to_none=True)   # only this fragment's parameters step
            for i, d in zip(frag, split_like(mean_delta, [self.global_params[i] for i in frag]), strict=True):
                self.global_params[i].grad = d.clone()
            self.outer.step()
            with torch.no_grad():
                for i in frag:
                    if self.alpha == 0:
                        s.params[i].copy_(self.global_params[i])
                    else:
                        s.params[i].mul_(self.alpha).add_(self.global_params[i], alpha=1 - self.alpha)

    def eval_model(self):
        return self.global_model


class StreamingDiLoCo(Strategy):
    """Streaming DiLoCo (Douillard et al. 2025): DiLoCo whose parameters are split into M
    strided layer fragments; fragment p synchronises every H inner steps at offset p*H/M,
    its outer-gradient all-reduce overlapping ``tau`` inner steps, after which the outer
    Nesterov step updates the global fragment and the local one is merged with weight
    ``alpha`` (see :class:`StreamingOuterStep`). Deploys the global model.

    The paper trains LLMs with H = 100 inner steps, fragments of a few strided transformer
    blocks, an overlap of tau = 1 to 5 inner steps (longer delays degrade), alpha = 0.5 and
    outer Nesterov SGD as in DiLoCo (lr 0.7, momentum 0.9 in DiLoCo; the paper tunes the
    outer lr), with outer gradients sent in 4-bit floats. Defaults here suit pysim's short
    MNIST runs (1000 steps, a 4-layer CNN): H = 25 (as the DiLoCo comparison), M = 2
    fragments, tau = 5 (enough steps to hide a fragment's all-reduce at 100 Mbit/s, 20 ms),
    alpha = 0.5, outer lr 0.7 / momentum 0.9, dense fp32 (``codec="int4"`` for the paper's
    4-bit spirit; pysim has int4 block quantisation, not FP4)."""

    def __init__(self, H: int = 25, fragments: int = 2, tau: int = 5, alpha: float = 0.5, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, codec: str | None = None) -> None:
        self.comm_steps = (StreamingOuterStep(H, fragments, tau, alpha, outer_lr, outer_momentum, codec),)


class EagerOuterStep(StreamingOuterStep):
    """Eager updates (Kale et al. 2025): each fragment's outer-gradient all-reduce overlaps the
    whole next inner phase, and the outer step does not wait for it. At fragment p's sync
    (step t) node m starts the all-reduce of its delta_t and at once applies the outer step with

        delta~ = delta_t / N + (mean_{t-1} - delta_{t-1} / N)

    its own fresh outer gradient standing in for its share, and the other nodes' shares of the
    previous round, whose mean arrived meanwhile (waited for now, one round after it started;
    in the first round only delta_t / N). The local fragment restarts from the updated global
    one (no merge). After the last step the sync is blocking and applies everything still owed:
    mean_last + (mean_{t-1} - delta_{t-1} / N). Nodes hold slightly different global models (each
    applied its own fresh share first); a run scores node 0's."""

    def __init__(self, H: int, fragments: int, outer_lr: float, outer_momentum: float, codec: str | None) -> None:
        super().__init__(H, fragments, 0, 0.0, outer_lr, outer_momentum, codec)
        codec_label = "" if self.codec.name == "dense:fp32" else f" {codec}"
        self.label = f"H={H} M={fragments} eager{codec_label} outer {outer_lr}/{outer_momentum}"

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # fragment -> (own delta, mean)
        self.pending: dict[int, tuple[torch.Tensor, Pending[torch.Tensor]]] = {}   # fragment -> (own delta, mean)

    def after_local_step(self, step: int, last: bool) -> None:
        n = self.strategy.comm.world
        for p in range(self.M):
            if not (last or self.due(p, step)):
                continue
            if p in self.pending:   # the last round's mean, overlapped with the inner phase since
                own, mean = self.pending.pop(p)
                self.previous[p] = (own, mean.wait())
            delta = self.outer_gradient(p)
            owed = self.previous[p][1] - self.previous[p][0] / n if p in self.previous else None
            if last:
                proxy = self.strategy.comm.allreduce_mean(delta, self.codec)
            else:
                self.pending[p] = (delta, self.strategy.comm.allreduce_mean_async(delta, self.codec))
                proxy = delta / n
            self.apply(p, proxy if owed is None else proxy + owed)


class EagerDiLoCo(Strategy):
    """DiLoCo with eager updates: each outer gradient's all-reduce overlaps a whole inner phase
    and the node's own fresh outer gradient stands in for its share meanwhile (see
    :class:`EagerOuterStep`). ``fragments`` > 1 streams the model in strided fragments as
    Streaming DiLoCo does. Defaults: H = 25, one fragment, DiLoCo's outer lr and momentum."""

    def __init__(self, H: int = 25, fragments: int = 1, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 codec: str | None = None) -> None:
        self.comm_steps = (EagerOuterStep(H, fragments, outer_lr, outer_momentum, codec),)
