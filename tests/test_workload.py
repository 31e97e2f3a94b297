"""Workloads: a user's model and data train through the public API; the GPT learns; targets and
time to target follow hand-made series."""

from pathlib import Path

import numpy as np
import pytest
import torch
import workloads

import pysim
from pysim.workload import CharWindows, Target, Workload, shakespeare_workload


def test_user_model_and_dataset_train_through_the_public_api(tmp_path):
    wl = pysim.Workload("blobs", model=workloads.tiny_mlp, data=workloads.blobs, optimizer=workloads.sgd,
                        target="accuracy>=0.9")
    cfg = pysim.TrainConfig(workload=wl, strategy="SimpleReduce", nodes=2, steps=40, batch_size=16, eval_every=10,
                            warmup_steps=2, network=pysim.Network.uniform(2, "1Gbps", "1ms"))
    r = pysim.run(cfg, tmp_path)
    assert r.final.metrics["accuracy"] > 0.9
    assert r.final.time_to_target_s is not None
    n_params = sum(p.numel() for p in workloads.tiny_mlp().parameters())  # 195
    chunk = 24 + 4 + 4 * (n_params // 2), 24 + 4 + 4 * (n_params - n_params // 2)
    assert r.final.bytes_sent_per_node == 40 * sum(chunk)  # two ring phases per step on 2 nodes


def test_a_factory_the_nodes_cannot_import_is_a_one_line_error():
    wl = Workload("bad", model=lambda: torch.nn.Linear(2, 2), data=workloads.blobs)
    with pytest.raises(ValueError, match="cannot reach the node processes.*module level") as e:
        wl.validate()
    assert "\n" not in str(e.value)


def test_gpt_loss_falls_and_bytes_match_parameter_count(tmp_path):
    from pysim.workload import GPTConfig

    wl = shakespeare_workload(gpt=GPTConfig(context=32, layers=1, heads=2, dim=32), eval_chars=4000, lr=1e-2)
    n_params = sum(p.numel() for p in wl.model().parameters())
    cfg = pysim.TrainConfig(workload=wl, strategy="SimpleReduce", nodes=2, steps=30, batch_size=16, eval_every=10,
                            warmup_steps=3, network=pysim.Network.uniform(2, "1Gbps", "1ms"))
    r = pysim.run(cfg)
    losses = [e.metrics["loss"] for e in r.evals]
    assert losses[-1] < 3.4 < np.log(65) and losses[-1] < losses[0] - 0.1  # below uniform (4.17), falling
    assert r.final.metrics["bits_per_token"] == pytest.approx(r.final.metrics["loss"] / np.log(2))
    chunk = 24 + 4 + 4 * (n_params // 2), 24 + 4 + 4 * (n_params - n_params // 2)
    assert r.final.bytes_sent_per_node == 30 * sum(chunk)


def test_char_windows_predict_the_next_character():
    from pysim.datasets import CharCorpus

    w = CharWindows(CharCorpus(torch.arange(10), "abcdefghij"), context=3, stride=2)
    assert len(w) == 4  # starts 0, 2, 4, 6 (a window needs 4 characters)
    x, y = w.batch(torch.tensor([1, 3]))
    assert x.tolist() == [[2, 3, 4], [6, 7, 8]] and y.tolist() == [[3, 4, 5], [7, 8, 9]]


def test_targets_parse_and_fail_clearly():
    assert Target.parse("accuracy>=0.98") == Target("accuracy", ">=", 0.98)
    assert Target.parse(" loss <= 1.7 ").reached(1.5) and not Target.parse("loss<=1.7").reached(1.8)
    for bad in ("accuracy>0.9", "accuracy>=x", ">=0.9", "accuracy>=nan", "accuracy>=inf"):
        with pytest.raises(ValueError, match="bad target"):
            Target.parse(bad)


EXAMPLE = Path(__file__).resolve().parents[1] / "example" / "custom_model.py"


def test_the_readme_shows_the_example_as_it_is():
    # the README's copy had drifted to result["final"], which the typed Result refuses
    code = EXAMPLE.read_text()
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    assert code[code.index("import torch\n"):] in readme


@pytest.mark.parametrize("launcher", ["spawned", "torchrun"])
def test_readme_custom_model_example_runs_spawned_and_under_torchrun(launcher, tmp_path):
    import subprocess
    import sys

    from pysim.launch import free_port

    cmd = [sys.executable, str(EXAMPLE)] if launcher == "spawned" else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(EXAMPLE)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "accuracy" in line]
    assert len(lines) == 2, out.stdout  # one line per strategy, printed by rank 0 only
    for line in lines:
        accuracy = float(line.split("accuracy ")[1].split(",")[0])
        assert accuracy > 0.8, line  # the linear teacher is learnable; chance is 0.25


def test_deployed_model_is_asked_for_every_step_only_until_the_target_is_reached(monkeypatch):
    # one node in this process: every call of the strategy's eval_model is counted
    from pysim.config import TrainConfig
    from pysim.node import train_node
    from pysim.strategies import Strategy

    calls = []
    real = Strategy.eval_model
    monkeypatch.setattr(Strategy, "eval_model", lambda self: calls.append(1) or real(self))
    cfg = TrainConfig(workload="mnist", strategy="SimpleReduce", nodes=1, steps=40, eval_every=10, eval_subset=200,
                      train_examples=1000, batch_size=16, compute="cpu", target="accuracy>=0.3")
    cfg.check()
    out = train_node(0, 1, cfg)
    regular = [step for step, metrics, _ in out["evals"] if step % 10 == 0]
    first = next(step for step, metrics, _ in out["evals"] if step % 10 == 0 and metrics["accuracy"] >= 0.3)
    # every step up to the first evaluation that reaches the target, then evaluations only, then the final one
    assert len(calls) == first + sum(1 for s in regular if s > first) + 1
    assert first < 40
