"""Workloads: what the nodes train. A model factory, a data factory, a loss, metrics, an optimizer
factory and a target, given by the user or built in.

A workload crosses into the node processes by pickling, so its factories must
be importable: module-level functions or classes (or ``functools.partial`` of
them) in a file the node processes can import, and a script that builds one
guards its entry point with ``if __name__ == "__main__":`` (node processes are
*spawned*: they import the script without running its main block). A lambda
or a nested function cannot travel; :meth:`Workload.check` says so in one line
before any process starts.

Data sets are anything with ``__len__`` and either ``batch(indices) -> (inputs,
targets)`` (fast: the built-in sets) or ``__getitem__`` returning an
``(input, target)`` pair (any map-style ``torch.utils.data.Dataset``; items are
stacked with ``default_collate``).

Built in (:func:`get_workload`):

- ``mnist``: the CNN of :class:`pysim.models.ImageCNN` on the shipped MNIST,
  target test accuracy >= 0.98;
- ``idx:DIR``: the same CNN on any image set in MNIST's four-file IDX layout
  (image size and class count from the files, checksums from a ``SHA256SUMS``
  beside them);
- ``shakespeare``: :class:`pysim.models.CharGPT` on Tiny Shakespeare (first 90%
  train, last 10% validation), target validation loss <= 2.0 nats/char.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset, default_collate

from pysim import datasets
from pysim.models import CharGPT, ImageCNN

# ------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A goal in a workload's own metric: ``metric op value``, e.g. accuracy >= 0.98 or loss <= 1.7."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"bad target {self}: the direction must be '>=' or '<='")
        if not math.isfinite(self.value):
            raise ValueError(f"bad target {self.metric}{self.op}{self.value}: the value must be a finite number")

    @classmethod
    def parse(cls, spec: str | Target) -> Target:
        """From ``"accuracy>=0.98"`` or ``"loss<=1.7"``."""
        if isinstance(spec, Target):
            return spec
        m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*(\S+)\s*", spec) if isinstance(spec, str) else None
        if not m:
            raise ValueError(f"bad target {spec!r}: write METRIC>=VALUE or METRIC<=VALUE, e.g. accuracy>=0.98, "
                             "loss<=1.7")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"bad target {spec!r}: {m.group(3)!r} is not a number") from None
        return cls(m.group(1), m.group(2), value)

    def reached(self, value: float) -> bool:
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


# ------------------------------------------------------------------ data access


class Batches:
    """Uniform access to a data set: ``len`` and ``batch(indices) -> (inputs, targets)``."""

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"a data set needs __len__; got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.dataset
        if hasattr(ds, "batch"):
            return ds.batch(idx)
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors[0], ds.tensors[1]
            return x[idx], y[idx]
        return tuple(default_collate([ds[int(i)] for i in idx]))  # type: ignore[return-value]

    def labels(self) -> torch.Tensor | None:
        """Integer class labels of every example, if the set has them (for Dirichlet sharding)."""
        ds = self.dataset
        if isinstance(ds, TensorDataset) and ds.tensors[1].dim() == 1:
            return ds.tensors[1].long()
        for name in ("labels", "targets"):
            y = getattr(ds, name, None)
            if isinstance(y, torch.Tensor) and y.dim() == 1:
                return y.long()
        return None


@dataclass
class CharWindows:
    """Windows of ``context`` characters of a corpus and the same windows shifted by one (the next
    characters to predict). Example i starts at ``i * stride``."""

    corpus: datasets.CharCorpus
    context: int
    stride: int = 1

    def __len__(self) -> int:
        return max(0, (len(self.corpus) - self.context - 1) // self.stride + 1)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = idx.long() * self.stride
        offsets = torch.arange(self.context + 1)
        rows = self.corpus.ids[starts[:, None] + offsets[None, :]]
        return rows[:, :-1], rows[:, 1:]


# ------------------------------------------------------------------ losses and metrics


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over every prediction; works for (B, C) and sequence (B, T, C) outputs."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in evaluation mode inside; after (an error too), every submodule back in the mode
    it had: a training model may hold submodules its owner keeps in evaluation mode (frozen batch
    norm), which ``model.train()`` would switch back to training. A model all in evaluation mode
    is left as it is (reading the flags is cheaper than setting them: Module.eval walks every
    submodule, 0.05 ms of a 2-example evaluation's 0.5). The flags are set back directly: a module's
    own ``train()`` override does not run on the way back."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def classification_metrics(model: nn.Module, data: Batches, loss: Callable = cross_entropy,
                           batch_size: int = 250) -> dict[str, float]:
    """Mean ``loss`` (nats per prediction) and ``accuracy`` (argmax of the last dimension), plus
    ``bits_per_token`` = loss / ln 2, over every example of ``data``, ``batch_size`` examples per
    forward pass (250: for the built-in CNN on one thread 30% faster than 500, which overflows
    the caches)."""
    total, correct, count = 0.0, 0, 0
    with evaluation_mode(model):
        for i in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(i, min(i + batch_size, len(data))))
            out = model(x)
            n = y.numel()
            total += float(loss(out, y)) * n
            correct += int((out.argmax(-1) == y).sum())
            count += n
    mean = total / max(count, 1)
    return {"loss": mean, "accuracy": correct / max(count, 1), "bits_per_token": mean / math.log(2)}


CLASSIFICATION_METRICS = ("loss", "accuracy", "bits_per_token")   # what classification_metrics returns
CLASSIFICATION_RANGES = {"loss": (0.0, math.inf), "accuracy": (0.0, 1.0), "bits_per_token": (0.0, math.inf)}


def adamw(params: Iterable[nn.Parameter], lr: float = 2e-3, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW, the inner optimizer of every built-in workload."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------ the workload


@dataclass
class Workload:
    """What every node trains.

    ``model()``: a fresh model (called on every node after the same seed, so all start equal).
    ``data()``: ``(train set, evaluation set)``, loaded in each node process; pysim shards the
    train set across nodes. ``loss(outputs, targets)``: the training loss. ``metrics(model,
    data)``: a dict of evaluation metrics on a data set (``Batches``). ``optimizer(params)``: the
    inner optimizer; pysim adds the warm-up/cosine learning-rate schedule. ``target``: the goal
    whose simulated time the report gives. ``check()``: an optional fast check before any node
    starts (data files present). ``spec`` and ``args``: what :func:`get_workload` rebuilds a
    built-in from (None for a user's workload). ``train_size``: examples in the training set,
    if known before loading (lets a too-large batch fail before any node starts).
    ``split_evaluation``: every node evaluates a share of the evaluation examples and the
    shares' metrics are combined as example-weighted means (exact for metrics that are means
    over examples, as ``classification_metrics``'s are); False: node 0 evaluates alone.
    ``defaults``: the study this workload is meant for, as command-line defaults of
    ``python -m pysim compare`` (``steps``, ``batch_size``, ``nodes``, ``eval_every``,
    ``eval_subset``); flags override them. ``reports``: the names of the metrics ``metrics``
    returns, where known without trying it (built-ins; a user's workload is tried once before
    training, :mod:`pysim.probe`).
    """

    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[Any, Any]]
    target: Target = field(default_factory=lambda: Target("accuracy", ">=", 0.98))
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    metrics: Callable[..., dict[str, float]] = classification_metrics
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = adamw
    check: Callable[[], None] | None = None
    spec: str | None = None
    args: dict = field(default_factory=dict)
    train_size: int | None = None
    split_evaluation: bool = True
    defaults: dict[str, Any] = field(default_factory=dict)
    reports: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Fails fast, in one line, for a workload the node processes could not use."""
        for name in ("model", "data", "loss", "metrics", "optimizer"):
            if not callable(getattr(self, name)):
                raise ValueError(f"workload {self.name!r}: {name} must be callable")
        self.target = Target.parse(self.target)
        try:
            pickle.dumps(self)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(
                f"workload {self.name!r} cannot reach the node processes ({e}); define its factories at module "
                "level of an importable file (no lambdas or nested functions) and guard your script's entry "
                "point with `if __name__ == '__main__':`") from None
        if self.check is not None:
            self.check()


# ------------------------------------------------------------------ built-in workloads


def _image_model(shape: tuple[int, int, int], classes: int) -> nn.Module:
    return ImageCNN(shape[0], shape[1], shape[2], classes)


def _image_data(data_dir: str | None) -> tuple[datasets.ImageSet, datasets.ImageSet]:
    return datasets.load_image_set(data_dir)


def image_workload(data_dir: str | Path | None = None, lr: float = 2e-3, target: str | Target = "accuracy>=0.98",
                   weight_decay: float = 0.01) -> Workload:
    """The CNN on an IDX image set (default: the shipped MNIST). Image size and class count are read
    from the files' headers and labels here, before any node starts."""
    folder = None if data_dir is None else str(data_dir)
    root = datasets.data_dir(folder, datasets.MNIST_DIR, "IDX image set")
    datasets.check_image_set(root)
    test = datasets.load_idx_split(root, "test")
    train_labels = datasets.read_idx(root / datasets.IDX_FILES[("train", "labels")])
    classes = int(max(int(train_labels.max()), int(test.labels.max()))) + 1
    is_mnist = root.resolve() == datasets.MNIST_DIR.resolve()
    return Workload(
        name="mnist" if is_mnist else f"idx:{root.name}",
        model=partial(_image_model, test.image_shape, classes),
        data=partial(_image_data, folder),
        target=Target.parse(target),
        optimizer=partial(adamw, lr=lr, weight_decay=weight_decay),
        check=partial(datasets.check_image_set, folder),
        spec="mnist" if is_mnist and folder is None else f"idx:{root}",
        train_size=len(train_labels),
        defaults={"steps": 600, "batch_size": 64, "nodes": 2, "eval_every": 25, "eval_subset": 2000},
        reports=CLASSIFICATION_METRICS,
    )


@dataclass(frozen=True)
class GPTConfig:
    """Size of the character GPT: context (characters), layers, heads, width."""

    context: int = 64
    layers: int = 4
    heads: int = 4
    dim: int = 128


def _gpt_model(vocab: int, cfg: GPTConfig) -> nn.Module:
    return CharGPT(vocab, cfg.context, cfg.layers, cfg.heads, cfg.dim)


def _shakespeare_data(data_dir: str | None, context: int, eval_chars: int | None) -> tuple[CharWindows, CharWindows]:
    train, val = datasets.load_shakespeare(data_dir)
    if eval_chars is not None:
        val = datasets.CharCorpus(val.ids[:eval_chars], val.vocab)
    return CharWindows(train, context), CharWindows(val, context, stride=context)


def shakespeare_workload(data_dir: str | Path | None = None, lr: float = 3e-3, target: str | Target = "loss<=2.0",
                         gpt: GPTConfig = GPTConfig(), weight_decay: float = 0.01,
                         eval_chars: int | None = None) -> Workload:
    """The character GPT on Tiny Shakespeare. Metrics on the validation text: ``loss`` in nats per
    character, ``bits_per_token`` (bits per character) and next-character ``accuracy``.
    ``eval_chars`` limits the validation text (tests)."""
    folder = None if data_dir is None else str(data_dir)
    datasets.check_shakespeare(folder)
    root = datasets.data_dir(folder, datasets.SHAKESPEARE_DIR, "Tiny Shakespeare")
    text = (root / "input.txt").read_bytes().decode("utf-8")
    vocab = len(set(text))
    return Workload(
        name="shakespeare",
        model=partial(_gpt_model, vocab, gpt),
        data=partial(_shakespeare_data, folder, gpt.context, eval_chars),
        target=Target.parse(target),
        optimizer=partial(adamw, lr=lr, weight_decay=weight_decay),
        check=partial(datasets.check_shakespeare, folder),
        spec="shakespeare" if folder is None else f"shakespeare:{root}",
        train_size=int(len(text) * 0.9) - gpt.context,
        defaults={"steps": 500, "batch_size": 16, "nodes": 4, "eval_every": 25, "eval_subset": 64},
        reports=CLASSIFICATION_METRICS,
    )


#: Workloads registered by name (:func:`register_workload`), e.g. by a module given to ``--import``.
WORKLOADS: dict[str, Callable[..., Workload]] = {}


def register_workload(name: str, factory: Callable[..., Workload]) -> Callable[..., Workload]:
    """Makes ``--workload NAME`` build ``factory()`` (a module-level function returning a
    :class:`Workload`). Usable as a decorator: ``@register_workload("blobs")``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) or name in BUILT_IN:
        raise ValueError(f"workload name {name!r} must be a word (letters, digits, _ . -) other than the "
                         f"built-ins {', '.join(BUILT_IN)}")
    if not callable(factory):
        raise ValueError(f"workload {name!r}: the factory must be callable")
    WORKLOADS[name] = factory
    return factory


BUILT_IN = ("mnist", "idx", "shakespeare")


def get_workload(spec: str, **kwargs: Any) -> Workload:
    """A built-in workload: ``mnist``, ``idx:DIR`` or ``shakespeare[:DIR]``; ``kwargs`` (JSON-able:
    ``lr``, ``target``, ``weight_decay``; ``gpt`` as a dict, ``eval_chars``) go to its builder."""
    kind, _, arg = spec.partition(":")
    args = {k: str(v) if isinstance(v, Target) else v for k, v in kwargs.items()}
    built = {k: GPTConfig(**v) if k == "gpt" and isinstance(v, dict) else v for k, v in args.items()}
    if kind == "mnist" and not arg:
        wl = image_workload(None, **built)
    elif kind == "idx" and arg:
        wl = image_workload(arg, **built)
    elif kind == "shakespeare":
        wl = shakespeare_workload(arg or None, **built)
    else:
        known = ", ".join(["mnist", "idx:DIR (an IDX image set)", "shakespeare[:DIR]", *sorted(WORKLOADS)])
        raise ValueError(f"unknown workload {spec!r}; known: {known}, or package.module:function (a factory "
                         "returning a Workload)")
    wl.args = {k: asdict(v) if isinstance(v, GPTConfig) else v for k, v in args.items()}
    return wl
