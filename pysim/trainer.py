"""The Trainer: N node processes train a model with a strategy over a simulated network.

Each node trains on its own shard of the training set. Node 0 evaluates the
strategy's model on the full test set every ``eval_every`` steps and at the
end. The run's result (JSON + per-step CSV) and its trace (for replay under
other networks) are written to ``out_dir``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from pysim import checkpoint
from pysim.clock import ComputeScaling, replay
from pysim.compute import (
    ComputeProfile,
    calibrate_machine,
    calibrate_step,
    machine_cache_path,
    resolve_compute,
    step_key,
    this_machine,
)
from pysim.launch import run_nodes
from pysim.network import Network, network_from_json, network_to_json
from pysim.node import StepRecord, train_node
from pysim.results import RESULT_VERSION, check_out_dir, load_result, run_path, save_result, time_to_target
from pysim.sharding import Sharding
from pysim.strategies import make_strategy
from pysim.trace import event_from_json, trace_from_nodes
from pysim.workload import Target, Workload, get_workload

if TYPE_CHECKING:
    import torch

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
    ``resolve_target``: node 0 keeps each step's deployed model between evaluations and
    bisects to the first step that reached the target (time to target known to one step).
    ``train_examples`` keeps only the first N training examples (quick studies, tests).
    ``compute``: how compute time is charged (see :mod:`pysim.compute`); ``profile`` is
    the resolved profile (set by :meth:`check`, or given: a comparison shares one).
    ``compute_speed`` and ``jitter``: stragglers, applied by the clock to every node's compute
    (:class:`pysim.clock.ComputeScaling`: time / speed_i * exp(jitter * z), z ~ N(0, 1) per node
    and step, seeded by ``seed``); the numerics do not change, only when things happen.
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
    seed_in_name: bool = False         # save as "<name> seed<N>" (comparisons keep every seed in one folder)
    resolve_target: bool = True        # find the first step reaching the target by bisection (see pysim.node)
    checkpoint_every: int | None = None  # steps between checkpoints (with an out_dir; see pysim.checkpoint)
    compute_speed: tuple[float, ...] = ()  # per-node compute speed factors (1: as recorded; 0.5: half speed)
    jitter: float = 0.0                # sigma of the per-node, per-step lognormal compute-time factor

    def __post_init__(self) -> None:
        self.compute_speed = tuple(self.compute_speed)
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
        for name in ("eval_subset", "train_examples", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.profile is None and self.compute != "calibrated":
            self.profile = resolve_compute(self.compute)
        if self.compute_speed and len(self.compute_speed) != self.nodes:
            raise ValueError(f"--compute-speed gives {len(self.compute_speed)} speeds for {self.nodes} nodes; "
                             f"give one per node, e.g. {','.join(['1'] * (self.nodes - 1) + ['0.5'])}")
        self.scaling.speeds(self.nodes)  # ComputeScaling checks speeds and jitter
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
    def scaling(self) -> ComputeScaling:
        """The clock's compute scaling of this run (speeds and jitter, seeded by the run's seed)."""
        return ComputeScaling(self.compute_speed, self.jitter, self.seed)

    @property
    def name(self) -> str:
        """What ran, for tables and folders: ``label``, else the strategy's own label naming its
        configuration (e.g. ``DiLoCo H=25 lowrank:8+EF outer 1.0/0.5``)."""
        return self.label or make_strategy(self.strategy, **self.strategy_args).label

    @property
    def run_name(self) -> str:
        """The name the run is saved under (its folder in ``out_dir``)."""
        return f"{self.name} seed{self.seed}" if self.seed_in_name else self.name

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
        d["compute_speed"] = list(self.compute_speed)
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

    calibrate_step(profile, config_step_key(cfg, model), step)
    return profile


def config_step_key(cfg: TrainConfig, model: torch.nn.Module | None = None) -> str:
    """The compute-profile key of ``cfg``'s training step (its workload, model size and batch)."""
    return step_key(cfg.workload.name, model if model is not None else cfg.workload.model(), cfg.batch_size)


