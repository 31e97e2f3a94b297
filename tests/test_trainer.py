"""Short end-to-end runs: every strategy learns, bytes follow the formula, runs reproduce."""

import dataclasses
import json
import math

import pytest

from pysim.compress import TopKCodec
from pysim.config import TrainConfig
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.node import train_node
from pysim.rundir import load_result, run_path
from pysim.strategies import Strategy
from pysim.trace import segments_from_json, trace_from_nodes
from pysim.trainer import run
from pysim.workload import image_workload

N_PARAMS = 46730
STEPS = 30


def dense_chunk(n: int) -> int:
    return 24 + 4 + 4 * n


def cfg(strategy, **args) -> TrainConfig:
    return TrainConfig(workload=image_workload(lr=3e-3), strategy=strategy, strategy_args=args, nodes=2,
                       network=Network.uniform(2, "100Mbit", "20ms"), steps=STEPS, eval_every=STEPS, eval_subset=1000,
                       train_examples=3000, warmup_steps=5)


EXPECTED_BYTES_PER_NODE = {
    # ring all-reduce on 2 nodes: each node sends one chunk packet per phase, 2 phases per all-reduce
    "SimpleReduce": STEPS * (dense_chunk(N_PARAMS // 2) + dense_chunk(N_PARAMS - N_PARAMS // 2)),
    "DiLoCo": (STEPS // 10) * (dense_chunk(N_PARAMS // 2) + dense_chunk(N_PARAMS - N_PARAMS // 2)),
    "SPARTA": STEPS * (dense_chunk(467 // 2) + dense_chunk(467 - 467 // 2)),  # k = round(0.01 * N_PARAMS)
    "TopK": STEPS * TopKCodec(0.01).nbytes((N_PARAMS,)),  # all-gather on 2 nodes: one packet each way
}


@pytest.mark.parametrize("strategy,args", [("SimpleReduce", {}), ("DiLoCo", {"H": 10}), ("SPARTA", {"p": 0.01}),
                                           ("TopK", {"k": 0.01}), ("PowerSGD", {"rank": 2}),
                                           ("DiLoCo", {"H": 10, "codec": "lowrank:4"})])
def test_every_strategy_learns_and_bytes_match_formula(strategy, args, tmp_path):
    c = cfg(strategy, **args)
    r = run(c, tmp_path)
    folder = run_path(tmp_path, c.run_name)
    assert r.final.metrics["accuracy"] > 0.35, r.final  # chance is 0.1; 30 steps
    if strategy in EXPECTED_BYTES_PER_NODE and "codec" not in args:
        assert r.final.bytes_sent_per_node == EXPECTED_BYTES_PER_NODE[strategy]
    assert r.steps[-1].bytes_received_per_node == r.final.bytes_received_per_node  # transport = formula
    assert r.steps[-1].bytes_sent_per_node == r.final.bytes_sent_per_node
    assert math.isclose(r.steps[-1].sim_time_s, r.final.sim_time_s)
    saved = load_result(folder)
    assert saved.final == r.final and saved.trace == r.trace
    assert (folder / "steps.csv").read_text().count("\n") == STEPS + 1


def test_same_seed_reproduces_accuracy_and_bytes():
    a, b = run(cfg("SPARTA", p=0.01)), run(cfg("SPARTA", p=0.01))
    assert [e.metrics for e in a.evals] == [e.metrics for e in b.evals]
    assert a.final.bytes_sent_per_node == b.final.bytes_sent_per_node
    assert [s.loss for s in a.steps] == [s.loss for s in b.steps]


def test_bad_configs_fail_before_spawning():
    for kwargs in ({"steps": 0}, {"nodes": 0}, {"eval_subset": 0}, {"compute": "tpu"}, {"algorithm": "tree"},
                   {"strategy": "Nope"}, {"strategy_args": {"H": 0}, "strategy": "DiLoCo"}, {"warmup_steps": -1}):
        c = cfg("SimpleReduce")
        for k, v in kwargs.items():
            setattr(c, k, v)
        with pytest.raises(ValueError):
            c.check()


@pytest.mark.parametrize("field,value,message", [
    ("workload", 5, "workload must be a Workload or a built-in name"),
    ("strategy_args", "H=10", "strategy_args must be a dict"),
    ("network", "100Mbit", "network must be a Network"),
    ("label", 5, "label must be a string or None"),
    ("label", "x" * 300, "give the run a shorter label"),     # it trained, then could not be saved
    ("resolve_target", "no", "resolve_target must be True or False"),
    ("jitter", "0.1", "jitter must be a number"),
], ids=["workload", "strategy_args", "network", "label type", "label length", "resolve_target", "jitter"])
def test_a_field_of_the_wrong_type_is_one_line_before_training(field, value, message):
    c = cfg("SimpleReduce")
    setattr(c, field, value)
    with pytest.raises(ValueError, match=message) as e:
        c.check()
    assert "\n" not in str(e.value)
    for speeds in (5, "1,1"):   # a string was split into characters
        with pytest.raises(ValueError, match="compute_speed must be a tuple of per-node speed factors"):
            TrainConfig(compute_speed=speeds)


def test_run_options_of_the_wrong_type_are_one_line():
    from pysim.trainer import RunOptions

    for bad in ("5", None, True, 0, float("inf")):
        with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
            RunOptions(timeout_s=bad)
    with pytest.raises(ValueError, match="tensorboard must be a folder"):
        RunOptions(tensorboard=5)


def test_a_strategy_that_cannot_run_on_the_nodes_or_the_model_fails_before_spawning():
    """Strategy.check sees the node count, and the model and optimizer on the meta device, in
    TrainConfig.check: one line up front, not a node's traceback after every process started."""
    import functools

    import torch

    sgd = dataclasses.replace(image_workload(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    linear = dataclasses.replace(image_workload(), model=functools.partial(
        torch.nn.Sequential, torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    for strategy, args, workload, message in (
            ("FedAvg", {"clients_per_round": 3}, None, "3 clients per round but the run has 2 nodes"),
            ("NoLoCo", {"group_size": 3}, None, "groups of 3 need a number of nodes divisible by 3, got 2"),
            ("DESLOC", {}, sgd, "must be Adam or AdamW, got SGD"),
            ("MuLoCo", {}, linear, "this model has none")):
        c = cfg(strategy, **args)
        if workload is not None:
            c.workload = workload
        with pytest.raises(ValueError, match=message) as e:
            c.check()
        assert "\n" not in str(e.value)
    for strategy, args in (("FedAvg", {"clients_per_round": 2}), ("NoLoCo", {"group_size": 2}), ("DESLOC", {}),
                           ("MuLoCo", {})):
        cfg(strategy, **args).check()   # the same strategies where they fit


class NeedsValues(Strategy):
    """A user's strategy whose check reads a parameter's values: it cannot on the meta device."""

    name = "NeedsValuesTest"

    def check(self, nodes, model, optimizer) -> None:
        if float(next(model.parameters()).detach().abs().sum()) == 0:
            raise ValueError("an all-zero first layer")


def test_a_check_that_needs_real_values_is_left_to_the_nodes():
    import torch

    cfg("NeedsValuesTest").check()   # the meta device has no values: the nodes' setup runs the check on theirs
    zero = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(zero.weight)
    torch.nn.init.zeros_(zero.bias)
    with pytest.raises(ValueError, match="all-zero"):   # what a node's setup meets with real values
        NeedsValues().check(2, zero, None)


def test_incompatible_results_file(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"version": 0}))
    with pytest.raises(ValueError, match="not a pysim run"):
        load_result(p)
    with pytest.raises(ValueError, match="no run at"):
        load_result(tmp_path / "missing.json")


def test_a_half_speed_node_slows_simple_reduce_every_step_and_diloco_every_h_steps(tmp_path):
    """Stragglers through TrainConfig: node 1 at half speed. The live clock charges the scaling
    (replay with it equals the run; without it does not), and the idle share tells the story:
    under SimpleReduce the fast node waits every step for the slow one."""
    from pysim.clock import ComputeScaling, replay

    for name, args in (("SimpleReduce", {}), ("DiLoCo", {"H": 10})):
        base = cfg(name, **args)
        base.compute, base.steps, base.eval_every = "cpu", 20, 20
        slow = cfg(name, **args)
        slow.compute, slow.steps, slow.eval_every, slow.compute_speed = "cpu", 20, 20, (1.0, 0.5)
        r0, r1 = run(base), run(slow)
        trace = r1.trace
        assert replay(trace, slow.network, ComputeScaling((1.0, 0.5), 0.0, slow.seed)).total_s \
            == r1.final.sim_time_s
        assert replay(trace, slow.network).total_s == r0.final.sim_time_s  # same work, other timing
        assert r1.final.metrics == r0.final.metrics  # numerics do not change
        comp = [sum(row[i] for row in trace.compute_s) for i in (0, 1)]
        assert comp[0] == comp[1] > 0
        # the slow node computes 2x as long; the run cannot end before its compute does
        assert r1.final.sim_time_s >= 2 * comp[1]
        assert r1.final.sim_time_s - r0.final.sim_time_s == pytest.approx(comp[1], rel=0.05)
        assert r1.final.idle_s > r0.final.idle_s
    with pytest.raises(ValueError, match="2 speeds for 3 nodes|3 nodes"):
        bad = cfg("SimpleReduce")
        bad.nodes, bad.compute_speed = 3, (1.0, 0.5)
        bad.check()
    with pytest.raises(ValueError, match="jitter"):
        bad = cfg("SimpleReduce")
        bad.jitter = float("nan")
        bad.check()


def test_a_process_sends_each_collective_once():
    """Nodes of one process share one JSON object per collective in their records (the pickle to
    the parent carries a collective's per-node sizes once, not once per node), and the parent
    reads it once: three nodes in one process, one all-reduce per step."""
    c = dataclasses.replace(cfg("SimpleReduce"), nodes=3, steps=2, eval_every=2, eval_subset=100,
                            train_examples=300, network=Network.uniform(3, "100Mbit", "20ms"))
    records = run_nodes(train_node, 3, (c, None), processes=1)
    ends = records[0]["step_ends"]
    for k, (_, _, e) in enumerate(records[0]["segments"]):
        assert all(r["segments"][k][2] is e for r in records[1:]), k
    assert any(e is not None for _, _, e in records[0]["segments"])
    segs = segments_from_json([r["segments"] for r in records])
    assert all(s[k][2] is segs[0][k][2] for s in segs for k in range(len(segs[0])))
    assert len(trace_from_nodes(segs, ends).events) == len(records[0]["segments"])
