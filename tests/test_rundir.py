"""Run directories: atomic files, a manifest that ties them, refusal of anything stale, mixed or cut short."""

import hashlib
import json
import os
import random
import signal
import time

import pytest

from pysim import atomic
from pysim.atomic import atomic_write_text
from pysim.clock import Collective, Trace
from pysim.result import Evaluation, Final, Result, StepRow
from pysim.rundir import check_out_dir, load_result, run_dirs, save_result
from pysim.workload import Target


def fake_run(loss: float, steps: int = 50, name: str = "Run") -> Result:
    """A result (with its trace) shaped like the trainer's, with values a test can recognise (``loss``)."""
    ring = Collective("allreduce", "ring", (4000, 4000))
    trace = Trace(2, [[loss, loss], [0.0, 0.0]] * steps, [[1e6, 1e6], [0.0, 0.0]] * steps, [ring, None] * steps,
                  list(range(1, 2 * steps, 2)))  # each step: compute, an all-reduce, then the step's end
    rows = [StepRow(k + 1, loss, 0.5 * (k + 1), 4000 * (k + 1), 4000 * (k + 1), 0.0, 0.0) for k in range(steps)]
    evals = [Evaluation(k, 0.5 * k, {"loss": loss, "accuracy": k / steps}, 100, 4000 * k)
             for k in (steps // 2, steps)]
    final = Final({"accuracy": 1.0}, 0.5 * steps, None, None, 4000 * steps, 4000 * steps, 0.0, 0.0, 0.0, 1.0)
    return Result(name, name, {"nodes": 2, "loss": loss, "seed": 0}, "net", Target.parse("accuracy>=0.9"), rows,
                  evals, final, trace=trace)


def test_saved_run_is_a_folder_whose_manifest_hashes_its_files(tmp_path):
    result = fake_run(1.0)
    saved = save_result(result, tmp_path)
    folder = tmp_path / "Run"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "result.json", "steps.csv", "trace.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("result.json", "trace.json", "steps.csv"):
        data = (folder / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["config"] == result.config
    csv_lines = (folder / "steps.csv").read_text().splitlines()
    assert csv_lines[0] == ("step,loss,sim_time_s,bytes_sent_per_node,bytes_received_per_node,compute_s,comm_s,"
                            "eval_loss,eval_accuracy")
    assert csv_lines[25] == "25,1.0,12.5,100000,100000,0.0,0.0,1.0,0.5" and csv_lines[24].endswith(",,")
    loaded = load_result(folder)
    assert loaded.trace == result.trace
    assert loaded.run_id == manifest["run_id"] == saved.run_id and len(loaded.run_id) == 32
    assert loaded == saved and loaded.steps == result.steps and loaded.final == result.final
    assert load_result(folder / "result.json") == loaded  # a file of the run names the run too


def test_files_from_another_run_are_refused(tmp_path):
    save_result(fake_run(1.0), tmp_path / "a")
    save_result(fake_run(2.0), tmp_path / "b")
    a, b = tmp_path / "a" / "Run", tmp_path / "b" / "Run"
    (a / "trace.json").write_bytes((b / "trace.json").read_bytes())  # a stale or foreign trace beside a's result
    with pytest.raises(ValueError, match=r"trace.json does not match manifest.json .*re-run") as e:
        load_result(a)
    assert "\n" not in str(e.value)


def test_a_run_named_twice_or_through_its_folder_counts_once(tmp_path, monkeypatch):
    from pysim.rundir import unique_run_dirs

    save_result(fake_run(1.0, name="A"), tmp_path)
    save_result(fake_run(2.0, name="B"), tmp_path)
    # `show runs runs/A` counted A twice: a one-seed run became "2 seeds" with its runtime doubled
    assert unique_run_dirs([tmp_path, tmp_path / "A", tmp_path]) == [tmp_path / "A", tmp_path / "B"]
    monkeypatch.chdir(tmp_path)   # a relative and an absolute name of one run are one run
    assert len(unique_run_dirs([tmp_path, "A"])) == 2


@pytest.mark.parametrize("name", ["trace.json", "steps.csv"])
def test_any_file_of_a_run_changed_after_saving_is_refused(tmp_path, name):
    save_result(fake_run(1.0), tmp_path)
    run = tmp_path / "Run"
    (run / name).write_bytes((run / name).read_bytes().replace(b"1", b"7", 1))
    with pytest.raises(ValueError, match=rf"{name} does not match manifest.json"):
        load_result(run)


def test_a_replay_jitters_with_the_runs_own_seed():
    from pysim.clock import ComputeScaling

    run = fake_run(1.0)
    run.config.update(seed=3, jitter=0.2, compute_speed=[1.0, 0.5])
    assert run.scaling == ComputeScaling((1.0, 0.5), 0.2, 3)


def test_a_name_too_long_for_a_folder_is_one_line():
    from pysim.rundir import MAX_NAME, run_dir_name

    assert run_dir_name("x" * MAX_NAME) == "x" * MAX_NAME
    with pytest.raises(ValueError, match=rf"is 300 characters; a folder's name takes at most {MAX_NAME}: give the "
                                         "run a shorter label"):
        run_dir_name("x" * 300)


def test_missing_pieces_are_named(tmp_path):
    save_result(fake_run(1.0), tmp_path)
    folder = tmp_path / "Run"
    (folder / "steps.csv").unlink()
    with pytest.raises(ValueError, match="steps.csv is missing"):
        load_result(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json: not a complete pysim run"):
        load_result(folder)
    with pytest.raises(ValueError, match="incomplete run"):
        run_dirs(tmp_path)
    with pytest.raises(ValueError, match="no run at"):
        load_result(tmp_path / "nothing")


def test_old_flat_results_files_are_refused_with_advice(tmp_path):
    (tmp_path / "SimpleReduce.json").write_text(json.dumps({"version": 1, "name": "SimpleReduce"}))
    with pytest.raises(ValueError, match="not a pysim run.*re-run"):
        load_result(tmp_path / "SimpleReduce.json")
    with pytest.raises(ValueError, match="no pysim runs in"):
        run_dirs(tmp_path)


def test_saving_again_replaces_the_whole_run(tmp_path):
    save_result(fake_run(1.0), tmp_path)
    save_result(fake_run(2.0), tmp_path)
    result = load_result(tmp_path / "Run")
    assert result.config["loss"] == 2.0 and result.trace.compute_s[0] == [2.0, 2.0]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write_text(path, "old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new" * 1000)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_out_dir_problems_fail_in_one_line_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, why in ((tmp_path / "file", "is an existing file"), (tmp_path / "file" / "sub", "cannot write"),
                     ("/proc/pysim-out", "cannot write")):
        with pytest.raises(ValueError, match=why) as e:
            check_out_dir(bad)
        assert "\n" not in str(e.value)
    fresh = check_out_dir(tmp_path / "new" / "runs")
    assert fresh.is_dir() and list(fresh.iterdir()) == []  # the probe is gone


def test_kills_while_saving_leave_no_broken_file(tmp_path):
    """30 SIGKILLs of a process saving two runs in turn into one folder: every file is absent or a complete
    version, and loading gives a matching pair or a clear refusal."""
    versions = {loss: fake_run(loss, steps=200) for loss in (1.0, 2.0)}
    complete = {name: {} for name in ("trace.json", "steps.csv")}
    for loss, result in versions.items():
        save_result(result, tmp_path / str(loss))
        folder = tmp_path / str(loss) / "Run"
        for name in complete:
            complete[name][loss] = (folder / name).read_bytes()
    out = tmp_path / "out"
    save_result(versions[1.0], out)
    folder = out / "Run"
    rng = random.Random(11)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(30):
        pid = os.fork()
        if pid == 0:  # the child saves forever, alternating the two versions
            try:
                while True:
                    for result in versions.values():
                        save_result(result, out)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for name, options in complete.items():
            if (folder / name).exists():
                assert (folder / name).read_bytes() in options.values(), f"{name} is broken"
        if (folder / "result.json").exists():
            body = json.loads((folder / "result.json").read_text())
            assert body["config"]["loss"] in versions
        if (folder / "manifest.json").exists():
            assert json.loads((folder / "manifest.json").read_text())["config"]["loss"] in versions
        try:
            result = load_result(folder)
        except ValueError as e:
            assert "\n" not in str(e) and "re-run" in str(e)
            outcomes["refused"] += 1
        else:
            loss = result.config["loss"]
            assert result.trace == versions[loss].trace and result.steps == versions[loss].steps
            outcomes["loaded"] += 1
    assert sum(outcomes.values()) == 30 and outcomes["refused"] > 0  # some kills did land in the middle of a save
    save_result(versions[2.0], out)  # a later save cleans up and gives a loadable run
    assert load_result(folder).config["loss"] == 2.0
    assert not list(folder.glob(".*.tmp"))


def test_kills_while_writing_a_file_leave_the_old_or_the_new_version(tmp_path):
    """30 SIGKILLs of a process rewriting one 4 MB file (plain writes leave truncated files here)."""
    path = tmp_path / "big.bin"
    versions = [bytes([v]) * (4 << 20) for v in (1, 2)]
    atomic_write_text(path, "")
    rng = random.Random(5)
    for _ in range(30):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    for data in versions:
                        atomic.atomic_write_bytes(path, data)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.001, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes() in (b"", *versions)