def machine_profile(cfg: TrainConfig, recalibrate: bool = False) -> tuple[ComputeProfile, str]:
    """This machine's compute profile holding ``cfg``'s step, and a phrase saying where it came
    from. The profile kept in :func:`pysim.compute.machine_cache_path` is reused when it has the
    step: this host's speed drifts by tens of percent from one minute to the next, so two
    comparisons that each calibrated would charge the same model work differently. Otherwise
    (no cache, another machine's, unreadable, or ``recalibrate``) it is calibrated here, with the
    cached machine rates if only the step is new, and written to the cache."""
    path = machine_cache_path()
    cached = None
    if not recalibrate and path.is_file():
        try:
            cached = ComputeProfile.load(path)
        except ValueError:
            cached = None   # unreadable: calibrate again and replace it
        if cached is not None and cached.machine != this_machine():
            cached = None
    key = config_step_key(cfg)
    if cached is not None and key in cached.steps:
        return cached, (f"calibrated on this machine at {cached.step_calibrated_at(key) or 'an unknown time'}, kept "
                        f"in {path} (--recalibrate measures it again)")
    t0 = time.perf_counter()
    profile = calibrate(cfg, cached)
    took = f"calibrated now ({time.perf_counter() - t0:.1f} s)"
    try:
        profile.save(path)
    except OSError as e:   # a read-only home: this comparison still has its profile, later ones recalibrate
        return profile, f"{took}, not kept ({path}: {e.strerror or e}; set PYSIM_CACHE_DIR to a writable folder)"
    return profile, f"{took}, kept in {path} for later comparisons"


def finished_run(cfg: TrainConfig, out_dir: str | Path) -> dict | None:
    """The saved result (with its trace) of a complete run of exactly ``cfg`` in ``out_dir``, or
    None: not there, incomplete or stale (see :func:`pysim.results.load_result`), or of
    another configuration."""
    try:
        result, trace = load_result(run_path(out_dir, cfg.run_name))
    except ValueError:
        return None
    if result["config"] != cfg.to_json():
        return None
    result["trace"] = trace
    return result


def run(cfg: TrainConfig, out_dir: str | Path | None = None, timeout_s: float = 300.0,
        resume: bool = False) -> dict | None:
    """Trains ``cfg`` in ``cfg.nodes`` processes; returns (and writes) the result (None on the
    ranks other than 0 under torchrun). With
    ``compute="calibrated"`` and no profile, the machine and step are calibrated first.
    With ``out_dir`` and ``cfg.checkpoint_every``, checkpoints are written as training goes;
    ``resume`` continues from the latest one of the same configuration, if any
    (:mod:`pysim.checkpoint`). ``real_runtime_s`` of a resumed run counts the resumed part."""
    cfg.check()
    if cfg.compute == "calibrated" and cfg.profile is None:
        cfg.profile = calibrate(cfg)
    plan = None
    if out_dir is not None:
        check_out_dir(out_dir)  # an unwritable --out fails now, not after training
        folder = run_path(out_dir, cfg.run_name) / "checkpoint"
        same = {k: v for k, v in cfg.to_json().items() if k != "checkpoint_every"}  # what a resume must match
        plan = checkpoint.prepare(folder, same, cfg.nodes, cfg.checkpoint_every, resume)
        if plan.resume_step:
            print(f"{cfg.run_name}: resuming from the checkpoint after step {plan.resume_step}", flush=True)
    elif resume or cfg.checkpoint_every:
        raise ValueError("checkpoints live beside the results: give an output folder (--out) to checkpoint "
                         "or resume")
    t0 = time.perf_counter()
    nodes = run_nodes(train_node, cfg.nodes, (cfg, plan), timeout_s=timeout_s)
    if nodes is None:  # under torchrun, ranks other than 0: rank 0 assembles, prints and writes
        return None
    runtime_s = time.perf_counter() - t0
    trace = trace_from_nodes([[(c, f, event_from_json(e)) for c, f, e in r["segments"]] for r in nodes],
                             nodes[0]["step_ends"])
    timeline = replay(trace, cfg.network, cfg.scaling)
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
        "name": cfg.run_name,
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
        "idle_s": float(timeline.waited_s.mean()),   # per node: in collectives or waiting for others
        "real_runtime_s": runtime_s,
    }
    if out_dir is not None:
        save_result(result, trace, out_dir)
        if plan is not None:
            checkpoint.remove(plan.folder)
    result["trace"] = trace
    return result
