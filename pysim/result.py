"""What a run reports: typed records, their JSON form, and when a run reached its target.

A :class:`Result` holds one row per training step (:class:`StepRow`), one per
evaluation (:class:`Evaluation`), the final figures (:class:`Final`), the run's
configuration as JSON (``config``: :meth:`pysim.config.TrainConfig.to_json`) and,
in memory, its trace. ``to_json`` / ``from_json`` are the only places that name
the fields of ``result.json``; everything else reads attributes.

JSON versions: 3 adds ``final.diverged_at_step``; version 2 (without it) still loads.

Time to target. :func:`crossing_step` finds where a metric first reaches a target
between evaluations, :func:`time_at_step` reads the simulated time at a
(fractional) step, :func:`time_to_target` combines them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pysim.clock import ComputeScaling
from pysim.trace import Trace
from pysim.workload import Target

RESULT_VERSION = 3
READS_RESULT_VERSIONS = (2, 3)
BASELINE = "SimpleReduce"   # the strategy every comparison and sweep measures the others against


@dataclass
class StepRow:
    """One training step, averaged over nodes where it is per node."""

    step: int                        # 1-based
    loss: float                      # mean training loss of the nodes' batches
    sim_time_s: float                # simulated time at the end of the step (the slowest node's clock)
    bytes_sent_per_node: float       # packet bytes sent so far, mean over nodes
    bytes_received_per_node: float
    compute_s: float                 # compute time so far, the largest over nodes (s)
    comm_s: float                    # time so far in or waiting for collectives, the largest over nodes (s)


@dataclass
class Evaluation:
    """An evaluation of the deployed model after ``step`` steps."""

    step: int
    sim_time_s: float
    metrics: dict[str, float]
    examples: int                    # evaluation examples used (a subset, or the whole set)
    bytes_sent_per_node: float


@dataclass
class Final:
    """The run's final figures."""

    metrics: dict[str, float]        # on the whole evaluation set
    sim_time_s: float                # simulated wall-clock of the whole run
    time_to_target_s: float | None   # None: never reached
    time_to_target_bracket_s: tuple[float, float] | None
    bytes_sent_per_node: float
    bytes_received_per_node: float
    compute_s: float
    comm_s: float
    idle_s: float                    # per node: simulated time in collectives or waiting for others
    real_runtime_s: float
    diverged_at_step: int | None = None   # the first step whose training loss was not finite


