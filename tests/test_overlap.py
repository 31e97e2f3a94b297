"""SimpleReduce with DDP-style bucketed overlap: buckets, the compute split by FLOPs, a hand-computed
step timeline through the strategy, bytes per bucket, and numerics equal to the blocking form."""

import math

import pytest
import tiny
import torch

from pysim.clock import replay
from pysim.compute import ComputeMeter, ComputeProfile, Work
from pysim.config import TrainConfig
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.strategies import make_strategy
from pysim.strategies.gradients import buckets_by_size
from pysim.trainer import run
from pysim.workload import image_workload

T_STEP = 0.9                 # forward + backward of one step (s), from the profile below
BANDWIDTH = 8000.0           # bits/s: 1000 bytes/s
LATENCY = 0.01               # s
NET = Network.uniform(2, BANDWIDTH, LATENCY)
# forward+backward costs T_STEP; every other piece of work (optimizer, packing) costs 0
PROFILE = ComputeProfile("hand", math.inf, math.inf, 0.0, steps={"step": T_STEP})
# reverse order: b1 (12 B) + w1 (60 B) = 72 B fit 80 B; b0 (20 B) would pass it; w0 (120 B) is alone
BUCKET_MB = 80e-6


def chunk_bytes(numel: int) -> int:
    """A 1-D dense fp32 packet: 24-byte header, 4 bytes for its one dimension, 4 bytes per value."""
    return 24 + 4 + 4 * numel


