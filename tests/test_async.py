"""Asynchronous DiLoCo and the parameter server on the clock, against a timeline and an update rule
worked out by hand.

The scenario (2 nodes, the server on node 0): every step costs 1 s of compute, node 1 runs at half
speed (2 s a step); an update or a reply of the tiny model is a 240-byte packet, which a
19 200 bit/s link carries in 0.1 s, with 0.05 s of latency. H = 2 steps a round for both nodes
(no DyLU), Delayed Nesterov over N = 2 arrivals, outer lr 0.7, momentum 0.9; plain SGD inside.

    tick  node 0 (speed 1)                          node 1 (speed 1/2)
    0     step -> t=1                               step -> t=2
    1     step -> t=2, sends (in memory, a=2);      idle (t=2 is not within 1 s of the earliest, 1)
          the frontier is node 1's t=2: applied,
          answered at once
    2     step -> t=3                               step -> t=4, sends: arrives 4 + 0.1 + 0.05 = 4.15
    3     step -> t=4, sends (a=4); both now await  awaits
          a reply, so everything is applied: node 0
          (a=4), then node 1 (a=4.15), answered at
          4.15 + 0.1 + 0.05 = 4.3
    4     last: step -> t=5, sends (a=5)            step -> t=6.3, sends: arrives 6.45, answer 6.6
"""

import numpy as np
import pytest
import torch
from tiny import batch, tiny_model
from torch import nn

from pysim.clock import Clock, replay
from pysim.comm import Comm
from pysim.compute import ComputeMeter, ComputeProfile, Work
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.strategies import make_strategy
from pysim.trace import ServerRound, Trace, trace_from_nodes

NET = Network.uniform(2, 19200, 0.05)          # 240 bytes: 0.1 s of transfer
PROFILE = ComputeProfile("hand", float("inf"), float("inf"), 0.0, steps={"step": 1.0})
N_TINY = 6 * 5 + 5 + 5 * 3 + 3
PACKET = 24 + 4 + 4 * N_TINY                  # a dense fp32 packet of the tiny model: 240 bytes
SPEC = "AsyncDiLoCo(H=2, dylu=False, outer_lr=0.7, outer_momentum=0.9)"


def run_async(rank: int, world: int, spec: str, steps: int, speeds: tuple) -> dict:
    from pysim.clock import ComputeScaling

    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = ComputeMeter(PROFILE)
    comm = Comm(rank, world, NET, meter, scaling=ComputeScaling(speeds))
    strategy = make_strategy(spec)
    strategy.setup(model, optimizer, comm)
    trained = []
    for step in range(steps):
        if strategy.trains(step):
            trained.append(step)
            x, y = batch(rank, step)
            with meter.measure(work=Work(), key="step"):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
        strategy.step(step, last=step == steps - 1)
        comm.end_step()
    return {"trained": trained, "clock": comm.clock_s, "sent": comm.bytes_sent, "received": comm.bytes_received,
            "global": [p.detach().clone() for p in strategy.eval_model().parameters()],
            "segments": [(c, f, e) for c, f, e in comm.segments], "step_ends": comm.step_ends}


def sgd(params: list[torch.Tensor], rank: int, steps: list[int]) -> list[torch.Tensor]:
    """Plain SGD (lr 0.1) from ``params`` on this rank's batches of the given steps."""
    m = tiny_model()
    with torch.no_grad():
        for p, v in zip(m.parameters(), params, strict=True):
            p.copy_(v)
    for step in steps:
        x, y = batch(rank, step)
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
    return [p.detach().clone() for p in m.parameters()]


class DelayedNesterov:
    """The server's rule, written out: each arrival theta -= lr * delta / N and joins the buffer;
    every N-th arrival m = beta * m + buffer / N and theta -= lr * beta * m."""

    def __init__(self, theta, lr=0.7, beta=0.9, n=2):
        self.theta, self.lr, self.beta, self.n = [t.clone() for t in theta], lr, beta, n
        self.m = [torch.zeros_like(t) for t in theta]
        self.buf = [torch.zeros_like(t) for t in theta]
        self.arrivals = 0

    def apply(self, delta):
        self.arrivals += 1
        self.theta = [t - self.lr * d / self.n for t, d in zip(self.theta, delta, strict=True)]
        self.buf = [b + d for b, d in zip(self.buf, delta, strict=True)]
        if self.arrivals % self.n == 0:
            self.m = [self.beta * m + b / self.n for m, b in zip(self.m, self.buf, strict=True)]
            self.theta = [t - self.lr * self.beta * m for t, m in zip(self.theta, self.m, strict=True)]
            self.buf = [torch.zeros_like(b) for b in self.buf]
        return [t.clone() for t in self.theta]


def minus(a, b):
    return [x - y for x, y in zip(a, b, strict=True)]


