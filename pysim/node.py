"""One node's training loop: data, model, optimizer, strategy, then step, evaluate, checkpoint.

A node runs in a thread of a worker process (:mod:`pysim.host`), beside the
other nodes that process hosts. Every node builds the same model from the same
seed, takes its shard of the training set (the set itself is loaded once per
process and shared), and for each step computes the loss and gradients on a
batch of its shard (timed as compute), then lets the strategy communicate and
update. Node 0's deployed model is evaluated every ``eval_every`` steps (and
after the last) on a fixed subset of the evaluation set (cheap, for time to
target), and on the whole set at the end (the final metrics); every node takes
part, evaluating its share of the examples (:class:`pysim.evaluation.Evaluator`).

Divergence: a node whose training loss is not finite notes the step; at the next
evaluation the nodes agree on the first such step of any node, and the run stops
there, its final metrics NaN, its result marked "diverged at step N"
(:attr:`pysim.result.Final.diverged_at_step`). Until then non-finite values flow on
through the strategies as they would in a real run (the codecs carry them).

Time to target at step resolution: until the target is reached, the node
holding the deployed model (node 0, or the one the strategy names) keeps a
copy of it for every step since the last evaluation. When an evaluation first
reaches the target, those copies are evaluated in step order from the last
evaluation below the target until one reaches it, so the run records the first
step whose model reaches the target, with the step before it below the target:
the crossing is known to one step, not to ``eval_every`` steps, and is the
first crossing whether or not the metric rises steadily in between.
"""

from __future__ import annotations

import math
import random
import sys
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pysim.checkpoint import CheckpointPlan, load_node_state, prune, save_node_state
from pysim.comm import Comm
from pysim.compute import ComputeMeter, Work, count_work, step_key
from pysim.config import TrainConfig, training_shards
from pysim.evaluation import CrossingFinder, Evaluator, Subset, eval_subset
from pysim.global_rng import seed_torch
from pysim.host import Host
from pysim.sharding import ShardSampler
from pysim.strategies import make_strategy
from pysim.trace import Event, event_to_json
from pysim.workload import Batches, Workload


class StepRecord(NamedTuple):
    """What a node records after each step."""

    loss: float | None       # training loss of this node's batch (None: it sat the step out)
    clock_s: float           # this node's virtual time at the end of the step (s)
    bytes_sent: int          # packet bytes this node has sent so far
    bytes_received: int
    compute_s: float         # compute time so far (s)
    comm_s: float            # time so far spent in or waiting for collectives (s)


class EvalRecord(NamedTuple):
    """An evaluation on node 0 after ``step`` steps."""

    step: int
    metrics: dict[str, float]
    examples: int            # evaluation examples used (the subset, or the whole set at the end)


