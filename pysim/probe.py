"""A user's workload tried once in the parent process, before any node starts.

:func:`probe_workload` calls each factory of a :class:`~pysim.workload.Workload`
the way a node will (a model, the data, two training examples through the model
and the loss, the optimizer, the metrics on four evaluation examples) and turns
what a node would have died of into one line that names the factory and the fix.
It also reads the names of the metrics the workload reports, so a target on a
metric it does not report is refused before training (:meth:`pysim.config.TrainConfig.check`).

Built-in workloads are not probed (they are tested); they state their metrics
(``Workload.reports``). A user's workload is probed once per object.
"""

from __future__ import annotations

import ast
import math
import sys
from functools import partial
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pysim.workload import CLASSIFICATION_RANGES, Batches, Target, Workload, classification_metrics

_PROBED: dict[int, tuple[Workload, tuple[str, ...]]] = {}   # id -> (the workload, kept alive; its metric names)
PROBE_TRAIN_EXAMPLES = 2
PROBE_EVAL_EXAMPLES = 4


class _Head:
    """The first ``n`` examples of a data set, as a set of its own."""

    def __init__(self, data: Batches, n: int) -> None:
        self.data, self.n = data, min(n, len(data))

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> Any:
        return self.data.batch(idx)


def metric_names(wl: Workload) -> tuple[str, ...]:
    """The metrics ``wl`` reports: stated by a built-in, found by :func:`probe_workload` otherwise."""
    if wl.reports is not None:
        return tuple(wl.reports)
    if id(wl) not in _PROBED or _PROBED[id(wl)][0] is not wl:
        _PROBED[id(wl)] = (wl, probe_workload(wl))
    return _PROBED[id(wl)][1]


def probe_workload(wl: Workload) -> tuple[str, ...]:
    """Calls ``wl``'s factories once on a tiny input (see the module docstring); returns the names
    of its metrics. One-line ValueError naming the factory that is not what pysim expects."""
    name = f"workload {wl.name!r}"
    for field in ("model", "data", "loss", "metrics", "optimizer"):
        check_importable_by_nodes(wl, field)
    if isinstance(wl.model, nn.Module):
        raise ValueError(f"{name}: model is a model instance ({type(wl.model).__name__}); give a factory that "
                         f"returns a fresh one, e.g. model={type(wl.model).__name__}")
    with torch.random.fork_rng(devices=[]):
        model = _call(name, "model", wl.model)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name}: model() returned {_kind(model)}; it must return a torch.nn.Module")
        train, evaluation = _data(name, wl)
        x, y = _pair(name, train.batch(torch.arange(min(PROBE_TRAIN_EXAMPLES, len(train)))))
        _check_labels(name, train, model, x)
        _loss(name, wl, model, x, y).backward()
        optimizer = _call(name, "optimizer", wl.optimizer, list(model.parameters()))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"{name}: optimizer(params) returned {_kind(optimizer)}; it must return a "
                             "torch.optim.Optimizer, e.g. torch.optim.AdamW(params, lr=1e-3)")
        metrics = _call(name, "metrics", wl.metrics, model, Batches(_Head(evaluation, PROBE_EVAL_EXAMPLES)))
    bad = {k: v for k, v in metrics.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, Real)} if isinstance(metrics, dict) else None
    if bad is None or bad or not metrics:
        shown = _kind(metrics) if bad is None else f"{dict(list(bad.items())[:3])!r}" if bad else "an empty dict"
        raise ValueError(f"{name}: metrics(model, data) returned {shown}; it must return a dict of metric names "
                         "to numbers, e.g. {'loss': 0.3, 'accuracy': 0.9}")
    return tuple(metrics)


def check_importable_by_nodes(wl: Workload, field: str) -> None:
    """A factory of the script being run (``__main__``) must be defined at its top level: node
    processes import the script without running its ``if __name__ == "__main__":`` block."""
    fn = getattr(wl, field)
    while isinstance(fn, partial):
        fn = fn.func
    if getattr(fn, "__module__", None) != "__main__":
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    qualname = getattr(fn, "__qualname__", "")
    if path is None or "." in qualname or not Path(path).is_file():
        return   # an interactive session, or a nested function (the pickle check says that one)
    if qualname not in top_level_names(Path(path).read_text()):
        raise ValueError(f"workload {wl.name!r}: {field} ({qualname}) is defined under `if __name__ == "
                         f"'__main__':` in {Path(path).name}, where node processes cannot see it; define it at "
                         "the top level of the file")