def test_async_diloco_follows_the_hand_worked_timeline_and_update_rule():
    res = run_nodes(run_async, 2, (SPEC, 5, (1.0, 0.5)))
    assert res[0]["trained"] == [0, 1, 2, 3, 4] and res[1]["trained"] == [0, 2, 4]
    assert res[0]["clock"] == pytest.approx(5.0) and res[1]["clock"] == pytest.approx(6.6)
    # the numerics, in the order the server applied the updates
    start = [p.detach().clone() for p in tiny_model().parameters()]
    server = DelayedNesterov(start)
    t0 = sgd(start, 0, [0, 1])
    s0 = server.apply(minus(start, t0))                   # tick 1: node 0's first round
    t1 = sgd(start, 1, [0, 2])                            # node 1's first round, from the start
    t0b = sgd(s0, 0, [2, 3])
    s0b = server.apply(minus(s0, t0b))                    # tick 3: node 0, then node 1
    s1 = server.apply(minus(start, t1))
    final0 = sgd(s0b, 0, [4])                             # tick 4: partial rounds, node 0 first (a = 5 < 6.45)
    server.apply(minus(s0b, final0))
    final1 = sgd(s1, 1, [4])
    deployed = server.apply(minus(s1, final1))
    for got, want in zip(res[0]["global"], deployed, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # bytes: node 1 sent 2 updates (ticks 2 and 4) and got 2 replies; node 0's link carried the server's
    # side; node 0's own updates never left its memory
    assert res[1]["sent"] == 2 * PACKET and res[1]["received"] == 2 * PACKET
    assert res[0]["sent"] == 2 * PACKET and res[0]["received"] == 2 * PACKET


def test_the_trace_replays_the_live_clock_and_round_trips_through_json():
    res = run_nodes(run_async, 2, (SPEC, 5, (1.0, 0.5)))
    trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
    rounds = trace.server_rounds()
    assert [r.order for r in rounds] == [(), (0,), (), (0, 1), (0, 1)]
    assert [r.senders for r in rounds] == [(), (0,), (1,), (0,), (0, 1)]
    assert rounds[2].update_bytes == (0, PACKET) and rounds[3].reply_bytes == (0, PACKET)
    from pysim.clock import ComputeScaling

    tl = replay(trace, NET, ComputeScaling((1.0, 0.5)))
    assert list(tl.end_s[-1]) == pytest.approx([5.0, 6.6])
    assert list(tl.end_s[-1]) == [res[0]["clock"], res[1]["clock"]]      # live and replay, bit for bit
    again = Trace.from_json(trace.to_json())
    assert again == trace and again.bytes_per_node() == ([2 * PACKET, 2 * PACKET], [2 * PACKET, 2 * PACKET])


def test_server_links_queue_updates_fifo_on_the_servers_downlink():
    # three nodes send 240-byte updates to node 0's server at t = 0: nodes 1 and 2 share its downlink
    # one after the other (0.1 s each), so they arrive at 0.15 and 0.25; replies leave FIFO on its uplink
    clock = Clock(Network.uniform(3, 19200, 0.05), 3)
    arrive = np.zeros(3)
    order = clock.server_order(arrive, 0, (1, 2), (0, PACKET, PACKET), final=True)
    assert order == (1, 2)
    t = clock.advance(np.zeros(3), ServerRound(0, (1, 2), (0, PACKET, PACKET), order, (0, PACKET, PACKET)))
    assert list(t) == pytest.approx([0.0, 0.15 + 0.1 + 0.05, 0.25 + 0.1 + 0.05])   # replies at 0.3 and 0.4
    # with empty replies the uplink's queue cannot hide the downlink's: the nodes end where their
    # updates arrived, 0.15 and 0.25 (node 2's transfer waits for node 1's)
    empty = Clock(Network.uniform(3, 19200, 0.05), 3).advance(
        np.zeros(3), ServerRound(0, (1, 2), (0, PACKET, PACKET), order, (0, 0, 0)))
    assert list(empty) == pytest.approx([0.0, 0.15, 0.25])
    with pytest.raises(ValueError, match="does not hold"):
        clock.advance(np.zeros(3), ServerRound(0, (), (0, 0, 0), (1,), (0, PACKET, 0)))


def test_not_final_the_server_applies_only_what_no_later_update_can_precede():
    clock = Clock(Network.uniform(3, 19200, 0.05), 3)
    # node 1 sends at t=1 (arrives 1.15); node 2 is free at t=1.1 and could still send an update that
    # arrives... later than 1.1: the server may only apply updates that arrived by 1.1 -- none yet
    assert clock.server_order(np.array([0.0, 1.0, 1.1]), 0, (1,), (0, PACKET, 0), final=False) == ()
    assert clock.server_order(np.array([2.0, 1.0, 1.2]), 0, (1,), (0, PACKET, 0), final=False) == (1,)


def test_async_strategies_need_a_compute_profile_and_sweeps_refuse_their_runs(tmp_path):
    from pysim.config import TrainConfig

    with pytest.raises(ValueError, match="orders its updates by simulated time"):
        TrainConfig(strategy="AsyncDiLoCo", compute="measured").check()
    from pysim.sweep import sweep

    res = run_nodes(run_async, 2, (SPEC, 5, (1.0, 0.5)))

    class Run:   # the parts of a Result that a sweep reads first
        name, label, seed = "async", "async", 0
        trace = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"])
        target = "accuracy>=0.5"
        evals = [type("E", (), {"metrics": {"accuracy": 0.5}})()]

    with pytest.raises(ValueError, match="asynchronous: the order in which its server applied updates"):
        sweep([Run()], [1e8], [0.01], "accuracy>=0.5")


def test_dylu_gives_slower_nodes_shorter_rounds():
    res = run_nodes(run_async, 2, ("AsyncDiLoCo(H=4, dylu=True)", 9, (1.0, 0.5)))
    # node 1 (half speed) sends after round(4 * 0.5) = 2 of its steps, node 0 after 4
    assert len(res[1]["trained"]) < len(res[0]["trained"])
    rounds = trace_from_nodes([r["segments"] for r in res], res[0]["step_ends"]).server_rounds()
    sends = {i: [k for k, r in enumerate(rounds) if i in r.senders] for i in (0, 1)}
    assert sends[0][0] == 3 and sends[1][0] == 2   # node 0: 4th tick; node 1: its 2nd step, at tick 2
