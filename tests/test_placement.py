"""Placement never changes a result: the same run, nodes spread over 1, 3 or 4 worker processes."""

import os
from dataclasses import asdict

import pytest

from pysim.config import TrainConfig
from pysim.network import Network
from pysim.placement import Placement, check_fits, max_nodes
from pysim.trainer import RunOptions, run
from pysim.workload import image_workload

BUILT_IN = ["SimpleReduce", "SimpleReduce(overlap=True, bucket_mb=0.05)", "SimpleReduce(codec='dense:fp16')",
            "DiLoCo(H=3)", "DiLoCo(H=3, codec='lowrank:4')", "DiLoCo(H=3, codec='powersgd:2')",
            "DiLoCo(H=3, codec='int8')", "StreamingDiLoCo(H=4, tau=1)", "SPARTA(p=0.02)",
            "SPARTADiLoCo(p=0.02, H=3)", "FedAvg(H=3)", "FedAvg(H=3, island_size=2)",
            "FedAvg(H=2, clients_per_round=2)", "FedAvg(epochs=1, clients_per_round=3)", "TopK(k=0.02)",
            "DGC(k=0.02, warmup_steps=4)", "DeMo", "PowerSGD(rank=2)", "AsyncDiLoCo(H=2)",
            "AsyncDiLoCo(H=3, dylu=False, codec='topk:0.1:int2+ef')", "NoLoCo(H=3)", "SparseLoCo(H=3, tile=16)",
            "MuLoCo(H=3)", "DESLOC(Kx=2)", "EagerDiLoCo(H=3)", "EagerDiLoCo(H=4, fragments=2)"]


def config(strategy: str) -> TrainConfig:
    # a compute profile: simulated times are a function of the run, not of this machine's noise
    return TrainConfig(workload=image_workload(lr=3e-3), strategy=strategy, nodes=4, steps=7, eval_every=3,
                       eval_subset=120, train_examples=600, batch_size=16, warmup_steps=2, compute="cpu",
                       network=Network.uniform(4, "100Mbit", "5ms"), target="accuracy>=0.3")


def everything_but_real_time(r) -> dict:
    final = asdict(r.final)
    final.pop("real_runtime_s")
    return {"steps": r.steps, "evals": r.evals, "final": final, "trace": r.trace.to_json()}


@pytest.mark.parametrize("strategy", BUILT_IN)
def test_every_built_in_strategy_gives_the_same_run_whatever_the_placement(strategy):
    runs = {p: everything_but_real_time(run(config(strategy), options=RunOptions(processes=p))) for p in (1, 3, 4)}
    assert runs[1] == runs[4], "in memory (one process) vs one process per node"
    assert runs[3] == runs[4], "three processes (a ring crossing between them unevenly) vs one per node"


def test_nodes_are_placed_in_contiguous_blocks():
    p = Placement(10, 3)
    assert [list(p.hosted(i)) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [p.process_of(n) for n in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for nodes in range(1, 40):
        for procs in range(1, nodes + 1):
            q = Placement(nodes, procs)
            assert all(n in q.hosted(q.process_of(n)) for n in range(nodes))
    with pytest.raises(ValueError, match="at most 3 processes"):
        Placement(3, 4)


def test_too_many_nodes_for_memory_say_how_many_fit():
    node = 100 << 20
    fit = max_nodes(2, node)
    check_fits(fit, 2, node)
    with pytest.raises(ValueError, match=rf"use at most {fit} nodes") as e:
        check_fits(fit + 1, 2, node)
    assert "\n" not in str(e.value) and "MiB per node" in str(e.value)


def test_check_derives_the_node_limit_from_memory_the_model_and_the_processes(monkeypatch):
    import re

    import pysim.placement as placement
    from pysim.workload import get_workload

    cnn = placement.node_state_bytes(sum(p.numel() for p in get_workload("mnist").model().parameters()))
    free = 3 * placement.PROCESS_BYTES + 50 * cnn + 1000
    monkeypatch.setattr(placement, "available_memory", lambda: free)
    fit = (free - 2 * placement.PROCESS_BYTES) // cnn          # over two workers
    TrainConfig(workload="mnist", nodes=fit).check(processes=2)
    with pytest.raises(ValueError, match=rf"^{fit + 1} nodes need .*: use at most {fit} nodes$"):
        TrainConfig(workload="mnist", nodes=fit + 1).check(processes=2)
    with pytest.raises(ValueError, match=r"use at most 50 nodes$"):
        TrainConfig(workload="mnist", nodes=fit).check(processes=3)    # one more worker's fixed cost
    with pytest.raises(ValueError, match=r"use at most \d+ nodes") as e:  # a larger model: fewer nodes
        TrainConfig(workload="shakespeare", nodes=fit).check(processes=2)
    assert int(re.search(r"at most (\d+) nodes", str(e.value)).group(1)) < fit // 5


def test_available_memory_is_the_machine_s_now():
    from pathlib import Path

    from pysim.placement import available_memory

    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    assert abs(available_memory() - int(line.split()[1]) * 1024) < 256 << 20


def test_pinning_workers_to_cpus_changes_no_result():
    workers = min(4, len(os.sched_getaffinity(0)))
    runs = [everything_but_real_time(run(config("DiLoCo(H=3)"), options=RunOptions(processes=workers, pin_cpus=pin)))
            for pin in (True, False)]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="pin_cpus must be True or False"):
        RunOptions(pin_cpus="yes")
