"""--tensorboard: a run's loss, evaluations, bytes and simulated time, read back from the event files."""

import pytest

from pysim.cli import main
from pysim.rundir import load_result

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder) -> dict[str, list]:
    ea = event_accumulator.EventAccumulator(str(folder))
    ea.Reload()
    return {tag: ea.Scalars(tag) for tag in ea.Tags()["scalars"]}


def test_compare_writes_every_step_and_evaluation_at_its_simulated_time(tmp_path, capsys):
    out, tb = tmp_path / "runs", tmp_path / "tb"
    argv = ["compare", "--strategies", "SimpleReduce; DiLoCo(H=4)", "--nodes", "2", "--steps", "12",
            "--eval-every", "4", "--eval-subset", "100", "--batch-size", "16", "--seeds", "1", "--compute", "cpu",
            "--out", str(out), "--tensorboard", str(tb)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())   # the runs' folders
    assert sorted(p.name for p in tb.iterdir()) == names and len(names) == 2
    for name in names:
        r = load_result(out / name)
        s = scalars(tb / name)
        loss = s["train/loss"]
        assert [e.step for e in loss] == list(range(1, 13))
        assert [e.value for e in loss] == pytest.approx([row.loss for row in r.steps], rel=1e-6)
        assert [e.wall_time for e in loss] == pytest.approx([row.sim_time_s for row in r.steps])  # "Relative" axis
        assert [e.value for e in s["train/bytes_sent_per_node"]] == [row.bytes_sent_per_node for row in r.steps]
        assert [e.value for e in s["train/sim_time_s"]] == pytest.approx([row.sim_time_s for row in r.steps])
        assert [(e.step, e.value) for e in s["eval/accuracy"]] == \
            [(ev.step, pytest.approx(ev.metrics["accuracy"])) for ev in r.evals]
        assert s["final/accuracy"][0].value == pytest.approx(r.final.metrics["accuracy"])
    # a resumed comparison writes the kept runs again, replacing (not doubling) their curves
    assert main(argv + ["--resume"]) == 0
    assert len(scalars(tb / "SimpleReduce_seed0")["train/loss"]) == 12
    assert len(list((tb / "SimpleReduce_seed0").glob("events.out.tfevents.*"))) == 1
