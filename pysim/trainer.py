"""The Trainer: N node processes train a model with a strategy over a simulated network.

Each node trains on its own shard of the training set. Node 0 evaluates the
strategy's model on the full test set every ``eval_every`` steps and at the
end. The run's result (JSON + per-step CSV) and its trace (for replay under
other networks) are written to ``out_dir``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pysim import checkpoint, tensorboard_log
from pysim.clock import replay
from pysim.compute import calibrate_workload
from pysim.config import TrainConfig, run_identity
from pysim.launch import run_nodes
from pysim.node import StepRecord, train_node
from pysim.placement import default_processes
from pysim.result import Evaluation, Final, Result, StepRow
from pysim.rundir import check_out_dir, load_result, run_path, save_result
from pysim.trace import segments_from_json, trace_from_nodes


@dataclass(frozen=True)
class RunOptions:
    """How a run is executed; none of it changes a result."""

    processes: int | None = None     # worker processes (None: one per core, at most one per node)
    timeout_s: float = 300.0         # bound on any single collective and on joining the group (s)
    tensorboard: str | None = None   # a folder for TensorBoard event files (per step and evaluation)
    pin_cpus: bool = True            # one CPU per worker when there are as many workers as CPUs (launch.pin_to_cpu)

    def __post_init__(self) -> None:
        p = self.processes
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"processes must be an integer >= 1 (or None: one per core), got {p!r}")
        if not isinstance(self.pin_cpus, bool):
            raise ValueError(f"pin_cpus must be True or False, got {self.pin_cpus!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {t!r}")
        if self.tensorboard is not None:
            if not isinstance(self.tensorboard, str | os.PathLike):
                raise ValueError(f"tensorboard must be a folder (a str or Path) or None, got {self.tensorboard!r}")
            tensorboard_log.check_available()
            check_out_dir(self.tensorboard, "--tensorboard")


def finished_run(cfg: TrainConfig, out_dir: str | Path) -> Result | None:
    """The saved result (with its trace) of a complete run of ``cfg`` in ``out_dir`` (its
    checkpoints may have been written at another interval: the same results), or None: not
    there, incomplete or stale (see :func:`pysim.rundir.load_result`), or of another
    configuration."""
    try:
        result = load_result(run_path(out_dir, cfg.run_name))
    except ValueError:
        return None
    return result if run_identity(result.config) == cfg.identity() else None


def check_resume(cfg: TrainConfig, out_dir: str | Path) -> None:
    """On ``--resume``: a one-line ValueError if ``out_dir`` holds a finished run under ``cfg``'s
    name of another configuration (resuming would overwrite it)."""
    try:
        saved = load_result(run_path(out_dir, cfg.run_name))
    except ValueError:
        return   # nothing finished there (or unreadable: nothing to lose)
    new, old = cfg.identity(), run_identity(saved.config)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff == ["strategy_revision"]:
            raise ValueError(f"{run_path(out_dir, cfg.run_name)} holds a finished run of {cfg.strategy} made by an "
                             f"older pysim, whose {cfg.strategy} computed something else (revision "
                             f"{old.get('strategy_revision', 0)}, now {new.get('strategy_revision', 0)}); use another "
                             "--out, or delete that run to train it again")
        raise ValueError(f"{run_path(out_dir, cfg.run_name)} holds a finished run of another configuration "
                         f"(differs in {', '.join(diff)}); resume with the same flags, or use another --out")


def run(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False,
        options: RunOptions | None = None) -> Result | None:
    """Trains ``cfg`` on ``cfg.nodes`` nodes; returns (and writes) the result (None on the
    ranks other than 0 under torchrun). With ``compute="calibrated"`` and no profile, the
    machine and step are calibrated first. With ``out_dir`` and ``cfg.checkpoint_every``,
    checkpoints are written as training goes; ``resume`` continues from the latest one of the
    same configuration, if any (:mod:`pysim.checkpoint`). ``real_runtime_s`` of a resumed run
    counts the resumed part. ``options``: how it runs (:class:`RunOptions`)."""
    options = options or RunOptions()
    cfg.check(options.processes)
    if cfg.compute == "calibrated" and cfg.profile is None:
        cfg.profile = calibrate_workload(cfg.workload, cfg.batch_size, cfg.seed)
    plan = None
    if out_dir is not None:
        check_out_dir(out_dir)  # an unwritable --out fails now, not after training
        if resume:
            check_resume(cfg, out_dir)
        folder = run_path(out_dir, cfg.run_name) / "checkpoint"
        plan = checkpoint.prepare(folder, cfg.identity(), cfg.nodes, cfg.checkpoint_every, resume)
        if plan.resume_step:
            print(f"{cfg.run_name}: resuming from the checkpoint after step {plan.resume_step}", flush=True)
    elif resume or cfg.checkpoint_every:
        raise ValueError("checkpoints live beside the results: give an output folder (--out) to checkpoint "
                         "or resume")
    t0 = time.perf_counter()
    processes = options.processes or default_processes(cfg.nodes)
    nodes = run_nodes(train_node, cfg.nodes, (cfg, plan), timeout_s=options.timeout_s, processes=processes,
                      pin_cpus=options.pin_cpus)
    if nodes is None:  # under torchrun, ranks other than 0: rank 0 assembles, prints and writes
        return None
    result = assemble(cfg, nodes, time.perf_counter() - t0)
    if out_dir is not None:
        result = save_result(result, out_dir)
        if plan is not None:
            checkpoint.remove(plan.folder)
    if options.tensorboard is not None:
        tensorboard_log.write_run(result, options.tensorboard)
    return result


def assemble(cfg: TrainConfig, nodes: list[dict], runtime_s: float) -> Result:
    """The run's :class:`Result` from every node's records: the trace, replayed (its times
    must equal the live clock's), per-step rows, node 0's evaluations and the final figures (a
    run that diverged has rows up to the evaluation where it stopped)."""
    trace = trace_from_nodes(segments_from_json([r["segments"] for r in nodes]),
                             nodes[0]["step_ends"])
    timeline = replay(trace, cfg.network, cfg.scaling)
    live = [r["steps"][-1][1] for r in nodes]
    if list(timeline.end_s[-1]) != live:  # the invariant everything else rests on
        raise RuntimeError(f"live clock {live} and replay {list(timeline.end_s[-1])} disagree")
    n = cfg.nodes
    steps = []
    for k in range(len(nodes[0]["steps"])):   # fewer than cfg.steps where the run diverged
        rows = [StepRecord(*r["steps"][k]) for r in nodes]
        losses = [row.loss for row in rows if row.loss is not None]   # of the nodes that trained
        steps.append(StepRow(step=k + 1, loss=sum(losses) / len(losses) if losses else float("nan"),
                             sim_time_s=float(timeline.step_end_s[k]),
                             bytes_sent_per_node=sum(row.bytes_sent for row in rows) / n,
                             bytes_received_per_node=sum(row.bytes_received for row in rows) / n,
                             compute_s=max(row.compute_s for row in rows), comm_s=max(row.comm_s for row in rows)))
    evals = [Evaluation(step=s, sim_time_s=steps[s - 1].sim_time_s, metrics=metrics, examples=examples,
                        bytes_sent_per_node=steps[s - 1].bytes_sent_per_node)
             for s, metrics, examples in nodes[0]["evals"]]
    sent, recv = trace.bytes_per_node()
    result = Result(name=cfg.run_name, label=cfg.name, config=cfg.to_json(), network=cfg.network.describe(),
                    target=cfg.goal, steps=steps, evals=evals, final=None, trace=trace)  # type: ignore[arg-type]
    reached = result.time_to_target()
    result.final = Final(
        metrics=nodes[0]["final_metrics"], sim_time_s=float(timeline.total_s),
        time_to_target_s=None if reached is None else reached[0],
        time_to_target_bracket_s=None if reached is None else (reached[1], reached[2]),
        bytes_sent_per_node=sum(sent) / n, bytes_received_per_node=sum(recv) / n,
        compute_s=steps[-1].compute_s, comm_s=steps[-1].comm_s,
        idle_s=float(timeline.waited_s.mean()),   # per node: in collectives or waiting for others
        real_runtime_s=runtime_s, diverged_at_step=nodes[0]["diverged_at_step"])
    return result