@dataclass
class Result:
    """One run: configuration, per-step rows, evaluations, final figures (see the module docstring)."""

    name: str                        # what it is saved under (label, and seed in comparisons)
    label: str                       # the strategy configuration, for tables
    config: dict[str, Any]           # TrainConfig.to_json()
    network: str                     # the network, in words
    target: Target
    steps: list[StepRow]
    evals: list[Evaluation]
    final: Final
    run_id: str | None = None        # given when saved
    version: int = RESULT_VERSION
    trace: Trace | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ the configuration, typed

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def strategy(self) -> str:
        """The strategy's spec as configured (e.g. ``"DiLoCo(H=10)"``)."""
        return str(self.config["strategy"])

    @property
    def nodes(self) -> int:
        return int(self.config["nodes"])

    @property
    def workload(self) -> str:
        """The workload's name (``mnist``, ``shakespeare``, a user's)."""
        return str(self.config["workload"]["name"])

    @property
    def scaling(self) -> ComputeScaling:
        """The compute scaling (stragglers, jitter) the run was timed with."""
        c = self.config
        return ComputeScaling(tuple(c.get("compute_speed") or ()), float(c.get("jitter") or 0.0), self.seed)

    @property
    def diverged(self) -> bool:
        return self.final.diverged_at_step is not None

    # ------------------------------------------------------------ derived figures

    def metric_series(self, metric: str) -> list[tuple[int, float]]:
        """(step, value) of ``metric`` at every evaluation."""
        return [(e.step, e.metrics[metric]) for e in self.evals if metric in e.metrics]

    def step_end_s(self) -> np.ndarray:
        """The simulated time at the end of every step, (steps,)."""
        return np.array([r.sim_time_s for r in self.steps])

    def time_to_target(self, target: Target | None = None, step_end_s: np.ndarray | None = None
                       ) -> tuple[float, float, float] | None:
        """See :func:`time_to_target`; ``target`` defaults to the run's own."""
        return time_to_target(self, target or self.target, step_end_s)

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` body (the trace is saved beside it, not in it)."""
        final = asdict(self.final)
        if final["time_to_target_bracket_s"] is not None:
            final["time_to_target_bracket_s"] = list(final["time_to_target_bracket_s"])
        out = {"version": self.version, "name": self.name, "label": self.label, "config": self.config,
               "network": self.network, "target": str(self.target), "steps": [asdict(r) for r in self.steps],
               "evals": [asdict(e) for e in self.evals], "final": final}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], trace: Trace | None = None) -> Result:
        """Reads :meth:`to_json`'s form, versions 2 and 3; one-line ValueError otherwise."""
        version = d.get("version") if isinstance(d, dict) else None
        if version not in READS_RESULT_VERSIONS:
            raise ValueError(f"results format version {version!r}; this pysim reads "
                             f"{', '.join(map(str, READS_RESULT_VERSIONS))}. Re-run the training with this version")
        try:
            final = dict(d["final"])
            bracket = final.get("time_to_target_bracket_s")
            final["time_to_target_bracket_s"] = None if bracket is None else tuple(bracket)
            final.setdefault("diverged_at_step", None)
            return cls(name=d["name"], label=d["label"], config=d["config"], network=d["network"],
                       target=Target.parse(d["target"]), steps=[_record(StepRow, r) for r in d["steps"]],
                       evals=[_record(Evaluation, e) for e in d["evals"]], final=_record(Final, final),
                       run_id=d.get("run_id"), version=RESULT_VERSION, trace=trace)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"result is malformed ({type(e).__name__}: {e}); was it written by pysim?") from None


def _record(cls, d: dict[str, Any]):
    """A record dataclass from its JSON dict; unknown or missing fields are a TypeError."""
    names = {f.name for f in fields(cls)}
    extra = set(d) - names
    if extra:
        raise TypeError(f"unknown {cls.__name__} fields {sorted(extra)}")
    return cls(**d)


# ---------------------------------------------------------------- time to target


def crossing_step(evals: list[tuple[int, float]], target: Target) -> tuple[float, int, int] | None:
    """Where the metric first reaches ``target``: (step, step of the evaluation before, step of the
    first evaluation at or past it), None if never. Evaluations one step apart (the node
    bisects to that resolution) give the first step that reached it, exactly; wider brackets
    are linearly interpolated in the metric between the two evaluations; before the first
    evaluation there is nothing to interpolate from (the bracket then starts at step 0 and the
    crossing is put at its end)."""
    prev = None
    for step, value in evals:
        if target.reached(value):
            if prev is None:
                return float(step), 0, step
            s0, v0 = prev
            if step - s0 <= 1:
                return float(step), s0, step
            frac = (target.value - v0) / (value - v0) if value != v0 else 1.0
            return s0 + (step - s0) * frac, s0, step
        prev = (step, value)
    return None


def time_at_step(step_end_s: np.ndarray, step: float) -> np.ndarray:
    """Simulated time at a fractional step, linear between step ends (``step_end_s[k]`` ends step
    k+1; step 0 is time 0). Works on (steps,) and (steps, networks) arrays."""
    k = min(int(math.floor(step)), len(step_end_s))
    t0 = step_end_s[k - 1] if k >= 1 else np.zeros_like(step_end_s[0])
    if step == k:
        return np.asarray(t0, dtype=np.float64)
    return t0 + (step - k) * (step_end_s[k] - t0)


def time_to_target(result: Result, target: Target, step_end_s: np.ndarray | None = None
                   ) -> tuple[float, float, float] | None:
    """(time, lower, upper) in simulated seconds at which a run reached ``target``: interpolated
    between evaluations, bracketed by the evaluations around the crossing; None if never.
    ``step_end_s``: the run's step end times (default: as recorded); a replay's re-times it."""
    crossing = crossing_step(result.metric_series(target.metric), target)
    if crossing is None:
        return None
    ends = result.step_end_s() if step_end_s is None else step_end_s
    return tuple(float(time_at_step(ends, s)) for s in crossing)  # type: ignore[return-value]
