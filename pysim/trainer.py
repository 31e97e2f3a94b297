"""The Trainer: N node processes train a model with a strategy over a simulated network.

Each node trains on its own shard of the training set. Node 0 evaluates the
strategy's model on the full test set every ``eval_every`` steps and at the
end. The run's result (JSON + per-step CSV) and its trace (for replay under
other networks) are written to ``out_dir``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pysim.clock import replay
from pysim.compute import ComputeProfile, calibrate_machine, calibrate_step, resolve_compute, step_key
from pysim.launch import run_nodes
from pysim.network import Network, network_from_json, network_to_json
from pysim.node import StepRecord, train_node
from pysim.sharding import Sharding
from pysim.strategies import make_strategy
from pysim.trace import Trace, trace_from_nodes
from pysim.workload import Target, Workload, get_workload

RESULT_VERSION = 2
NODE_MEMORY_BYTES = 300 << 20  # a node process: torch, its data shard, model and buffers (measured ~250 MiB)


def available_memory() -> int:
    """Bytes of memory available for new processes (Linux MemAvailable; 16 GiB if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def max_nodes() -> int:
    """How many node processes this machine's memory can hold."""
    return max(1, available_memory() // NODE_MEMORY_BYTES)


@dataclass
class TrainConfig:
    """Everything a run depends on. Units: seconds, bytes.

    ``workload``: what is trained (a :class:`~pysim.workload.Workload`, or a built-in's name
    such as ``"mnist"``); ``target`` overrides the workload's. ``sharding``: ``iid``,
    ``contiguous`` or ``dirichlet:ALPHA``. ``eval_every``: steps between evaluations on
    ``eval_subset`` examples of the evaluation set (None: all); the final metrics use all.
    ``train_examples`` keeps only the first N training examples (quick studies, tests).
    ``compute``: how compute time is charged (see :mod:`pysim.compute`); ``profile`` is
    the resolved profile (set by :meth:`check`, or given: a comparison shares one).
    """

    workload: Workload | str = "mnist"
    strategy: str = "SimpleReduce"
    strategy_args: dict = field(default_factory=dict)
    nodes: int = 2
    network: Network = field(default_factory=lambda: Network.uniform(2, "100Mbit", "20ms"))
    steps: int = 600
    batch_size: int = 64
    warmup_steps: int = 30
    eval_every: int = 100
    eval_subset: int | None = None
    seed: int = 0
    compute: str = "measured"          # "calibrated", "profile:FILE" or a device: "cpu", "a100", "h100", ...
    algorithm: str = "ring"            # all-reduce algorithm: "ring" or "star"
    sharding: Sharding | str = "iid"
    train_examples: int | None = None
    target: Target | str | None = None
    label: str | None = None
    profile: ComputeProfile | None = None

    def __post_init__(self) -> None:
        if isinstance(self.workload, str):
            self.workload = get_workload(self.workload)
        self.sharding = Sharding.parse(self.sharding)
        if self.target is not None:
            self.target = Target.parse(self.target)

    def check(self) -> None:
        """Validates everything before any node process starts; one-line errors."""
        for name in ("nodes", "steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        limit = max_nodes()
        if self.nodes > limit:
            raise ValueError(f"{self.nodes} nodes need about {self.nodes * NODE_MEMORY_BYTES / 2**30:.0f} GiB "
                             f"({NODE_MEMORY_BYTES >> 20} MiB per node process) but this machine has "
                             f"{available_memory() / 2**30:.1f} GiB available: use at most {limit} nodes")
        for name in ("eval_subset", "train_examples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.profile is None and self.compute != "calibrated":
            self.profile = resolve_compute(self.compute)
        if self.algorithm not in ("ring", "star"):
            raise ValueError(f"algorithm must be 'ring' or 'star', got {self.algorithm!r}")
        self.network = self.network.with_nodes(self.nodes)
        make_strategy(self.strategy, **self.strategy_args)  # fails early on bad arguments
        self.workload.validate()  # picklable, data present and not corrupt: reported here, not by every node
        size = self.workload.train_size
        if size is not None:
            size = min(size, self.train_examples or size)
            if self.sharding.kind != "dirichlet" and self.batch_size > size // self.nodes:
                raise ValueError(f"batch size {self.batch_size} exceeds each node's shard of {size // self.nodes} "
                                 f"training examples ({size} over {self.nodes} nodes); use --batch-size "
                                 f"{max(1, size // self.nodes)} or less")

    @property
    def name(self) -> str:
        return self.label or self.strategy

    @property
    def goal(self) -> Target:
        """The target of this run: the config's, else the workload's."""
        return self.target or self.workload.target

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["workload"] = {"name": self.workload.name, "spec": self.workload.spec, "args": self.workload.args}
        d["network"] = network_to_json(self.network)
        d["sharding"] = str(self.sharding)
        d["target"] = None if self.target is None else str(self.target)
        d["profile"] = None if self.profile is None else asdict(self.profile)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        w = d["workload"]
        if not w.get("spec"):
            raise ValueError(f"workload {w.get('name')!r} is user-defined; only built-in workloads can be "
                             "rebuilt from a config file")
        d["workload"] = get_workload(w["spec"], **w.get("args", {}))
        d["network"] = network_from_json(d["network"])
        d["profile"] = None if d.get("profile") is None else ComputeProfile(**d["profile"])
        return cls(**d)


def crossing_step(evals: list[tuple[int, float]], target: Target) -> tuple[float, int, int] | None:
    """Where the metric first reaches ``target``: (fractional step, step of the evaluation before,
    step of the first evaluation at or past it), None if never. The step is linearly interpolated
    in the metric between the two evaluations; before the first evaluation there is nothing to
    interpolate from (the bracket then starts at step 0 and the crossing is put at its end)."""
    prev = None
    for step, value in evals:
        if target.reached(value):
            if prev is None:
                return float(step), 0, step
            s0, v0 = prev
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


def metric_series(result: dict, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` at every evaluation of a run."""
    return [(e["step"], e["metrics"][metric]) for e in result["evals"] if metric in e["metrics"]]


def time_to_target(result: dict, target: Target, step_end_s: np.ndarray | None = None
                   ) -> tuple[float, float, float] | None:
    """(time, lower, upper) in simulated seconds at which a run reached ``target``: interpolated
    between evaluations, bracketed by the evaluations around the crossing; None if never.
    ``step_end_s``: the run's step end times (default: as recorded); a replay's re-times it."""
    crossing = crossing_step(metric_series(result, target.metric), target)
    if crossing is None:
        return None
    ends = np.array([r["sim_time_s"] for r in result["steps"]]) if step_end_s is None else step_end_s
    return tuple(float(time_at_step(ends, s)) for s in crossing)  # type: ignore[return-value]


def calibrate(cfg: TrainConfig, profile: ComputeProfile | None = None) -> ComputeProfile:
    """A compute profile of this machine holding the measured forward+backward step of ``cfg``'s
    model and batch (adds the step to ``profile`` if given). Runs here, before any node starts."""
    import torch

    from pysim.node import ShardSampler
    from pysim.workload import Batches

    profile = profile or calibrate_machine()
    train_set, _ = cfg.workload.data()
    data = Batches(train_set)
    torch.manual_seed(cfg.seed)
    model = cfg.workload.model()
    sampler = ShardSampler(data, torch.arange(len(data)), cfg.batch_size, cfg.seed)

    def step() -> None:
        x, y = sampler.next()
        model.zero_grad()
        cfg.workload.loss(model(x), y).backward()

    calibrate_step(profile, step_key(cfg.workload.name, sum(p.numel() for p in model.parameters()), cfg.batch_size),
                   step)
    return profile


def run(cfg: TrainConfig, out_dir: str | Path | None = None, timeout_s: float = 300.0) -> dict:
    """Trains ``cfg`` in ``cfg.nodes`` processes; returns (and writes) the result. With
    ``compute="calibrated"`` and no profile, the machine and step are calibrated first."""
    cfg.check()
    if cfg.compute == "calibrated" and cfg.profile is None:
        cfg.profile = calibrate(cfg)
    t0 = time.perf_counter()
    nodes = run_nodes(train_node, cfg.nodes, (cfg,), timeout_s=timeout_s)
    runtime_s = time.perf_counter() - t0
    trace = trace_from_nodes([r["segments"] for r in nodes], nodes[0]["step_ends"])
    timeline = replay(trace, cfg.network)
    live = [r["steps"][-1][1] for r in nodes]
    if list(timeline.end_s[-1]) != live:  # the invariant everything else rests on
        raise RuntimeError(f"live clock {live} and replay {list(timeline.end_s[-1])} disagree")
    n = cfg.nodes
    steps = []
    for k in range(cfg.steps):
        rows = [StepRecord(*r["steps"][k]) for r in nodes]
        steps.append({
            "step": k + 1,
            "loss": sum(row.loss for row in rows) / n,
            "sim_time_s": float(timeline.step_end_s[k]),
            "bytes_sent_per_node": sum(row.bytes_sent for row in rows) / n,
            "bytes_received_per_node": sum(row.bytes_received for row in rows) / n,
            "compute_s": max(row.compute_s for row in rows),
            "comm_s": max(row.comm_s for row in rows),
        })
    evals = [{"step": s, "sim_time_s": steps[s - 1]["sim_time_s"], "metrics": metrics, "examples": examples,
              "bytes_sent_per_node": steps[s - 1]["bytes_sent_per_node"]}
             for s, metrics, examples in nodes[0]["evals"]]
    sent, recv = trace.bytes_per_node()
    result = {
        "version": RESULT_VERSION,
        "name": cfg.name,
        "label": cfg.name,
        "config": cfg.to_json(),
        "network": cfg.network.describe(),
        "target": str(cfg.goal),
        "steps": steps,
        "evals": evals,
    }
    reached = time_to_target(result, cfg.goal)
    result["final"] = {
        "metrics": nodes[0]["final_metrics"],
        "sim_time_s": float(timeline.total_s),
        "time_to_target_s": None if reached is None else reached[0],
        "time_to_target_bracket_s": None if reached is None else list(reached[1:]),
        "bytes_sent_per_node": sum(sent) / n,
        "bytes_received_per_node": sum(recv) / n,
        "compute_s": steps[-1]["compute_s"],
        "comm_s": steps[-1]["comm_s"],
        "real_runtime_s": runtime_s,
    }
    if out_dir is not None:
        save_result(result, trace, out_dir)
    result["trace"] = trace
    return result


def save_result(result: dict, trace: Trace, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", result["name"]).strip("_")
    body = {k: v for k, v in result.items() if k != "trace"}
    (out / f"{stem}.json").write_text(json.dumps(body, indent=1))
    trace.save(out / f"{stem}.trace.json")
    ev = {e["step"]: e["metrics"] for e in result["evals"]}
    metrics = list(dict.fromkeys(k for m in ev.values() for k in m))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["steps"][0]) + [f"eval_{m}" for m in metrics])
        w.writeheader()
        for row in result["steps"]:
            e = ev.get(row["step"], {})
            w.writerow({**row, **{f"eval_{m}": e.get(m, "") for m in metrics}})
    return out / f"{stem}.json"


def load_result(path: str | Path) -> tuple[dict, Trace]:
    """A saved result and its trace; clear errors for missing or incompatible files."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no results file {p}")
    try:
        result = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not a pysim results file ({e})") from None
    if not isinstance(result, dict) or result.get("version") != RESULT_VERSION:
        got = result.get("version") if isinstance(result, dict) else None
        raise ValueError(f"{p} has results format version {got!r}; this pysim reads version {RESULT_VERSION}. "
                         "Re-run the training with this version")
    trace_path = p.with_name(p.name[:-len(".json")] + ".trace.json")
    if not trace_path.is_file():
        raise ValueError(f"{p} has no trace beside it ({trace_path.name}); replay needs it")
    return result, Trace.load(trace_path)
