"""Typed results: the JSON form round-trips, older versions load, malformed ones are refused in one line."""

import json
from dataclasses import replace

import numpy as np
import pytest
from test_rundir import fake_run

from pysim.result import RESULT_VERSION, Result, crossing_step, time_at_step, time_to_target
from pysim.workload import Target


def test_json_round_trip_keeps_every_field():
    r = fake_run(1.5)
    back = Result.from_json(json.loads(json.dumps(r.to_json())), r.trace)
    assert back == r and back.trace == r.trace
    assert back.steps[3].bytes_sent_per_node == 16000 and back.evals[1].metrics == {"loss": 1.5, "accuracy": 1.0}
    assert back.seed == 0 and back.nodes == 2 and str(back.target) == "accuracy>=0.9"


def test_version_2_results_load_without_the_divergence_field():
    body = fake_run(1.0).to_json()
    body["version"] = 2
    del body["final"]["diverged_at_step"]
    old = Result.from_json(body)
    assert old.final.diverged_at_step is None and not old.diverged and old.version == RESULT_VERSION


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b.update(version=99), "results format version 99"),
    (lambda b: b["final"].pop("sim_time_s"), "result is malformed"),
    (lambda b: b["steps"][0].update(extra=1), "unknown StepRow fields"),
    (lambda b: b.update(target="accuracy"), "bad target"),
])
def test_malformed_results_are_refused_in_one_line(mutate, message):
    body = fake_run(1.0).to_json()
    mutate(body)
    with pytest.raises(ValueError, match=message) as e:
        Result.from_json(body)
    assert "\n" not in str(e.value)


def test_time_to_target_reads_the_crossing_off_the_step_times():
    r = fake_run(1.0, steps=50)   # accuracy 0.5 at step 25, 1.0 at step 50; steps end every 0.5 s
    t, lo, hi = r.time_to_target()
    assert (lo, hi) == (12.5, 25.0) and t == pytest.approx(0.5 * (25 + 25 * 0.8))  # 0.9 is 80% of the way


def test_crossing_is_interpolated_between_evaluations():
    series = [(10, 0.90), (20, 0.95), (30, 0.99)]
    # 0.98 lies 3/4 of the way from 0.95 (step 20) to 0.99 (step 30): step 27.5
    assert crossing_step(series, Target("accuracy", ">=", 0.98)) == (27.5, 20, 30)
    assert crossing_step([(10, 2.0), (20, 1.6)], Target("loss", "<=", 1.7)) == pytest.approx((17.5, 10, 20))
    assert crossing_step(series, Target("accuracy", ">=", 0.999)) is None
    assert crossing_step(series, Target("accuracy", ">=", 0.5)) == (10.0, 0, 10)


def test_time_to_target_reads_the_step_clock():
    ends = np.array([1.0, 2.0, 3.0, 5.0])  # step k+1 ends at ends[k]
    assert time_at_step(ends, 3.5) == pytest.approx(4.0)
    assert time_at_step(ends, 0.5) == pytest.approx(0.5)
    template = fake_run(1.0, steps=4)
    result = replace(template, steps=[replace(row, sim_time_s=t) for row, t in zip(template.steps, ends, strict=True)],
                     evals=[replace(template.evals[0], step=2, metrics={"accuracy": 0.5}),
                            replace(template.evals[1], step=4, metrics={"accuracy": 0.9})])
    # 0.8 is 3/4 of the way from step 2 to step 4: step 3.5 -> 4.0 s, bracket 2.0 s .. 5.0 s
    assert time_to_target(result, Target("accuracy", ">=", 0.8)) == (4.0, 2.0, 5.0)


def test_crossing_one_step_apart_is_that_step_not_an_interpolation():
    # the node bisected down to adjacent steps: step 27 is the first model at or above the target
    series = [(25, 0.95), (26, 0.975), (27, 0.99), (50, 0.995)]
    assert crossing_step(series, Target("accuracy", ">=", 0.98)) == (27.0, 26, 27)


def test_time_at_a_fractional_step_between_step_ends():
    from pysim.result import time_at_step

    ends = np.array([1.0, 2.0, 3.0])   # step k ends at k s
    assert [float(time_at_step(ends, x)) for x in (0.5, 1.0, 1.5, 2.5, 3.0)] == [0.5, 1.0, 1.5, 2.5, 3.0]
