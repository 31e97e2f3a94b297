"""Checkpoints: a run killed mid-training and resumed ends exactly where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pysim import checkpoint
from pysim.config import TrainConfig
from pysim.network import Network
from pysim.rundir import load_result, run_path
from pysim.trainer import run

STEPS, EVERY = 120, 20

CHILD = """
import json, sys
from pysim.config import TrainConfig
from pysim.trainer import run
if __name__ == "__main__":
    cfg = TrainConfig.from_json(json.loads(open(sys.argv[1]).read()))
    cfg.checkpoint_every = int(sys.argv[3])
    run(cfg, sys.argv[2])
"""


def make_cfg(strategy: str) -> TrainConfig:
    return TrainConfig(workload="mnist", strategy=strategy, nodes=2, network=Network.uniform(2, "100Mbit", "20ms"),
                       steps=STEPS, batch_size=32, eval_every=15, eval_subset=300, train_examples=4000,
                       warmup_steps=5, compute="cpu")


def processes_marked(mark: str) -> list[int]:
    """Processes whose environment holds ``mark`` (the killed run's node processes inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if mark.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("strategy", ["DiLoCo(H=10, codec='dense:fp16')", "StreamingDiLoCo(H=12, fragments=3, tau=2)"])
def test_a_killed_run_resumes_to_the_same_numbers(strategy, tmp_path):
    cfg = make_cfg(strategy)
    cfg.check()
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(cfg.to_json()))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "runs"
    folder = run_path(out, cfg.run_name) / "checkpoint"
    mark = f"PYSIM_TEST_MARK={uuid.uuid4().hex}"
    env = dict(os.environ, **dict([mark.split("=")]))
    child = subprocess.Popen([sys.executable, str(script), str(config_file), str(out), str(EVERY)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(s >= 2 * EVERY for s in checkpoint.complete_steps(folder, 2)):
        assert child.poll() is None, child.stderr.read().decode()
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)  # the launcher and, through PDEATHSIG, its nodes
    child.wait()
    deadline = time.monotonic() + 5
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_marked(mark) == []
    done = checkpoint.complete_steps(folder, 2)
    assert done and EVERY <= done[-1] < STEPS and len(done) <= 2  # older steps are pruned
    assert not (run_path(out, cfg.run_name) / "manifest.json").exists()  # nothing was saved as a result

    resumed = run(make_cfg(strategy), out, resume=True)
    whole = run(make_cfg(strategy))
    for key in ("metrics", "bytes_sent_per_node", "bytes_received_per_node", "sim_time_s", "time_to_target_s"):
        assert getattr(resumed.final, key) == getattr(whole.final, key), key
    assert resumed.steps == whole.steps and resumed.evals == whole.evals
    assert not folder.exists()  # the results are saved: the checkpoint is gone
    saved = load_result(run_path(out, cfg.run_name))
    assert saved.final.metrics == whole.final.metrics


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    cfg = make_cfg("SimpleReduce")
    cfg.check()
    folder = tmp_path / "ck"
    plan = checkpoint.prepare(folder, cfg.to_json(), 2, 10, resume=False)
    assert plan.resume_step == 0 and (folder / checkpoint.CONFIG_FILE).is_file()
    other = make_cfg("SimpleReduce")
    other.steps = 50
    other.check()
    with pytest.raises(ValueError, match="another configuration .*steps"):
        checkpoint.prepare(folder, other.to_json(), 2, 10, resume=True)
    # a step is complete only when every node's file is there
    checkpoint.save_node_state(folder, 10, 0, {"x": 1})
    assert checkpoint.complete_steps(folder, 2) == []
    checkpoint.save_node_state(folder, 10, 1, {"x": 2})
    assert checkpoint.complete_steps(folder, 2) == [10]
    assert checkpoint.prepare(folder, cfg.to_json(), 2, 10, resume=True).resume_step == 10
    (checkpoint.step_dir(folder, 10) / "node1.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load_node_state(folder, 10, 1)
    with pytest.raises(ValueError, match="give an output folder"):
        run(make_cfg("SimpleReduce"), None, resume=True)


def test_resume_refuses_a_checkpoint_written_by_other_code(tmp_path):
    """Nodes pickle their strategy, comm and clock as objects of the code that wrote them; other
    code may read an attribute they lack mid-run, so it is refused before the run starts."""
    cfg = make_cfg("SimpleReduce")
    cfg.check()
    folder = tmp_path / "ck"
    checkpoint.prepare(folder, cfg.to_json(), 2, 10, resume=False)
    saved = folder / checkpoint.CONFIG_FILE
    written = json.loads(saved.read_text())
    assert written == {"code": checkpoint.code_fingerprint(), "config": cfg.to_json()}
    for other in ({**written, "code": "0123456789abcdef"}, cfg.to_json()):   # other code; before fingerprints
        saved.write_text(json.dumps(other))
        with pytest.raises(ValueError, match="written by other pysim code .* train again without --resume"):
            checkpoint.prepare(folder, cfg.to_json(), 2, 10, resume=True)


def test_the_code_fingerprint_is_of_the_package_sources(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    (package / ".#a.py").symlink_to(tmp_path / "gone")   # an editor's lock link: skipped, not a crash
    (package / "_C.so").write_bytes(b"built for this CPU")    # the extension differs per host: left out
    monkeypatch.setattr(checkpoint, "__file__", str(package / "checkpoint.py"))
    first = checkpoint.code_fingerprint()
    (package / "_C.so").write_bytes(b"built for another CPU")
    assert checkpoint.code_fingerprint() == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert checkpoint.code_fingerprint() != first


def test_a_resume_whose_next_evaluation_reaches_the_target_checks_the_kept_models(tmp_path):
    """The checkpoint after step 3 holds node 0's copies of the models after steps 1-3; the
    evaluation after step 4 reaches the target, so those are evaluated, in the resumed run too."""
    from pysim.checkpoint import CheckpointPlan
    from pysim.host import Host
    from pysim.node import train_node
    from pysim.placement import Placement
    from pysim.transport import Transport

    cfg = TrainConfig(workload="mnist", strategy="SimpleReduce", nodes=2, steps=4, eval_every=4, eval_subset=200,
                      train_examples=400, batch_size=16, compute="cpu", target="accuracy>=0.0")
    cfg.check()

    def node0(resume_step: int) -> dict:
        placement = Placement(2, 1)
        plan = CheckpointPlan(str(tmp_path), 3, resume_step)
        return Host(placement.hosted(0), 2, Transport(placement, 0)).run(train_node, (cfg, plan))[0]

    whole = node0(0)
    resumed = node0(3)
    assert [e[0] for e in whole["evals"]] == [1, 4]      # the kept model after step 1 already reaches it
    assert resumed["evals"] == whole["evals"] and resumed["final_metrics"] == whole["final_metrics"]