class WarmupCosine:
    """Learning-rate factor of step ``step``: linear warm-up to 1 over ``warmup`` steps, then cosine
    decay to 0.05 at step ``total``. A class, not a closure, so a checkpoint can pickle it."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_node(rank: int, world: int, cfg: TrainConfig, plan: CheckpointPlan | None = None) -> dict:
    """One node's training run; returns its records (steps, evaluations on node 0, trace segments)
    as plain JSON-able data. ``plan``: where to write checkpoints and from which step to resume
    (:mod:`pysim.checkpoint`)."""
    node = NodeRun(rank, world, cfg, plan)
    for step in range(node.start, cfg.steps):
        node.train_step(step)
        node.evaluate_after(step)
        if node.diverged_at_step is not None:
            break
        node.checkpoint_after(step)
    return node.finish()


class NodeRun:
    """One node's state through a run, in the order a step uses it."""

    def __init__(self, rank: int, world: int, cfg: TrainConfig, plan: CheckpointPlan | None) -> None:
        self.rank, self.world, self.cfg, self.plan = rank, world, cfg, plan
        wl: Workload = cfg.workload
        # data: the process's copy of the sets, this node's shard
        self.train, evaluation, shards = _process_data(cfg, world)
        examples = [len(s) for s in shards]
        self.batches = ShardSampler(self.train, shards[rank], cfg.batch_size, cfg.seed * 1000 + rank)
        rows = eval_subset(len(evaluation), cfg.eval_subset)
        self.quick = evaluation if len(rows) == len(evaluation) else Subset(evaluation, rows)
        self.evaluation = evaluation
        self.last_metrics: tuple[int, dict[str, float]] | None = None   # (steps done, metrics) of the last evaluation
        # model, optimizer, strategy: identical initial model on every node
        seed_torch(cfg.seed)
        self.model = wl.model()
        self.params = list(self.model.parameters())   # walking the module tree each step costs ~15 us
        self.optimizer = wl.optimizer(self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps))
        self.strategy = make_strategy(cfg.strategy, **cfg.strategy_args)
        self.comm = Comm(rank, world, cfg.network, None, cfg.algorithm, cfg.scaling)
        self.host: Host = self.comm.host
        self.comm.meter = ComputeMeter(cfg.profile, shared=self.host.shared("counted work", dict))
        self.strategy.setup(self.model, self.optimizer, self.comm, self.scheduler, seed=cfg.seed, examples=examples,
                            steps=cfg.steps, batch_size=cfg.batch_size)
        self.work, self.key = self._step_work()
        # records, and what evaluations need
        self.steps: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.evaluate = Evaluator(self.host, wl.metrics, wl.split_evaluation)
        self.crossing = CrossingFinder(cfg.goal, lambda m, holder: self.evaluate(m, self.quick, holder))
        self.target_reached = False   # told to every node at evaluations
        self.first_nonfinite_step: int | None = None   # this node's first step with a non-finite loss
        self.diverged_at_step: int | None = None       # the run's, agreed at an evaluation
        self.start = self._resume() if plan is not None and plan.resume_step else 0
        self.bar = tqdm(total=cfg.steps, initial=self.start, desc=f"{cfg.name} (node 0)", unit="step", leave=False,
                        mininterval=0.5, disable=rank != 0 or cfg.steps < 200 or not sys.stderr.isatty())

    def _step_work(self) -> tuple[Work, str]:
        """One step's model work, counted once per process on a batch (the first node's), without
        touching any node's random state or its sampler; and its compute-profile key."""
        wl = self.cfg.workload
        key = step_key(wl.name, self.model, self.cfg.batch_size)

        def count() -> Work:
            probe = ShardSampler(self.train, self.batches.shard, self.cfg.batch_size, 0)
            x, y = probe.next()
            with torch.random.fork_rng(devices=[]):
                work = count_work(lambda: wl.loss(self.model(x), y).backward())
            self.model.zero_grad()
            return work

        return self.host.shared(("step work", key), count), key

    def _resume(self) -> int:
        """Everything the loop carries from step to step, as it was after the checkpointed step."""
        state = load_node_state(self.plan.folder, self.plan.resume_step, self.rank)
        self.strategy = state["strategy"]
        s = self.strategy
        self.model, self.optimizer, self.scheduler, self.comm = s.model, s.optimizer, s.scheduler, s.comm
        self.params = list(self.model.parameters())
        self.batches.restore(state["sampler"])
        self.steps, self.evals = state["steps"], state["evals"]
        self.crossing.restore(state["crossing"], self.strategy.eval_model())
        _set_rng_state(state["rng"])
        self.target_reached = state["target_reached"]
        self.first_nonfinite_step = state.get("first_nonfinite_step")
        return self.plan.resume_step

    # ------------------------------------------------------------ the loop

    def train_step(self, step: int) -> None:
        """A batch, forward and backward (the step's compute; skipped by a node that sits the step
        out), the strategy's communication and update, and the step's record."""
        loss = None
        if self.strategy.trains(step):
            x, y = self.batches.next()
            with self.comm.meter.measure(work=self.work, key=self.key):
                loss = self.cfg.workload.loss(self.model(x), y)
                for p in self.params:    # every parameter, whichever optimizer steps it (zero_grad's set_to_none)
                    p.grad = None
                loss.backward()
        self.strategy.step(step, last=step == self.cfg.steps - 1)
        clock = self.comm.end_step()
        c = self.comm
        value = None if loss is None else loss.item()
        if value is not None and not math.isfinite(value) and self.first_nonfinite_step is None:
            self.first_nonfinite_step = step + 1
        self.steps.append(StepRecord(value, clock, c.bytes_sent, c.bytes_received, c.compute_total_s, c.comm_s))
        self.bar.update()

    def evaluate_after(self, step: int) -> None:
        """Every ``eval_every`` steps and after the last: evaluate the deployed model (and, the
        first time it reaches the target, the kept models back to the first step that did); in
        between, until the target is reached, the node holding it keeps each step's deployed
        model."""
        cfg, done = self.cfg, step + 1
        holder = self.strategy.deployer(step)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            deployed = self.strategy.eval_model()
            metrics = self.evaluate(deployed, self.quick, holder)
            self.last_metrics = (done, metrics)
            bisected = self.crossing.evaluated(done, metrics)
            if self.rank == 0:
                self.evals += [EvalRecord(k, m, len(self.quick)) for k, m in bisected]
                self.evals.append(EvalRecord(done, metrics, len(self.quick)))
                shown = {k: f"{v:.4g}" for k, v in metrics.items() if k == cfg.goal.metric}
                self.bar.set_postfix(shown | {"sim": f"{self.comm.clock_s:.1f}s"})
            self.target_reached = self.crossing.reached
            self.diverged_at_step = self.host.meet("divergence", self.first_nonfinite_step, self._first_of_all)
        elif cfg.resolve_target and not self.target_reached:   # only the node holding it keeps the model
            self.crossing.keep(done, self.strategy.eval_model() if self.rank == holder else None, holder)

    def checkpoint_after(self, step: int) -> None:
        """Writes this node's whole state when a checkpoint is due; once every node's file of the
        step is written, node 0 removes older ones."""
        if self.plan is None or not self.plan.due(step + 1, self.cfg.steps):
            return
        save_node_state(self.plan.folder, step + 1, self.rank, {
            "strategy": self.strategy,  # holds the model, optimizer, schedule and comm (clock, trace so far)
            "sampler": self.batches.state(), "steps": self.steps, "evals": self.evals, "rng": _rng_state(),
            "target_reached": self.target_reached, "crossing": self.crossing.state(),
            "first_nonfinite_step": self.first_nonfinite_step})
        self.host.meet("checkpoint", None, self._barrier)   # uncharged
        if self.rank == 0:
            prune(self.plan.folder, step + 1)

    def _first_of_all(self, requests: dict[int, int | None]) -> dict[int, int | None]:
        """The first step with a non-finite loss on any node (None: none), the same in every process."""
        rows = {n: np.array([math.inf if s is None else float(s)]) for n, s in requests.items()}
        first = float(self.host.transport.gather_rows(rows).min())
        return dict.fromkeys(requests, None if first == math.inf else int(first))

    def _barrier(self, requests: dict) -> dict:
        self.host.transport.barrier()
        return dict.fromkeys(requests)

    def _event_json(self, event: Event | None) -> list | None:
        """``event`` as JSON, one object per distinct event in a process: its nodes share it, so
        the records pickled to the parent carry a collective's sizes once, not once per node."""
        if event is None:
            return None
        made = self.host.shared("events as JSON", dict)
        if event not in made:
            made[event] = event_to_json(event)
        return made[event]

    def finish(self) -> dict:
        """The final evaluation on the whole set (the last step's evaluation, when that already was
        of the whole set: the same model, examples and split, so the same metrics unless the
        evaluation draws random numbers), and the records as plain JSON-able data (under
        torchrun they cross between ranks as JSON)."""
        self.bar.close()
        if self.diverged_at_step is not None:   # a model that is not finite has no metrics worth a pass
            final = dict.fromkeys(self.evals[-1].metrics if self.evals else (), math.nan)
        elif self.last_metrics is not None and self.last_metrics[0] == self.cfg.steps and self.quick is self.evaluation:
            final = dict(self.last_metrics[1])   # the last step's evaluation was this very pass (the whole set)
        else:
            final = self.evaluate(self.strategy.eval_model(), self.evaluation,
                                  self.strategy.deployer(self.cfg.steps - 1))
        evals = self.evals if self.rank == 0 else []
        return {"steps": [list(s) for s in self.steps], "evals": [list(e) for e in evals],
                "final_metrics": final if self.rank == 0 else None, "diverged_at_step": self.diverged_at_step,
                "segments": [(c, f, self._event_json(e)) for c, f, e in self.comm.segments],
                "step_ends": self.comm.step_ends}


def _process_data(cfg: TrainConfig, world: int) -> tuple[Batches, Batches, list[torch.Tensor]]:
    """The training and evaluation sets and every node's shard, made once per process and shared
    by its nodes (read only)."""
    from pysim.host import current_host

    def make() -> tuple[Batches, Batches, list[torch.Tensor]]:
        train_set, eval_set = cfg.workload.data()
        train = Batches(train_set)
        labels = train.labels() if cfg.sharding.kind == "dirichlet" else None
        return train, Batches(eval_set), training_shards(cfg, world, len(train), labels)

    host = current_host()
    return make() if host is None else host.shared(("data", id(cfg)), make)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