def top_level_names(source: str) -> set[str]:
    """Names a module binds at its top level, outside ``if __name__ == "__main__":`` blocks."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If) and not _is_main_guard(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)

    visit(ast.parse(source).body)
    return names


def _is_main_guard(test: ast.expr) -> bool:
    return isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__" \
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)


def _call(name: str, field: str, fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of a user's factory becomes one line
        raise ValueError(f"{name}: {field}() failed when pysim tried it ({type(e).__name__}: "
                         f"{_first_line(e)})") from None


def _data(name: str, wl: Workload) -> tuple[Batches, Batches]:
    sets = _call(name, "data", wl.data)
    if not isinstance(sets, (tuple, list)) or len(sets) != 2:
        raise ValueError(f"{name}: data() returned {_kind(sets)}; it must return (train set, evaluation set)")
    out = []
    for which, ds in zip(("train", "evaluation"), sets, strict=True):
        if not hasattr(ds, "__len__") or not (hasattr(ds, "batch") or hasattr(ds, "__getitem__")):
            raise ValueError(f"{name}: the {which} set is {_kind(ds)}; give a torch Dataset of (input, target) "
                             "pairs, or an object with __len__ and batch(indices)")
        if len(ds) == 0:
            raise ValueError(f"{name}: the {which} set is empty")
        if not hasattr(ds, "batch"):
            item = ds[0]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"{name}: the {which} set's examples are {_kind(item)}; each must be an "
                                 "(input, target) pair")
        out.append(Batches(ds))
    return out[0], out[1]


def _pair(name: str, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or \
            not all(isinstance(t, torch.Tensor) for t in batch):
        raise ValueError(f"{name}: the training set's examples are {_kind(batch)} once batched; each must be an "
                         "(input, target) pair of tensors")
    return batch[0], batch[1]


def _loss(name: str, wl: Workload, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        loss = wl.loss(model(x), y)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{name}: loss(model(inputs), targets) on {len(x)} training examples failed "
                         f"({type(e).__name__}: {_first_line(e)}); check that the model's outputs and the targets "
                         "match (shapes; class labels below the model's output size)") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = _kind(loss) if not isinstance(loss, torch.Tensor) else \
            f"a tensor of shape {tuple(loss.shape)}" if loss.numel() != 1 else "a tensor without a gradient"
        raise ValueError(f"{name}: loss(outputs, targets) returned {what}; it must return a scalar tensor "
                         "computed from the outputs (e.g. reduce with .mean())")
    return loss


def _check_labels(name: str, train: Batches, model: nn.Module, x: torch.Tensor) -> None:
    """Class labels of the whole training set (where the set has them) below the model's outputs."""
    labels = train.labels()
    if labels is None or not len(labels):
        return
    try:
        with torch.no_grad():
            out = model(x)
    except Exception:  # noqa: BLE001 - the loss check right after names the failure
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return
    lo, hi, classes = int(labels.min()), int(labels.max()), out.shape[-1]
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name}: the training labels run from {lo} to {hi}, but the model has {classes} "
                         f"outputs; give the model {hi + 1} outputs or relabel the classes 0..{classes - 1}")


def _kind(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_target(wl: Workload, goal: Target) -> None:
    """A one-line ValueError if ``goal``'s metric is not one ``wl`` reports, or if it lies where
    the metric never does (accuracy>=98 for 0.98: the run would say "never" and nothing else)."""
    metric, names = goal.metric, metric_names(wl)
    if metric not in names:
        raise ValueError(f"target {str(goal)!r} names metric {metric!r}, which workload {wl.name!r} does not "
                         f"report; it reports {', '.join(names)}")
    if wl.metrics is not classification_metrics:
        return   # a user's metric: its range is theirs to know
    check_reachable(goal)


def check_reachable(goal: Target) -> None:
    """A one-line ValueError if ``goal`` lies where the built-in classification metric it names
    never does (see :func:`check_target`); nothing for other metrics."""
    metric = goal.metric
    if metric not in CLASSIFICATION_RANGES:
        return
    lo, hi = CLASSIFICATION_RANGES[metric]
    if (goal.op == ">=" and goal.value > hi) or (goal.op == "<=" and goal.value < lo):
        percent = metric == "accuracy" and 2 <= goal.value <= 100   # a percentage, most likely
        hint = f" (write {goal.value / 100:g} for {goal.value:g}%)" if percent else ""
        span = f"[{lo:g}, {hi:g}]" if hi < math.inf else f"[{lo:g}, inf)"
        raise ValueError(f"target {goal} can never be reached: {metric} lies in {span}{hint}")

