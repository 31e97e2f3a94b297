"""Communication strategies. A strategy sees the model, its optimizer and the comm layer.

The Trainer calls, on every node, ``setup`` once, then for each step
``loss.backward()`` followed by ``strategy.step(step)``. A strategy does its
communication through ``self.comm`` and its local arithmetic inside
``self.compute()`` (so that it counts as compute time). A new algorithm is a
subclass with ``step`` (and ``setup`` if it keeps state): see
``Int8Quantised`` in tests/test_strategies.py, 20 lines.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pysim import _C
from pysim.comm import Comm
from pysim.compress import Codec, DenseCodec, ErrorFeedback, LowRankCodec, RandomKCodec, TopKCodec, get_codec


def split_like(flat: torch.Tensor, tensors) -> list[torch.Tensor]:
    """Views of consecutive pieces of ``flat`` shaped like ``tensors`` (the inverse of cat of reshape(-1))."""
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class Strategy:
    """Base class: plain local training (no communication)."""

    name = "Local"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm, scheduler=None) -> None:
        self.model, self.optimizer, self.comm, self.scheduler = model, optimizer, comm, scheduler
        self.params = list(model.parameters())  # walking the module tree every step costs ~0.4 ms

    def compute(self) -> AbstractContextManager:
        """Context manager: the body counts as this node's compute time."""
        return self.comm.meter.measure()

    def optimizer_step(self) -> None:
        with self.compute():
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()

    def step(self, step: int, last: bool = False) -> None:
        self.optimizer_step()

    def eval_model(self) -> nn.Module:
        """The model whose test accuracy this strategy reports."""
        return self.model

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def flat_grads(self) -> torch.Tensor:
        """All gradients as one vector (the order of ``set_grads``)."""
        return torch.cat([g.reshape(-1) for g in self.grads()])

    def set_grads(self, flat: torch.Tensor) -> None:
        for p, g in zip(self.params, split_like(flat, self.params), strict=True):
            p.grad = g.clone()


class SimpleReduce(Strategy):
    """All-reduce (average) the gradients every step, as DDP does."""

    name = "SimpleReduce"

    def __init__(self, codec: str = "dense") -> None:
        c = get_codec(codec)
        if not isinstance(c, DenseCodec):
            raise ValueError(f"SimpleReduce averages dense gradients; got codec {codec!r} (use TopK or PowerSGD)")
        self.codec = c

    def step(self, step: int, last: bool = False) -> None:
        flat = self.flat_grads()
        self.set_grads(self.comm.allreduce_mean(flat, self.codec))
        self.optimizer_step()


class DiLoCo(Strategy):
    """DiLoCo (Douillard et al. 2023): H local steps of the inner optimizer, then average
    the pseudo-gradient delta = theta_global - theta_local over nodes and apply an outer
    SGD step with Nesterov momentum. ``codec`` compresses delta (with error feedback for
    lossy codecs), e.g. "lowrank:4", "topk:0.05", "dense:fp16"."""

    name = "DiLoCo"

    def __init__(self, H: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 codec: str | None = None) -> None:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"DiLoCo H must be an integer >= 1, got {H!r}")
        if not outer_lr > 0 or not 0 <= outer_momentum < 1:
            raise ValueError(f"DiLoCo needs outer_lr > 0 and 0 <= outer_momentum < 1, got {outer_lr}, {outer_momentum}")
        self.H, self.outer_lr, self.outer_momentum = H, outer_lr, outer_momentum
        c = get_codec(codec)
        self.codec: Codec = ErrorFeedback(c) if c.lossy and not isinstance(c, ErrorFeedback) else c

    def setup(self, model, optimizer, comm, scheduler=None) -> None:
        super().setup(model, optimizer, comm, scheduler)
        self.global_model = copy.deepcopy(model)
        self.outer = torch.optim.SGD(self.global_model.parameters(), lr=self.outer_lr,
                                     momentum=self.outer_momentum, nesterov=self.outer_momentum > 0)

    def step(self, step: int, last: bool = False) -> None:
        self.optimizer_step()
        if (step + 1) % self.H and not last:
            return
        named = list(zip(self.global_model.named_parameters(), self.params, strict=True))
        with self.compute():
            deltas = {name: (g.detach() - p.detach()) for (name, g), p in named}
        if isinstance(self.codec, DenseCodec):
            flat = self.comm.allreduce_mean(torch.cat([d.reshape(-1) for d in deltas.values()]), self.codec)
            avg = dict(zip(deltas, split_like(flat, deltas.values()), strict=True))
        else:
            avg = self.comm.allgather_mean_many(deltas, self.codec, step)
        with self.compute():
            self.outer.zero_grad()
            for name, g in self.global_model.named_parameters():
                g.grad = avg[name].clone()
            self.outer.step()
            with torch.no_grad():
                for (_, g), p in named:
                    p.copy_(g)

    def eval_model(self) -> nn.Module:
        return self.global_model


