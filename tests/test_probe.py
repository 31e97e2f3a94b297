"""A user's workload is tried once in the parent: what a node would die of is one line naming the factory."""

import subprocess
import sys
import textwrap

import pytest
import torch
import workloads

from pysim.config import TrainConfig
from pysim.probe import metric_names, top_level_names
from pysim.workload import Workload, image_workload


def blobs(**kw) -> Workload:
    args = {"model": workloads.tiny_mlp, "data": workloads.blobs, "optimizer": workloads.sgd,
            "target": "accuracy>=0.9"} | kw
    return Workload("blobs", **args)


BAD = [  # (what the user got wrong, the workload's fields, what the one line must say)
    ("a model instance, not a factory", {"model": workloads.tiny_mlp()}, "model is a model instance"),
    ("data not (input, target) pairs", {"data": workloads.unpaired}, "must be an \\(input, target\\) pair"),
    ("data() returns one set", {"data": workloads.one_set}, "must return \\(train set, evaluation set\\)"),
    ("a loss per example", {"loss": workloads.per_example_loss}, "a tensor of shape \\(2,\\).*scalar tensor"),
    ("an optimizer factory returning None", {"optimizer": workloads.no_optimizer},
     "optimizer\\(params\\) returned None.*torch.optim.Optimizer"),
    ("metrics as words", {"metrics": workloads.worded_metrics}, "metrics\\(model, data\\) returned.*'high'"),
    ("labels beyond the model's outputs", {"data": workloads.five_class_blobs},
     "labels run from 2 to 4, but the model has 3 outputs"),
    ("a target on a metric it does not report", {"target": "f1>=0.9"},
     "target 'f1>=0.9' names metric 'f1'.*reports loss, accuracy, bits_per_token"),
]


@pytest.mark.parametrize("case,fields,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_workload_fails_in_one_line_before_any_node_starts(case, fields, message):
    cfg = TrainConfig(workload=blobs(**fields), nodes=2, steps=5, batch_size=8, compute="cpu")
    with pytest.raises(ValueError, match=message) as e:
        cfg.check()
    assert "\n" not in str(e.value) and "workload 'blobs'" in str(e.value) or "target" in str(e.value)


def test_a_good_workload_reports_its_metrics_and_is_probed_once(monkeypatch):
    wl = blobs()
    assert metric_names(wl) == ("loss", "accuracy", "bits_per_token")
    monkeypatch.setattr(wl, "data", None)   # a second probe would fail
    assert metric_names(wl) == ("loss", "accuracy", "bits_per_token")


def test_a_target_on_a_metric_a_built_in_does_not_report():
    # once trained to the end, then crashed in the report with KeyError: 'acc'
    cfg = TrainConfig(workload=image_workload(), target="acc>=0.9", compute="cpu")
    with pytest.raises(ValueError, match="names metric 'acc'.*reports loss, accuracy, bits_per_token"):
        cfg.check()


def accuracy_in_percent(model, data) -> dict[str, float]:
    return {"loss": -1.0, "accuracy": 97.0}


def test_a_target_no_run_can_reach_is_refused():
    # accuracy>=98 (meant 98%) trained to the end and reported "never"
    for target, message in (("accuracy>=98", r"accuracy lies in \[0, 1\] \(write 0.98 for 98%\)"),
                            ("accuracy>=1.5", r"accuracy lies in \[0, 1\]$"),
                            ("loss<=-0.1", r"loss lies in \[0, inf\)$"),
                            ("bits_per_token<=-1", "bits_per_token lies in")):
        cfg = TrainConfig(workload=image_workload(), target=target, compute="cpu")
        with pytest.raises(ValueError, match=f"target {target} can never be reached: .*{message}"):
            cfg.check()
    for target in ("accuracy>=1", "accuracy<=2", "loss<=0", "loss>=-1"):   # reachable, or reached at once
        TrainConfig(workload=image_workload(), target=target, compute="cpu").check()
    wl = blobs()   # a user's metrics function: its metrics' ranges are not pysim's to know
    wl.metrics = accuracy_in_percent
    TrainConfig(workload=wl, target="accuracy>=98", compute="cpu").check()


def test_top_level_names_skip_the_main_guard():
    src = textwrap.dedent("""
        import torch
        from torch import nn as tnn
        def model(): pass
        class Net: pass
        data = None
        if True:
            def inner(): pass
        if __name__ == "__main__":
            def hidden(): pass
            shown = 1
    """)
    assert top_level_names(src) == {"torch", "tnn", "model", "Net", "data", "inner"}


def test_a_factory_under_the_main_guard_is_named_before_any_node_starts(tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""
        import torch
        import pysim
        from torch.utils.data import TensorDataset

        def data():
            x = torch.randn(64, 4)
            return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x, (x[:, 0] > 0).long())

        if __name__ == "__main__":
            def model():
                return torch.nn.Linear(4, 2)

            wl = pysim.Workload("guarded", model=model, data=data)
            try:
                pysim.run(pysim.TrainConfig(workload=wl, nodes=2, steps=3, batch_size=8, compute="cpu"))
            except ValueError as e:
                print(e)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "workload 'guarded': model (model) is defined under `if __name__ == '__main__':` in guarded.py, where node "
        "processes cannot see it; define it at the top level of the file"]


def test_probing_leaves_the_random_state_alone():
    state = torch.get_rng_state()
    metric_names(blobs())
    assert torch.equal(torch.get_rng_state(), state)
