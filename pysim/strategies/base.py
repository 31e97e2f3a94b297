"""The Strategy base class, communication steps, and the registry of strategies by name.

A strategy is a local optimizer step plus an ordered list of communication
steps (:class:`CommStep`). On every node the Trainer calls ``setup`` once, then
for each step ``loss.backward()`` (unless ``trains(step)`` says the node sits
this step out) followed by ``strategy.step(step)``, which runs

1. every comm step's ``before_local_step`` (in order; e.g. average the gradients),
2. ``local_step()`` (the inner optimizer, if the node trains this step, and its scheduler),
3. every comm step's ``after_local_step`` (in order; e.g. average some parameters).

A strategy's own randomness (SPARTA's indices, FedAvg's cohorts and islands,
PowerSGD's first Q) comes from its ``seed`` argument if given, else from the
run's seed (``setup(..., seed=)``): two seeds of a comparison draw differently.
The model a run scores is ``eval_model()`` of node ``deployer(step)`` (node 0
unless the strategy says that another node holds the model it would deploy).

Local arithmetic runs inside ``strategy.compute()`` so it counts as compute
time; communication goes through ``strategy.comm``. A subclass registers itself
under its ``name`` (see :data:`STRATEGIES`); ``example/custom_strategy.py``
shows a new algorithm in ~20 lines.
"""

from __future__ import annotations

import inspect
import math
import warnings
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
from torch import nn

from pysim.comm import Comm

#: Every registered strategy class by lower-case name (subclasses of Strategy add themselves).
STRATEGIES: dict[str, type[Strategy]] = {}


FLOAT32_MAX = float(torch.finfo(torch.float32).max)   # the largest factor a float32 step can take


def real_in(value, what: str, low: float, high: float, low_closed: bool = False, high_closed: bool = False) -> float:
    """``value`` as a float where it is a number (not a bool) in the interval from ``low`` to
    ``high`` (closed where said); else a one-line ValueError naming ``what``."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    try:
        x = float(value) if ok else math.nan
    except OverflowError:   # an int beyond any float
        x = math.inf
    above = x >= low if low_closed else x > low
    below = x <= high if high_closed else x < high
    if not (above and below):
        interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ValueError(f"{what} must be a number in {interval}, got {value!r:.40}")
    return x


def check_outer_step(outer_lr, outer_momentum) -> None:
    """One-line ValueErrors for an outer SGD step's learning rate (> 0) and momentum (in [0, 1))."""
    real_in(outer_lr, "outer_lr", 0, FLOAT32_MAX, high_closed=True)
    real_in(outer_momentum, "outer_momentum", 0, 1, low_closed=True)


def check_seed(seed, what: str = "", optional: bool = True) -> None:
    """A one-line ValueError unless ``seed`` is an integer in [0, 2^63), or None where ``optional``
    (a strategy's own seed: None takes the run's). ``what`` names whose seed it is."""
    if optional and seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        name = f"{what} seed" if what else "seed"
        none = " or None (the run's seed)" if optional else ""
        raise ValueError(f"{name} must be an integer in [0, 2^63){none}, got {seed!r:.40}")