class SPARTA(Strategy):
    """SPARTA: after every local step, average a random fraction ``p`` of the parameters.
    The indices come from a seed shared by all nodes, so only values cross the wire."""

    name = "SPARTA"

    def __init__(self, p: float = 0.005, seed: int = 0) -> None:
        self.sampler = RandomKCodec(p, seed)
        self.p = p

    def step(self, step: int, last: bool = False) -> None:
        self.optimizer_step()
        with self.compute():
            flat = parameters_to_vector(self.params).detach()
            idx = self.sampler.indices(flat.numel(), step)
            values = flat[idx]
        flat[idx] = self.comm.allreduce_mean(values)
        with self.compute():
            vector_to_parameters(flat, self.params)


class TopK(Strategy):
    """Deep Gradient Compression style: each node sends the top-k of (gradient + residual)
    with error feedback; nodes all-gather the sparse packets and average them."""

    name = "TopK"

    def __init__(self, k: float = 0.01, index_code: str = "ef") -> None:
        self.codec = ErrorFeedback(TopKCodec(k, index_code=index_code))

    def step(self, step: int, last: bool = False) -> None:
        flat = self.flat_grads()
        self.set_grads(self.comm.allgather_mean(flat, self.codec, key="grads", step=step))
        self.optimizer_step()


class PowerSGD(Strategy):
    """PowerSGD (Vogels et al. 2019), rank ``rank``, error feedback and warm start.

    Per matrix M (gradient + residual): P = M Q, all-reduce P, orthonormalise,
    Q = M^T P, all-reduce Q, M ~= P Q^T. All P of a step travel in one
    all-reduce, all Q in a second; vectors and small matrices go dense with P."""

    name = "PowerSGD"

    def __init__(self, rank: int = 4, seed: int = 0) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"PowerSGD rank must be an integer >= 1, got {rank!r}")
        self.rank, self.seed = rank, seed
        self.shapes = LowRankCodec(rank)  # decides, as for DiLoCo's codec, which tensors are factored

    def setup(self, model, optimizer, comm, scheduler=None) -> None:
        super().setup(model, optimizer, comm, scheduler)
        self.residual = [torch.zeros_like(p) for p in self.params]
        gen = torch.Generator().manual_seed(self.seed)
        self.q = [torch.randn(p[0].numel(), self.rank, generator=gen) if self.shapes.compresses(p.shape) else None
                  for p in self.params]

    def step(self, step: int, last: bool = False) -> None:
        with self.compute():
            ms = [(g + r).reshape(g.shape[0], -1) if q is not None else g + r
                  for g, r, q in zip(self.grads(), self.residual, self.q, strict=True)]
            ps = [torch.from_numpy(_C.lowrank_mq(m.contiguous().numpy(), q.numpy())) if q is not None else m.reshape(-1)
                  for m, q in zip(ms, self.q, strict=True)]
        reduced = self.comm.allreduce_mean(torch.cat([p.reshape(-1) for p in ps]))
        with self.compute():
            offset, qs = 0, []
            for i, (m, q, p) in enumerate(zip(ms, self.q, ps, strict=True)):
                part = reduced[offset:offset + p.numel()]
                offset += p.numel()
                if q is None:
                    ms[i] = part.view_as(m)  # dense: already the average
                    continue
                p_avg = _C.orthonormalize(part.reshape(p.shape).contiguous().numpy())
                ps[i] = torch.from_numpy(p_avg)
                qs.append(torch.from_numpy(_C.lowrank_mtp(m.contiguous().numpy(), p_avg)))
        q_avg = self.comm.allreduce_mean(torch.cat([q.reshape(-1) for q in qs])) if qs else None
        with self.compute():
            offset, grads = 0, []
            for i, (m, q, r) in enumerate(zip(ms, self.q, self.residual, strict=True)):
                if q is None:
                    grads.append(m)
                    r.zero_()
                    continue
                new_q = q_avg[offset:offset + q.numel()].view_as(q).clone()
                offset += q.numel()
                self.q[i] = new_q
                approx = ps[i] @ new_q.T
                r.copy_((m - approx).view_as(r))
                grads.append(approx)
            self.set_grads(torch.cat([g.reshape(-1) for g in grads]))
        self.optimizer_step()


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name.lower(): cls for cls in (Strategy, SimpleReduce, DiLoCo, SPARTA, TopK, PowerSGD)
}


def make_strategy(name: str, **kwargs) -> Strategy:
    """A strategy by name with checked keyword arguments (unknown ones are an error)."""
    key = name.lower()
    if key not in STRATEGIES:
        close = difflib.get_close_matches(key, STRATEGIES, n=1)
        hint = f" (did you mean {STRATEGIES[close[0]].name}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; known: {', '.join(c.name for c in STRATEGIES.values())}")
    cls = STRATEGIES[key]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for arg in kwargs:
        if arg not in allowed:
            lower = {a.lower(): a for a in allowed}
            close = [lower[arg.lower()]] if arg.lower() in lower else difflib.get_close_matches(arg, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{cls.name} got unknown argument {arg!r}{hint}; it takes {', '.join(allowed) or 'none'}")
    return cls(**kwargs)
