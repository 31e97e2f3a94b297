"""Streaming DiLoCo: the fragment-wise update rule against a reference written from the paper, the overlap in
the simulated timeline (by hand), the reduction to DiLoCo, bytes by formula, and a replay under another
network against a fresh run there."""

import math

import pytest
import tiny
import torch
from tiny import batch, tiny_model
from torch import nn

from pysim.clock import replay
from pysim.compute import DEVICE_PROFILES, ComputeProfile
from pysim.config import TrainConfig
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.strategies import make_strategy
from pysim.strategies.streaming import strided_fragments
from pysim.trainer import run
from pysim.workload import image_workload

T_STEP = 0.1                 # forward + backward of one step (s) under HAND
BANDWIDTH = 8000.0           # bits/s: 1000 bytes/s
LATENCY = 0.01               # s
NET = Network.uniform(2, BANDWIDTH, LATENCY)
HAND = ComputeProfile("hand", math.inf, math.inf, 0.0, steps={"step": T_STEP})  # everything else costs 0
LR, OUTER_LR, MU = 0.1, 0.7, 0.9


# The paper's schedule for H = 4, M = 2, 11 steps, written out: fragment p synchronises every H inner steps,
# the M fragments staggered evenly by H/M steps (fragment 0 after inner steps 4 and 8, fragment 1 after 2, 6
# and 10; 0-based below), and every fragment after the last step.
SYNCS = {0: {3, 7}, 1: {1, 5, 9}}


def reference(steps: int, tau: int, alpha: float) -> tuple[list, list]:
    """Streaming DiLoCo on 2 nodes written out in plain torch, for the tiny model (2 layers: fragment
    0 = layer 0's weight and bias, fragment 1 = layer 1's) on the schedule :data:`SYNCS`. Returns
    (global, local of node 0)."""
    M = 2
    nodes = [tiny_model() for _ in range(2)]
    glob = [p.detach().clone() for p in nodes[0].parameters()]
    buf: list[torch.Tensor | None] = [None] * len(glob)
    frags = [[0, 1], [2, 3]]
    flight: dict[int, tuple[int, list]] = {}

    def outer_grad(p):  # global - local, per node
        return [[glob[i] - list(m.parameters())[i].detach() for i in frags[p]] for m in nodes]

    def apply(p, deltas):
        for k, i in enumerate(frags[p]):
            d = (deltas[0][k] + deltas[1][k]) / 2                  # mean over the 2 nodes
            buf[i] = d.clone() if buf[i] is None else MU * buf[i] + d
            glob[i] = glob[i] - OUTER_LR * (d + MU * buf[i])       # Nesterov
            for m in nodes:
                with torch.no_grad():
                    w = list(m.parameters())[i]
                    w.copy_(alpha * w + (1 - alpha) * glob[i])

    for step in range(steps):
        last = step == steps - 1
        for r, m in enumerate(nodes):
            x, y = batch(r, step)
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            with torch.no_grad():
                for w in m.parameters():
                    w -= LR * w.grad
        for p in sorted(flight):
            if last or step - flight[p][0] >= tau:
                apply(p, flight.pop(p)[1])
        for p in range(M):
            if last or step in SYNCS[p]:
                if last or tau == 0:
                    apply(p, outer_grad(p))
                else:
                    flight[p] = (step, outer_grad(p))
    return glob, [p.detach() for p in nodes[0].parameters()]


