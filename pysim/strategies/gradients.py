"""Gradient averaging before the local step: SimpleReduce (DDP), TopK with error feedback, PowerSGD."""

from __future__ import annotations

from pysim.compress import TopKCodec
from pysim.strategies.base import CommStep, Strategy
from pysim.strategies.reducers import AllGather, AllReduce, PowerSGDReduce, Reducer, make_reducer


class AverageGradients(CommStep):
    """Before the local step, replace every gradient by its mean over nodes through ``reducer``.
    ``flat``: all gradients travel as one vector (one packet) instead of one tensor each."""

    def __init__(self, reducer: Reducer, flat: bool = False, label: str | None = None) -> None:
        self.reducer, self.flat = reducer, flat
        self.label = label if label is not None else "" if reducer.label == "dense" else reducer.label

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.reducer.setup(strategy.comm)

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        if self.flat:
            s.set_grads(self.reducer.mean({"grads": s.flat_grads()}, step)["grads"])
            return
        avg = self.reducer.mean(dict(zip(s.names, s.grads(), strict=True)), step)
        for p, g in zip(s.params, avg.values(), strict=True):
            p.grad = g.clone()


class SimpleReduce(Strategy):
    """All-reduce (average) the gradients every step, as DDP does. Nodes stay identical.
    ``codec``: a dense one ("dense", "dense:fp16", ...); a lossy one gets local error feedback."""

    def __init__(self, codec: str = "dense") -> None:
        reducer = make_reducer(codec)
        if not isinstance(reducer, AllReduce):
            raise ValueError(f"SimpleReduce averages dense gradients; got codec {codec!r} (use TopK or PowerSGD)")
        self.comm_steps = (AverageGradients(reducer, flat=True),)


class TopK(Strategy):
    """Top-k sparsification with error feedback: each node sends the ``k`` largest entries (a
    fraction, or a count) of gradient + residual as one packet; nodes all-gather and average
    the packets. (Not DGC: no momentum correction, clipping, masking or warm-up; see DGC.)"""

    def __init__(self, k: float = 0.01, index_code: str = "ef") -> None:
        codec = TopKCodec(k, index_code=index_code)
        self.comm_steps = (AverageGradients(AllGather(codec, f"k={k}+EF"), flat=True),)


class PowerSGD(Strategy):
    """PowerSGD (Vogels et al. 2019) on the gradients, rank ``rank``, error feedback and warm
    start; two all-reduces per step (see :class:`pysim.strategies.reducers.PowerSGDReduce`)."""

    def __init__(self, rank: int = 4, seed: int = 0) -> None:
        self.comm_steps = (AverageGradients(PowerSGDReduce(rank, seed), label=f"rank={rank}+EF"),)