def split_like(flat: torch.Tensor, tensors) -> list[torch.Tensor]:
    """Views of consecutive pieces of ``flat`` shaped like ``tensors`` (the inverse of cat of reshape(-1))."""
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class CommStep:
    """One communication step of a strategy, run around the local optimizer step.

    ``setup(strategy)`` binds it to a node's strategy (model, optimizer, comm);
    ``before_local_step`` / ``after_local_step`` do the work; ``eval_model``
    returns the model this step would deploy, or None if it has no opinion.
    ``label`` names its configuration for tables (e.g. "p=0.005")."""

    label: str = ""

    def setup(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def check(self, nodes: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Raises a one-line ValueError where this step cannot run on ``nodes`` nodes with ``model``
        and its ``optimizer`` (see :meth:`Strategy.check`). Nothing by default."""

    def before_local_step(self, step: int, last: bool) -> None:
        pass

    def after_local_step(self, step: int, last: bool) -> None:
        pass

    def eval_model(self) -> nn.Module | None:
        return None

    def trains(self, step: int) -> bool:
        """Whether this node trains at ``step`` (see :meth:`Strategy.trains`); True by default."""
        return True

    def deployer(self, step: int) -> int | None:
        """The node whose deployed model a run scores after ``step``, or None for no opinion."""
        return None


class Strategy:
    """Base class: plain local training (no communication). Subclasses set ``comm_steps``
    in ``__init__`` and/or override ``local_step`` or ``step``."""

    name: ClassVar[str] = "Local"      # the registry key (case-insensitive); defaults to the class name
    # bumped when a change makes the same spec compute something else: a finished run made before
    # is not kept by ``--resume`` (it is part of the run's identity where it is not 0)
    revision: ClassVar[int] = 0
    asynchronous: ClassVar[bool] = False   # orders its numerics by simulated time (needs a compute profile)
    comm_steps: tuple[CommStep, ...] = ()

    def __init__(self) -> None:
        """Plain local training takes no arguments (a subclass's ``__init__`` takes its own)."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        self._given = {k: v for k, v in bound.arguments.items() if k != "self"}  # for ``spec``
        return self

    def __init_subclass__(cls, register: bool = True, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__
        if register:
            key = cls.name.lower()
            old = STRATEGIES.get(key)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise ValueError(f"strategy name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; "
                                 f"give {cls.__qualname__} another ``name``")
            STRATEGIES[key] = cls

    # ------------------------------------------------------------ naming

    @property
    def label(self) -> str:
        """A short string naming this configuration, e.g. ``DiLoCo H=25 lowrank:8+EF outer 1.0/0.5``."""
        return " ".join([self.name] + [s.label for s in self.comm_steps if s.label])

    @property
    def spec(self) -> str:
        """The string that recreates this strategy with ``make_strategy(spec)``."""
        if not self._given:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self._given.items())})"

    def __repr__(self) -> str:
        return self.spec

    # ------------------------------------------------------------ lifecycle

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm, scheduler=None,
              seed: int = 0, examples: list[int] | None = None, steps: int | None = None,
              batch_size: int | None = None) -> None:
        """Binds the strategy to a node. ``seed``: the run's seed (see the module docstring);
        ``examples``: every node's number of training examples (None: equal); ``steps``: the
        run's number of steps, if known; ``batch_size``: the examples of a node's batch, if known."""
        self.check(comm.world, model, optimizer)
        self.model, self.optimizer, self.comm, self.scheduler = model, optimizer, comm, scheduler
        self.run_seed, self.total_steps, self.batch_size = seed, steps, batch_size
        self.examples = list(examples) if examples is not None else [1] * comm.world
        named = list(model.named_parameters())  # cached: walking the module tree every step costs ~0.4 ms
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        # the parameters' shapes as text: what a block over them (or over buffers shaped like them)
        # names in ``compute(reuse=...)``, its counted work depending on them
        self.param_shapes = str([tuple(p.shape) for p in self.params])
        self._training = True
        for s in self.comm_steps:
            s.setup(self)

    def check(self, nodes: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Raises a one-line ValueError where this strategy cannot run on ``nodes`` nodes with
        ``model`` trained by ``optimizer`` (None: not known yet). ``TrainConfig.check`` calls it
        before any node process starts, with the model on torch's meta device (shapes and types,
        no values); ``setup`` calls it on every node. Default: every comm step's check."""
        for s in self.comm_steps:
            s.check(nodes, model, optimizer)

    def seeded(self, seed: int | None) -> int:
        """``seed`` if given, else the run's seed."""
        return self.run_seed if seed is None else seed

    def trains(self, step: int) -> bool:
        """Whether this node computes a gradient and takes its local step at ``step`` (0-based);
        all comm steps' say (FedAvg's clients outside a round's cohort sit it out)."""
        return all(s.trains(step) for s in self.comm_steps)

    def deployer(self, step: int) -> int:
        """The node whose ``eval_model()`` a run scores after ``step`` (0-based): the last comm
        step's with an opinion, else node 0. The same on every node."""
        for s in reversed(self.comm_steps):
            d = s.deployer(step)
            if d is not None:
                return d
        return 0

    def step(self, step: int, last: bool = False) -> None:
        self._training = self.trains(step)
        for s in self.comm_steps:
            s.before_local_step(step, last)
        self.local_step()
        for s in self.comm_steps:
            s.after_local_step(step, last)

    def local_step(self) -> None:
        """The inner optimizer's step (and its scheduler's), as compute. A node that sits a step
        out (``trains``) keeps its parameters; its learning-rate schedule still moves on."""
        with self.compute(reuse="local_step" if self._training else "idle_step"):
            if self._training:
                self.optimizer.step()
            self.step_schedule()

    def step_schedule(self) -> None:
        """The scheduler's step, if there is one. A strategy that steps the parameters itself
        (DeMo's sign step, DGC's SGD) or a node that sits its first steps out moves the schedule
        on with no ``optimizer.step()``, on purpose: step s uses the schedule's value at s either
        way. torch warns of that order on a scheduler's first step; that warning is silenced."""
        if self.scheduler is None:
            return
        if getattr(self, "_schedule_started", False):
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self._schedule_started = True

    def eval_model(self) -> nn.Module:
        """The model this node would deploy (it holds it; nothing is exchanged to make it). The
        last comm step with an opinion decides; without one, this node's model."""
        for s in reversed(self.comm_steps):
            m = s.eval_model()
            if m is not None:
                return m
        return self.model

    # ------------------------------------------------------------ helpers

    def compute(self, reuse: str | None = None) -> AbstractContextManager:
        """Context manager: the body counts as this node's compute time. ``reuse`` names a block
        that does the same work every time (see :meth:`pysim.compute.ComputeMeter.measure`)."""
        return self.comm.meter.measure(reuse=reuse)

    def lr(self) -> float:
        """The inner optimizer's current learning rate (its first parameter group's)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def schedule_factor(self) -> float:
        """The run's warm-up/cosine schedule now, as a factor of the inner optimizer's base rate:
        what a strategy that steps the parameters with a learning rate of its own scales it by."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("initial_lr", group["lr"])

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def flat_grads(self) -> torch.Tensor:
        """All gradients as one vector (the order of ``set_grads``)."""
        return torch.cat([g.reshape(-1) for g in self.grads()])

    def set_grads(self, flat: torch.Tensor, copy: bool = True) -> None:
        """Every gradient from one vector (the order of ``flat_grads``): each parameter's gradient
        a view of a copy of ``flat`` (as DDP's ``gradient_as_bucket_view``), or of ``flat`` itself
        with ``copy=False``, for a ``flat`` the caller owns and no longer uses (a collective's new
        result): an optimizer or clipping that writes a gradient then writes ``flat``."""
        for p, g in zip(self.params, split_like(flat.clone() if copy else flat, self.params), strict=True):
            p.grad = g