@pytest.mark.parametrize("alpha", [0.5, 0.25])   # 0.25: local and global weights differ (0.5 hides a swap)
def test_update_rule_matches_hand_written_reference_over_three_rounds(alpha):
    # H=4, M=2: fragment 0 syncs after steps 3, 7 and 10 (the last); fragment 1 (offset 2) after 1, 5, 9, 10
    spec = f"StreamingDiLoCo(H=4, fragments=2, tau=1, alpha={alpha}, outer_lr=0.7, outer_momentum=0.9)"
    out = run_nodes(tiny.train, 2, (spec, 11, NET, HAND, "sgd", LR))
    glob, local = reference(11, tau=1, alpha=alpha)
    for a, b in zip(out[0]["global"], glob, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(out[0]["local"], local, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(out[0]["global"], out[1]["global"], strict=True):
        assert torch.equal(a, b)
    assert out[0]["label"] == f"StreamingDiLoCo H=4 M=2 tau=1 alpha={alpha} outer 0.7/0.9"


def chunk_bytes(numel: int, bytes_per_value: int = 4) -> int:
    """A 1-D dense packet: 24-byte header, 4 bytes for its one dimension, the values."""
    return 24 + 4 + bytes_per_value * numel


def ring2(numel: int, bytes_per_value: int = 4) -> int:
    """Bytes one node sends in a 2-node ring all-reduce: its own chunk, then the reduced other one."""
    return chunk_bytes(numel // 2, bytes_per_value) + chunk_bytes(numel - numel // 2, bytes_per_value)


def ring2_s(numel: int) -> float:
    """Seconds of that all-reduce on NET: 2 phases of latency + the larger chunk over the link."""
    return 2 * (LATENCY + 8 * chunk_bytes(numel - numel // 2) / BANDWIDTH)


def test_wait_tau_steps_later_hides_the_all_reduce_behind_training():
    # M=1, H=4, tau=2, 8 steps: start after step 3 (clock 0.4), wait after step 5 (arrival 0.6); the
    # all-reduce of 53 floats ends at 0.4 + C, C = 0.292 s: the wait costs 0.092 s, not C.
    # The last step syncs blocking. Blocking DiLoCo(H=4) pays C twice.
    c = ring2_s(53)
    out = run_nodes(tiny.train, 2, ("StreamingDiLoCo(H=4, fragments=1, tau=2)", 8, NET, HAND, "sgd", LR))
    after_wait = 4 * T_STEP + c
    expected = [T_STEP, 2 * T_STEP, 3 * T_STEP, 4 * T_STEP, 5 * T_STEP, after_wait,
                after_wait + T_STEP, after_wait + 2 * T_STEP + c]
    assert out[0]["clocks"] == pytest.approx(expected, rel=1e-12)
    assert out[0]["events"][:6] == ["NoneType"] * 3 + ["Start", "NoneType", "NoneType"]
    diloco = run_nodes(tiny.train, 2, ("DiLoCo(H=4)", 8, NET, HAND, "sgd", LR))
    assert diloco[0]["clocks"][5] == pytest.approx(6 * T_STEP + c, rel=1e-12)
    assert out[0]["clocks"][-1] < diloco[0]["clocks"][-1] == pytest.approx(8 * T_STEP + 2 * c, rel=1e-12)


def test_tau0_alpha0_one_fragment_is_diloco_exactly():
    spec = "StreamingDiLoCo(H=3, fragments=1, tau=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9)"
    ours = run_nodes(tiny.train, 2, (spec, 10, NET, DEVICE_PROFILES["cpu"], "sgd", LR))
    diloco = run_nodes(tiny.train, 2, ("DiLoCo(H=3, outer_lr=0.7, outer_momentum=0.9)", 10, NET,
                                       DEVICE_PROFILES["cpu"], "sgd", LR))
    for r in range(2):
        for key in ("global", "local"):
            for a, b in zip(ours[r][key], diloco[r][key], strict=True):
                assert torch.equal(a, b)
        assert ours[r]["clocks"] == diloco[r]["clocks"]
        assert ours[r]["sent"] == diloco[r]["sent"]
        assert ours[r]["events"] == diloco[r]["events"]


@pytest.mark.parametrize("codec,width", [(None, 4), ("dense:fp16", 2)])
def test_bytes_follow_the_fragment_schedule(codec, width):
    # H=4, M=2, 8 steps: fragment 0 (35 values) syncs after steps 3 and 7 (last); fragment 1 (18 values,
    # offset 2) after 1, 5 and 7 (last)
    spec = "StreamingDiLoCo(H=4, fragments=2, tau=1" + (f", codec={codec!r})" if codec else ")")
    out = run_nodes(tiny.train, 2, (spec, 8, NET, HAND, "sgd", LR))
    assert out[0]["sent"] == out[1]["sent"] == 2 * ring2(35, width) + 3 * ring2(18, width)


def test_strided_fragments_take_every_mth_layer():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])   # parameters: w0 b0 w1 b1 ... w4 b4
    assert strided_fragments(model, 2) == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]
    assert strided_fragments(model, 1) == [list(range(10))]
    with pytest.raises(ValueError, match="layers"):
        strided_fragments(model, 6)


def test_bad_arguments_are_errors():
    for spec in ("StreamingDiLoCo(tau=25)", "StreamingDiLoCo(H=4, fragments=5)", "StreamingDiLoCo(alpha=1.5)",
                 "StreamingDiLoCo(codec='topk:0.01')", "StreamingDiLoCo(tau=-1)", "StreamingDiLoCo(outer_lr=0)"):
        with pytest.raises(ValueError):
            make_strategy(spec)


def mnist(net: Network) -> TrainConfig:
    return TrainConfig(workload=image_workload(lr=3e-3), strategy="StreamingDiLoCo(H=4, tau=2)", nodes=2,
                       network=net, steps=10, eval_every=10, eval_subset=200, train_examples=1000, warmup_steps=2,
                       compute="cpu")


def test_live_clock_equals_replay_and_a_fresh_run_on_another_network():
    recorded_net, other = Network.uniform(2, "100Mbit", "20ms"), Network.uniform(2, "10Gbit", "100us")
    recorded = run(mnist(recorded_net))
    assert list(replay(recorded.trace, recorded_net).step_end_s) == [s.sim_time_s for s in recorded.steps]
    fresh = run(mnist(other))
    assert list(replay(recorded.trace, other).step_end_s) == [s.sim_time_s for s in fresh.steps]
