"""Replay claims that hold: with modelled compute, a run is repeatable bit for bit, and re-timing its
trace under another network equals a fresh run on that network, for every strategy."""

import pytest

from pysim.clock import replay
from pysim.config import TrainConfig
from pysim.network import Network
from pysim.trainer import run
from pysim.workload import image_workload

STRATEGIES = [("SimpleReduce", {}), ("DiLoCo", {"H": 4}), ("DiLoCo", {"H": 4, "codec": "lowrank:4"}),
              ("SPARTA", {"p": 0.01}), ("TopK", {"k": 0.01}), ("PowerSGD", {"rank": 2})]
RECORDED = Network.uniform(2, "1Gbps", "1ms")
OTHERS = [Network.uniform(2, "10Mbit", "50ms"), Network.per_node([RECORDED.links[0], Network.uniform(
    1, "200Mbit", "5ms").links[0]])]


def config(strategy, args, net) -> TrainConfig:
    return TrainConfig(workload=image_workload(), strategy=strategy, strategy_args=args, nodes=2, network=net,
                       steps=8, eval_every=4, eval_subset=200, train_examples=1000, warmup_steps=2, compute="cpu")


@pytest.mark.parametrize("strategy,args", STRATEGIES, ids=[f"{s}{a}" for s, a in STRATEGIES])
def test_same_profile_and_seed_repeat_and_replay_equals_a_fresh_run(strategy, args):
    recorded = run(config(strategy, args, RECORDED))
    again = run(config(strategy, args, RECORDED))
    assert [s.sim_time_s for s in again.steps] == [s.sim_time_s for s in recorded.steps]
    assert again.final.bytes_sent_per_node == recorded.final.bytes_sent_per_node
    for net in OTHERS:
        fresh = run(config(strategy, args, net))
        timeline = replay(recorded.trace, net)
        assert list(timeline.step_end_s) == [s.sim_time_s for s in fresh.steps]
        assert fresh.final.bytes_sent_per_node == recorded.final.bytes_sent_per_node