class OwnUpdate(Strategy, register=False):
    """A strategy whose paper steps the parameters with a rule of its own (DGC's SGD, PowerSGD's
    momentum SGD), at its own learning rate times the run's warm-up/cosine schedule factor, and
    whose ``optimizer="inner"`` variant hands the averaged gradient to the workload's optimizer
    instead. A subclass calls :meth:`choose_optimizer` in ``__init__`` and writes :meth:`own_update`."""

    optimizer_kind = "sgd"

    def choose_optimizer(self, optimizer: str, own: tuple[str, ...]) -> None:
        """Takes ``optimizer``: "sgd" (the paper's rule) or "inner" (the workload's optimizer),
        refusing with "inner" any of ``own``, the arguments of the rule it would then not use."""
        if optimizer not in ("sgd", "inner"):
            raise ValueError(f"{self.name} optimizer must be 'sgd' (the paper's) or 'inner' (the workload's), got "
                             f"{optimizer!r:.40}")
        unused = sorted(set(own) & set(self._given))
        if optimizer == "inner" and unused:
            raise ValueError(f"{self.name}'s {', '.join(unused)} set its own update; with optimizer='inner' the "
                             f"workload's optimizer steps (at the run's --lr): drop {', '.join(unused)}")
        self.optimizer_kind = optimizer

    def local_step(self) -> None:
        """The paper's update (:meth:`own_update`) as compute, then the schedule; or the workload's optimizer."""
        if self.optimizer_kind == "inner" or not self._training:
            super().local_step()
            return
        factor = self.schedule_factor()
        with self.compute(reuse=f"{self.name} own update"), torch.no_grad():
            self.own_update(factor)
            self.step_schedule()

    def own_update(self, factor: float) -> None:
        """Steps the parameters from their (averaged) gradients; ``factor``: the run's schedule now."""
        raise NotImplementedError


STRATEGIES[Strategy.name.lower()] = Strategy
