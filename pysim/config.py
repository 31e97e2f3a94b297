"""A run's configuration: :class:`TrainConfig`, checked at the boundary before any process starts.

Everything a run's numbers depend on is here (workload, strategy, nodes,
network, steps, seeds, compute model, stragglers), with its JSON form (saved
with every result, compared on ``--resume``). How the run is executed (worker
processes, output folder, checkpoints) is not: it never changes a result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from pysim.clock import ComputeScaling
from pysim.compute import ComputeProfile, resolve_compute
from pysim.network import Network, network_from_json, network_to_json
from pysim.placement import Placement, check_fits, default_processes, node_state_bytes
from pysim.probe import check_target
from pysim.rundir import run_dir_name
from pysim.sharding import Sharding, node_shards
from pysim.strategies import make_strategy
from pysim.strategies.base import check_seed
from pysim.workload import Target, Workload, get_workload

if TYPE_CHECKING:
    import torch


def run_identity(config: dict) -> dict:
    """A run's JSON configuration (:meth:`TrainConfig.to_json`) without ``checkpoint_every``: how
    often checkpoints are written changes no result."""
    return {k: v for k, v in config.items() if k != "checkpoint_every"}


def meta_model(workload: Workload):
    """``workload``'s model on torch's meta device (shapes and types, no memory, no data)."""
    import torch

    with torch.device("meta"):
        return workload.model()


_LABELS: dict[tuple, tuple[int, torch.Tensor | None]] = {}   # per workload, read once per process


def _training_labels(workload: Workload) -> tuple[int, torch.Tensor | None]:
    """The size of ``workload``'s training set and its class labels (None: it has none)."""
    from pysim.workload import Batches

    key = (workload.name, workload.spec, repr(workload.args))
    if key not in _LABELS:
        train = Batches(workload.data()[0])
        _LABELS[key] = len(train), train.labels()
    return _LABELS[key]


def training_shards(cfg: TrainConfig, nodes: int, examples: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """Every node's shard of the run's training examples (the first ``cfg.train_examples`` of the
    set's ``examples``; ``labels``: the set's, for Dirichlet sharding), each at least a batch."""
    n = min(examples, cfg.train_examples or examples)
    return node_shards(n, nodes, cfg.sharding, cfg.seed, cfg.batch_size, None if labels is None else labels[:n])


def check_strategy_fits(strategy, nodes: int, workload: Workload, model) -> None:
    """The strategy's own check (:meth:`pysim.strategies.Strategy.check`) of ``nodes`` nodes and
    the workload's ``model`` and optimizer, on torch's meta device, before any node process
    starts. Its ValueError is the run's; a check (or an optimizer) that needs real values and
    fails on the meta device is left to the nodes' setup, which runs it again on theirs."""
    try:
        optimizer = workload.optimizer(model.parameters())
    except Exception:
        optimizer = None
    try:
        strategy.check(nodes, model, optimizer)
    except ValueError:
        raise
    except Exception:
        pass


def _check_int(name: str, v: object, low: int, none_ok: bool = False) -> None:
    if none_ok and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if none_ok else ''}, got {v!r}")


