"""One node's training loop, run inside a node process: data, model, optimizer, strategy, loop, evaluation.

Every node builds the same model from the same seed, takes its shard of the
training set, and for each step computes the loss and gradients on a batch
of its shard (timed as compute), then lets the strategy communicate and
update. Node 0's deployed model is evaluated every ``eval_every`` steps (and
after the last) on a fixed subset of the evaluation set (cheap, for time to
target), and on the whole set at the end (the final metrics); every node
evaluates a share of the examples unless the workload says otherwise
(:class:`pysim.evaluation.NodeEvaluation`).

Time to target at step resolution: until the target is reached, node 0 keeps a
copy of the deployed model of every step since the last evaluation (every node
asks the strategy for it, as it may be a collective; every node learns at each
evaluation whether the target is reached, and then they stop). When an
evaluation first reaches the target, the steps in between are bisected on
those copies (about log2(eval_every) more evaluations), so the run records the
first step whose model reaches the target with the step before it below the
target: the crossing is known to one step, not to ``eval_every`` steps.
"""

from __future__ import annotations

import math
import random
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pysim.checkpoint import CheckpointPlan, load_node_state, prune, save_node_state
from pysim.comm import Comm
from pysim.compute import ComputeMeter, count_work, step_key
from pysim.config import TrainConfig
from pysim.evaluation import CrossingFinder, NodeEvaluation, Subset, eval_subset
from pysim.sharding import ShardSampler, shard_indices
from pysim.strategies import make_strategy
from pysim.trace import event_to_json
from pysim.workload import Batches


class StepRecord(NamedTuple):
    """What a node records after each step."""

    loss: float              # training loss of this node's batch
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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _from_node0(flag: bool, world: int) -> bool:
    """Node 0's ``flag`` on every node (a one-value broadcast outside the simulated network,
    uncharged: simulator bookkeeping, as the evaluations are)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, 0)
    return bool(t.item())


def train_node(rank: int, world: int, cfg: TrainConfig, plan: CheckpointPlan | None = None) -> dict:
    """One node's training run; returns its records (steps, evaluations on node 0, trace segments).
    ``plan``: where to write checkpoints and from which step to resume (:mod:`pysim.checkpoint`)."""
    wl = cfg.workload
    # data: this node's shard of the training set; node 0 also keeps the evaluation set
    train_set, eval_set = wl.data()
    train = Batches(train_set)
    n_train = min(len(train), cfg.train_examples or len(train))
    labels = train.labels() if cfg.sharding.kind == "dirichlet" else None
    shard = shard_indices(n_train, world, cfg.sharding, cfg.seed, None if labels is None else labels[:n_train])[rank]
    if len(shard) < cfg.batch_size:
        raise ValueError(f"node {rank}'s shard has {len(shard)} examples, fewer than the batch size "
                         f"{cfg.batch_size}; use a smaller --batch-size or fewer nodes")
    batches = ShardSampler(train, shard, cfg.batch_size, cfg.seed * 1000 + rank)
    evaluate = NodeEvaluation(rank, world, wl.metrics, wl.split_evaluation)
    evaluation = Batches(eval_set) if evaluate.takes_part else None
    quick = Subset(evaluation, eval_subset(len(evaluation), cfg.eval_subset)) if evaluation else None

    # model, optimizer, strategy: identical initial model on every node
    torch.manual_seed(cfg.seed)
    model = wl.model()
    optimizer = wl.optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps))
    strategy = make_strategy(cfg.strategy, **cfg.strategy_args)
    meter = ComputeMeter(cfg.profile)
    comm = Comm(rank, world, cfg.network, meter, cfg.algorithm, cfg.scaling)
    strategy.setup(model, optimizer, comm, scheduler)

    x, y = batches.next()
    work = count_work(lambda: wl.loss(model(x), y).backward())  # one step's model work, counted once
    key = step_key(wl.name, model, cfg.batch_size)
    optimizer.zero_grad()
    batches = ShardSampler(train, shard, cfg.batch_size, cfg.seed * 1000 + rank)  # the FLOP count used a batch

    steps: list[StepRecord] = []
    evals: list[EvalRecord] = []
    crossing = CrossingFinder(cfg.goal, lambda m: evaluate(m, quick), store=rank == 0) \
        if evaluation is not None else None
    start = 0
    target_reached = False   # on every node: node 0 has seen the target reached (told at evaluations)
    if plan is not None and plan.resume_step:
        # everything the loop carries from step to step, as it was after ``resume_step`` steps
        state = load_node_state(plan.folder, plan.resume_step, rank)
        strategy = state["strategy"]
        model, optimizer, scheduler, comm = strategy.model, strategy.optimizer, strategy.scheduler, strategy.comm
        meter = comm.meter
        batches.restore(state["sampler"])
        steps, evals = state["steps"], state["evals"]
        if crossing is not None:
            crossing.restore(state["crossing"])
        _set_rng_state(state["rng"])
        target_reached = state["target_reached"]
        start = plan.resume_step
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.name} (node 0)", unit="step", leave=False,
               mininterval=0.5, disable=rank != 0 or cfg.steps < 200 or not sys.stderr.isatty())
    for step in range(start, cfg.steps):
        x, y = batches.next()
        with meter.measure(work=work, key=key):
            loss = wl.loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
        strategy.step(step, last=step == cfg.steps - 1)
        clock = comm.end_step()
        steps.append(StepRecord(loss.item(), clock, comm.bytes_sent, comm.bytes_received, comm.compute_total_s,
                                comm.comm_s))
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            deployed = strategy.eval_model()  # collective: a strategy may average the nodes' models (uncharged)
            if crossing is not None:
                metrics = evaluate(deployed, quick)
                bisected = crossing.evaluated(step + 1, metrics)
                if rank == 0:
                    evals += [EvalRecord(k, m, len(quick)) for k, m in bisected]
                    evals.append(EvalRecord(step + 1, metrics, len(quick)))
                    shown = {k: f"{v:.4g}" for k, v in metrics.items() if k == cfg.goal.metric}
                    bar.set_postfix(shown | {"sim": f"{clock:.1f}s"})
            if cfg.resolve_target and not target_reached:
                target_reached = crossing.reached if evaluate.split else \
                    _from_node0(crossing is not None and crossing.reached, world)
        elif cfg.resolve_target and not target_reached:
            deployed = strategy.eval_model()  # every node: it may be a collective
            if crossing is not None:
                crossing.keep(step + 1, deployed)
        if plan is not None and plan.due(step + 1, cfg.steps):
            save_node_state(plan.folder, step + 1, rank, {
                "strategy": strategy,  # holds the model, optimizer, schedule and comm (clock, trace so far)
                "sampler": batches.state(), "steps": steps, "evals": evals, "rng": _rng_state(),
                "target_reached": target_reached,
                "crossing": None if crossing is None else crossing.state()})
            if world > 1:
                dist.barrier()  # every node's file is written: older checkpoints can go (uncharged)
            if rank == 0:
                prune(plan.folder, step + 1)
        bar.update()
    bar.close()
    deployed = strategy.eval_model()
    final = evaluate(deployed, evaluation) if evaluation is not None else None
    if rank != 0:
        evals, final = [], None   # node 0 reports the evaluations
    # plain JSON-able data: under torchrun, results cross between ranks as JSON
    return {"steps": [list(s) for s in steps], "evals": [list(e) for e in evals], "final_metrics": final,
            "segments": [(c, f, event_to_json(e)) for c, f, e in comm.segments], "step_ends": comm.step_ends}