def ring2_allreduce_s(numel: int) -> float:
    """Ring all-reduce of ``numel`` floats on 2 nodes: 2 phases; in each, both nodes send one chunk
    at once, so a phase is the latency plus the larger chunk over the link."""
    biggest = chunk_bytes(numel - numel // 2)
    return 2 * (LATENCY + 8 * biggest / BANDWIDTH)


def test_buckets_are_reverse_parameter_order_cut_at_the_cap():
    params = [torch.zeros(30), torch.zeros(5), torch.zeros(15), torch.zeros(3)]  # w0 b0 w1 b1
    assert buckets_by_size(params, 80) == [[3, 2], [1], [0]]
    assert buckets_by_size(params, 1e9) == [[3, 2, 1, 0]]
    assert buckets_by_size(params, 1) == [[3], [2], [1], [0]]  # a tensor over the cap is a bucket of its own


def test_meter_hold_and_release_hand_the_block_out_in_pieces():
    meter = ComputeMeter(PROFILE)
    with meter.measure(work=Work(flops=90.0), key="step"):
        pass
    assert meter.hold() == (T_STEP, 90.0)
    assert meter.take() == (0.0, 0.0)
    meter.release(0.3, 30.0)
    assert meter.take() == (0.3, 30.0)
    with pytest.raises(ValueError, match="held"):
        meter.release(1.0)
    meter.release()
    assert meter.take() == pytest.approx((0.6, 60.0))
    assert (meter.held_seconds, meter.held_flops) == (0.0, 0.0)


def test_overlap_step_time_equals_the_hand_computed_timeline_and_beats_blocking():
    over = run_nodes(tiny.train, 2, (f"SimpleReduce(overlap=True, bucket_mb={BUCKET_MB})", 2, NET, PROFILE))
    flat = run_nodes(tiny.train, 2, ("SimpleReduce", 2, NET, PROFILE))
    # FLOPs of one forward on a batch of 8: Linear(6,5) 2*8*6*5 = 480, Linear(5,3) 2*8*5*3 = 240, each
    # split over its weight and bias by element count. Forward = T/3; a bucket's backward =
    # 2T/3 * (its forward FLOPs) / 720.
    f_b1w1, f_b0, f_w0 = 240.0, 480.0 * 5 / 35, 480.0 * 30 / 35
    issue0 = T_STEP / 3 + 2 * T_STEP / 3 * f_b1w1 / 720           # forward + backward of layer 2
    issue1 = issue0 + 2 * T_STEP / 3 * f_b0 / 720
    issue2 = issue1 + 2 * T_STEP / 3 * f_w0 / 720                 # backward done
    assert issue2 == pytest.approx(T_STEP)
    end0 = issue0 + ring2_allreduce_s(18)                         # one stream: FIFO
    end1 = max(issue1, end0) + ring2_allreduce_s(5)
    end2 = max(issue2, end1) + ring2_allreduce_s(30)
    step = max(end2, T_STEP)
    assert over[0]["clocks"][0] == pytest.approx(step, rel=1e-12)
    assert over[0]["clocks"][1] == pytest.approx(2 * step, rel=1e-12)
    blocking = T_STEP + ring2_allreduce_s(53)
    assert flat[0]["clocks"][0] == pytest.approx(blocking, rel=1e-12)
    assert step < blocking
    # the Start of bucket b records forward + backward up to bucket b; the waits come after every Start
    kinds = [type(e).__name__ for _, e in over[0]["segments"][:7]]
    assert kinds == ["Start", "Start", "Start", "Wait", "Wait", "Wait", "NoneType"]
    assert [c for c, _ in over[0]["segments"][:3]] == pytest.approx([issue0, issue1 - issue0, T_STEP - issue1])
    # bytes per node and step: every bucket is a ring all-reduce, each node sends both chunks once
    per_step = sum(chunk_bytes(n // 2) + chunk_bytes(n - n // 2) for n in (18, 5, 30))
    assert over[0]["sent"] == over[1]["sent"] == 2 * per_step == 2 * (128 + 76 + 176)
    assert flat[0]["sent"] == 2 * (chunk_bytes(26) + chunk_bytes(27))
    assert over[0]["label"] == "SimpleReduce overlap 8e-05MB buckets"


def test_overlap_changes_only_time_mean_gradient_is_bit_equal():
    over = run_nodes(tiny.train, 2, (f"SimpleReduce(overlap=True, bucket_mb={BUCKET_MB})", 6, NET, PROFILE))
    flat = run_nodes(tiny.train, 2, ("SimpleReduce", 6, NET, PROFILE))
    for a, b in zip(over[0]["params"] + over[1]["params"], flat[0]["params"] + flat[1]["params"], strict=True):
        assert torch.equal(a, b)


def mnist(spec: str, steps: int = 8) -> TrainConfig:
    return TrainConfig(workload=image_workload(lr=3e-3), strategy=spec, nodes=2,
                       network=Network.uniform(2, "1Gbps", "100us"), steps=steps, eval_every=steps, eval_subset=200,
                       train_examples=1000, warmup_steps=2, compute="cpu")


def test_mnist_overlap_same_losses_and_model_less_or_equal_time_and_replay_equals_live():
    flat = run(mnist("SimpleReduce"))
    over = run(mnist("SimpleReduce(overlap=True, bucket_mb=0.05)"))
    one = run(mnist("SimpleReduce(overlap=True)"))  # the 0.19 MB CNN is one 25 MB bucket
    assert [s.loss for s in over.steps] == [s.loss for s in flat.steps]
    assert over.final.metrics == flat.final.metrics
    assert over.final.sim_time_s <= flat.final.sim_time_s
    assert one.final.bytes_sent_per_node == flat.final.bytes_sent_per_node
    assert over.final.bytes_sent_per_node > flat.final.bytes_sent_per_node  # 5 buckets, 5 headers
    live = [s.sim_time_s for s in over.steps]
    assert list(replay(over.trace, mnist("x").network).step_end_s) == live


def test_bad_overlap_arguments_are_errors():
    for spec in ("SimpleReduce(bucket_mb=1.0)", "SimpleReduce(overlap=True, bucket_mb=0)",
                 "SimpleReduce(overlap=1)", "SimpleReduce(overlap=True, codec='topk:0.01')"):
        with pytest.raises(ValueError):
            make_strategy(spec)