@dataclass
class TrainConfig:
    """Everything a run depends on. Units: seconds, bytes.

    ``workload``: what is trained (a :class:`~pysim.workload.Workload`, or a built-in's name
    such as ``"mnist"``); ``target`` overrides the workload's. ``sharding``: ``iid``,
    ``contiguous`` or ``dirichlet:ALPHA``. ``eval_every``: steps between evaluations on
    ``eval_subset`` examples of the evaluation set (None: all); the final metrics use all
    (with None, the last step's evaluation is the final one: one pass, not two, so an
    evaluation that draws random numbers reports that pass's draw).
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
        if isinstance(self.compute_speed, str) or not isinstance(self.compute_speed, tuple | list):
            raise ValueError(f"compute_speed must be a tuple of per-node speed factors such as (1.0, 0.5), got "
                             f"{self.compute_speed!r}")
        self.compute_speed = tuple(self.compute_speed)
        if isinstance(self.workload, str):
            self.workload = get_workload(self.workload)
        self.sharding = Sharding.parse(self.sharding)
        if self.target is not None:
            self.target = Target.parse(self.target)

    def _check_types(self) -> None:
        """One-line errors for fields of the wrong type (which would fail deep inside otherwise)."""
        expected = (("workload", Workload, "a Workload or a built-in name such as 'mnist'"),
                    ("strategy", str, "a strategy spec such as 'DiLoCo(H=10)'"),
                    ("strategy_args", dict, "a dict of the strategy's arguments"),
                    ("network", Network, "a Network, e.g. Network.uniform(nodes, '1Gbps', '1ms')"),
                    ("label", str | None, "a string or None"), ("resolve_target", bool, "True or False"),
                    ("seed_in_name", bool, "True or False"), ("jitter", int | float, "a number >= 0"))
        for name, kind, what in expected:
            v = getattr(self, name)
            if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
                raise ValueError(f"{name} must be {what}, got {v!r}")

    def check(self, processes: int | None = None) -> None:
        """Validates everything before any node process starts; one-line errors. ``processes``:
        the worker processes the run will use (default: :func:`pysim.placement.default_processes`),
        for the memory check."""
        self._check_types()
        for name in ("nodes", "steps", "batch_size", "eval_every"):
            _check_int(name, getattr(self, name), 1)
        check_seed(self.seed, optional=False)
        for name in ("eval_subset", "train_examples", "checkpoint_every"):
            _check_int(name, getattr(self, name), 1, none_ok=True)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.profile is None and self.compute != "calibrated":
            self.profile = resolve_compute(self.compute)
        if self.compute_speed and len(self.compute_speed) != self.nodes:
            raise ValueError(f"--compute-speed gives {len(self.compute_speed)} speeds for {self.nodes} nodes; "
                             f"give one per node, e.g. {','.join(['1'] * (self.nodes - 1) + ['0.5'])}")
        self.scaling.speeds(self.nodes)  # ComputeScaling checks speeds and jitter
        if self.algorithm not in ("ring", "star"):
            raise ValueError(f"algorithm must be 'ring' or 'star', got {self.algorithm!r}")
        self.network = self.network.with_nodes(self.nodes)
        strategy = make_strategy(self.strategy, **self.strategy_args)  # fails early on bad arguments
        run_dir_name(self.run_name)   # a name no folder can have: said now, not after training
        if strategy.asynchronous and self.compute == "measured":
            raise ValueError(f"{strategy.name} orders its updates by simulated time, so measured compute times "
                             "would make every run different: give a compute profile (compute='calibrated', "
                             "'cpu', 'a100', ... or 'profile:FILE')")
        self.workload.validate()  # picklable, data present and not corrupt: reported here, not by every node
        check_target(self.workload, self.goal)  # a user's workload is tried once here
        model = meta_model(self.workload)
        placement = Placement(self.nodes, processes or default_processes(self.nodes))
        check_fits(self.nodes, placement.processes, node_state_bytes(sum(p.numel() for p in model.parameters())))
        check_strategy_fits(strategy, self.nodes, self.workload, model)
        size = self.workload.train_size
        if self.sharding.kind == "dirichlet":   # the draw itself says whether every node gets a batch
            training_shards(self, self.nodes, *_training_labels(self.workload))
        elif size is not None:
            size = min(size, self.train_examples or size)
            if self.batch_size > size // self.nodes:
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

    def identity(self) -> dict:
        """What a resumed run must share with the one it continues (:func:`run_identity`)."""
        return run_identity(self.to_json())

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["workload"] = {"name": self.workload.name, "spec": self.workload.spec, "args": self.workload.args}
        d["network"] = network_to_json(self.network)
        d["sharding"] = str(self.sharding)
        d["target"] = None if self.target is None else str(self.target)
        d["profile"] = None if self.profile is None else asdict(self.profile)
        d["compute_speed"] = list(self.compute_speed)
        revision = type(make_strategy(self.strategy, **self.strategy_args)).revision
        if revision:   # absent at 0: the identity of runs made before revisions existed is unchanged
            d["strategy_revision"] = revision
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d.pop("strategy_revision", None)   # the strategy's, not a setting (see ``to_json``)
        w = d["workload"]
        if not w.get("spec"):
            raise ValueError(f"workload {w.get('name')!r} is user-defined; only built-in workloads can be "
                             "rebuilt from a config file")
        d["workload"] = get_workload(w["spec"], **w.get("args", {}))
        d["network"] = network_from_json(d["network"])
        d["profile"] = None if d.get("profile") is None else ComputeProfile(**d["profile"])
        return cls(**d)
