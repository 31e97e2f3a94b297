"""A run whose loss stops being finite is a result said as such: "diverged at step N", not a table row."""

import math
import re

import numpy as np
import pytest

from pysim.cli import EXIT_DIVERGED, main
from pysim.config import TrainConfig
from pysim.network import Network
from pysim.rundir import load_result, run_path
from pysim.sweep import load_runs, sweep
from pysim.trainer import run
from pysim.workload import image_workload


def diverging(strategy: str, **kw) -> TrainConfig:
    # AdamW at lr 1e6 on the MNIST CNN: the loss is ~1e30 after one step and NaN after two
    return TrainConfig(workload=image_workload(lr=1e6), strategy=strategy, nodes=3,
                       network=Network.uniform(3, "100Mbit", "20ms"), steps=40, eval_every=10, eval_subset=300,
                       train_examples=1500, batch_size=16, warmup_steps=0, compute="cpu", **kw)


@pytest.mark.parametrize("strategy", ["SimpleReduce", "DiLoCo(H=3, codec='int8')", "TopK(k=0.02)",
                                      "StreamingDiLoCo(H=4, tau=1)"])
def test_a_diverging_run_stops_at_the_next_evaluation_and_says_where(strategy, tmp_path):
    # quantised and top-k codecs carry NaN on (they once raised inside a node); Streaming DiLoCo
    # stops with a fragment in flight
    r = run(diverging(strategy), tmp_path)
    first = next(row.step for row in r.steps if not math.isfinite(row.loss))
    assert r.final.diverged_at_step == first and r.diverged
    assert len(r.steps) == 10                     # the first evaluation after it, not all 40 steps
    assert all(math.isnan(v) for v in r.final.metrics.values()) and r.final.metrics
    saved = load_result(run_path(tmp_path, r.name))
    assert saved.final.diverged_at_step == first and saved.trace == r.trace
    s = sweep(load_runs([run_path(tmp_path, r.name)]), [1e8, 1e9], [0.02], "accuracy>=0.98")
    assert np.isnan(s.time_to_target_s).all()   # a shorter trace re-times like any other


def test_a_finite_run_is_not_marked():
    r = run(TrainConfig(workload=image_workload(lr=3e-3), nodes=2, steps=10, eval_every=5, eval_subset=200,
                        train_examples=600, batch_size=16, warmup_steps=0, compute="cpu"))
    assert r.final.diverged_at_step is None and len(r.steps) == 10 and not r.diverged


def test_compare_prints_diverged_and_exits_3_when_every_seed_diverged(tmp_path, capsys):
    code = main(["compare", "--strategies", "SimpleReduce", "--lr", "1e6", "--nodes", "2", "--steps", "20",
                 "--eval-every", "10", "--eval-subset", "200", "--batch-size", "16", "--seeds", "2",
                 "--compute", "cpu", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == EXIT_DIVERGED == 3
    assert re.search(r"\| SimpleReduce \| diverged at step \d+, \d+ +\|", out)
    assert re.search(r"- SimpleReduce diverged in 2 of 2 seeds \(at step \d+, \d+\)", out)
    assert "error: diverged in every seed: SimpleReduce (training loss NaN or inf; lower --lr" in err
    assert len(err.strip().splitlines()) == 1
