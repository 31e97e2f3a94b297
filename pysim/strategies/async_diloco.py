"""Asynchronous DiLoCo (Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling").

Workers train at their own speed and never wait for each other. Each worker runs
H_i inner steps from the global model it last received, then sends its
pseudo-gradient delta = theta_start - theta_local to a parameter server (a
point-to-point message on the clock, :class:`pysim.trace.ServerRound`) and waits
for the reply. The server applies updates one by one, in the order they arrive,
and answers each with the global model as it is right after that update; the
worker starts its next round from it.

The server's outer step is the paper's Delayed Nesterov (DN): each arriving
delta moves the global model by its share of a plain SGD step, theta -= lr *
delta / N, and is added to a buffer; every N-th arrival the momentum takes the
buffer's mean, m = beta * m + buffer / N, and its look-ahead part is applied,
theta -= lr * beta * m. Over N arrivals this is one Nesterov step on their mean
(torch's SGD(nesterov=True): g + beta * m), with the momentum applied only at
activations, so that stale deltas do not each get momentum's acceleration.
N defaults to the number of workers. ``delay=1`` is plain asynchronous Nesterov.

Dynamic local updates (DyLU, the paper's other half): worker i runs H_i =
max(1, round(H * speed_i / fastest speed)) inner steps per round, so that a
worker half as fast sends after half the steps (``dylu=False``: H for all).

The server lives on node 0 (its link is node 0's; node 0's own updates reach it
in memory) and is scored: a run deploys the server's global model. Steps of a
run are steps of the fastest node: a slower node trains fewer of them (see
:meth:`pysim.comm.Comm.server_round`). At the last step every node sends what
it has and the server applies everything, answering each node.

Because the order in which updates arrive depends on the network, a run is
exact for its own network; re-timing it under another (a sweep) would keep an
order that network would not produce, so sweeps refuse it.
"""

from __future__ import annotations

import copy

import torch

from pysim.comm import ParameterServer
from pysim.compress import DenseCodec, get_codec
from pysim.strategies.base import CommStep, Strategy, check_outer_step, split_like

SERVER_NODE = 0


class DelayedNesterovServer(ParameterServer):
    """The server's global model and its Delayed Nesterov outer step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, outer_lr: float, outer_momentum: float, delay: int, codec) -> None:
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.outer_lr, self.beta, self.delay, self.codec = outer_lr, outer_momentum, delay, codec
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.buffer = [torch.zeros_like(p) for p in self.params]
        self.arrivals = 0
        self.held: dict[int, torch.Tensor] = {}
        self.dense = DenseCodec()

    def receive(self, node: int, packet: torch.Tensor) -> None:
        n = sum(p.numel() for p in self.params)
        self.held[node] = self.codec.unpack(packet, expect_shape=(n,)).float()

    def apply(self, node: int) -> torch.Tensor:
        delta = split_like(self.held.pop(node), self.params)
        self.arrivals += 1
        with torch.no_grad():
            for p, b, d in zip(self.params, self.buffer, delta, strict=True):
                b.add_(d)
                p.sub_(d, alpha=self.outer_lr / self.delay)
            if self.arrivals % self.delay == 0:
                for p, m, b in zip(self.params, self.momentum, self.buffer, strict=True):
                    m.mul_(self.beta).add_(b, alpha=1 / self.delay)
                    p.sub_(m, alpha=self.outer_lr * self.beta)
                    b.zero_()
        return self.dense.pack(torch.cat([p.detach().reshape(-1) for p in self.params]))


class AsyncOuterStep(CommStep):
    """A worker's side of asynchronous DiLoCo (and the server, on node 0)."""

    def __init__(self, H: int, outer_lr: float, outer_momentum: float, delay: int | None, dylu: bool,
                 codec: str | None) -> None:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H (local steps per round) must be an integer >= 1, got {H!r}")
        check_outer_step(outer_lr, outer_momentum)
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 1):
            raise ValueError(f"delay (arrivals per momentum step) must be an integer >= 1, got {delay!r}")
        if not isinstance(dylu, bool):
            raise ValueError(f"dylu must be True or False, got {dylu!r:.40}")
        self.H, self.outer_lr, self.outer_momentum, self.delay, self.dylu = H, outer_lr, outer_momentum, delay, dylu
        self.codec = get_codec(codec)
        codec_label = "" if self.codec.name == "dense:fp32" else f" {self.codec.name}"
        self.label = (f"H={H}{' DyLU' if dylu else ''} DN/{delay or 'N'}{codec_label} "
                      f"outer {outer_lr}/{outer_momentum}")

    def setup(self, strategy) -> None:
        super().setup(strategy)
        comm = strategy.comm
        speeds = comm.clock.scaling.speeds(comm.world)
        self.rounds_of = max(1, round(self.H * speeds[comm.rank] / speeds.max())) if self.dylu else self.H
        self.start = [p.detach().clone() for p in strategy.params]   # the global model this round began from
        self.numel = sum(p.numel() for p in strategy.params)
        self.reply_bytes = DenseCodec().nbytes((self.numel,))
        self.server = DelayedNesterovServer(strategy.model, self.outer_lr, self.outer_momentum,
                                            self.delay or comm.world, self.codec) \
            if comm.rank == SERVER_NODE else None
        self.done_steps, self.awaiting, self.trains_next = 0, False, True

    def trains(self, step: int) -> bool:
        return self.trains_next

    def after_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        if s._training:
            self.done_steps += 1
        update = None
        if not self.awaiting and (last or self.done_steps >= self.rounds_of):
            fixed = self.codec.fixed_work   # else its packets, and so its work, depend on the values
            with s.compute(reuse=f"async delta {s.param_shapes} {self.codec.name} {self.codec.state_of('async')}"
                           if fixed else None):
                delta = torch.cat([(a - p.detach()).reshape(-1) for a, p in zip(self.start, s.params, strict=True)])
                update = self.codec.pack(delta, key="async", step=step)
            self.awaiting = True
        reply = s.comm.server_round(update, self.reply_bytes, final=last, server_node=SERVER_NODE,
                                    server=self.server)
        self.trains_next = reply.trains_next
        if reply.packet is not None:
            with s.compute(reuse=f"async take {s.param_shapes}"):
                model = DenseCodec().unpack(reply.packet, expect_shape=(self.numel,))
                with torch.no_grad():
                    for p, a, v in zip(s.params, self.start, split_like(model, s.params), strict=True):
                        p.copy_(v)
                        a.copy_(v)
            self.done_steps, self.awaiting = 0, False

    def eval_model(self):
        return self.server.model if self.server is not None else None

    def deployer(self, step: int) -> int:
        return SERVER_NODE


class AsyncDiLoCo(Strategy):
    """Asynchronous DiLoCo with a parameter server, Delayed Nesterov and dynamic local updates
    (see the module docstring). The paper's outer step is DiLoCo's (lr 0.7, momentum 0.9)."""

    asynchronous = True

    def __init__(self, H: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9, delay: int | None = None,
                 dylu: bool = True, codec: str | None = None) -> None:
        self.comm_steps = (AsyncOuterStep(H, outer_lr, outer_momentum, delay, dylu, codec),)
