"""A comparison: several strategies, each over several seeds, on one workload and network.

Every strategy runs with the same seeds, so runs pair up by seed; seeds
``seed`` ... ``seed + seeds - 1`` vary the initial model, the data order and
the strategies' own randomness. One compute profile is shared by every run
(:func:`pysim.compute.machine_profile`), so the same model work costs the same
simulated time in every strategy. ``python -m pysim compare`` (:mod:`pysim.cli`)
is the command; :func:`compare` the same from Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pysim import tensorboard_log
from pysim.compute import ComputeProfile, machine_profile, workload_step_key
from pysim.config import TrainConfig
from pysim.report import plot_runs, results_table, verdicts
from pysim.result import Result
from pysim.rundir import check_out_dir
from pysim.trainer import RunOptions, check_resume, finished_run, run


def split_specs(text: str) -> list[str]:
    """Strategy specs separated by ``;`` or by commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if (ch == ";" or (ch == "," and depth == 0)):
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def comparison_configs(base: TrainConfig, strategies: Sequence[str], seeds: int,
                       processes: int | None = None) -> list[TrainConfig]:
    """One checked config per (strategy, seed): ``base`` with each strategy spec and the seeds
    ``base.seed`` .. ``base.seed + seeds - 1``, saved under "<label> seed<N>"; checked for
    ``processes`` worker processes (None: the default)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if not strategies:
        raise ValueError("--strategies is empty; name at least one strategy")
    twice = sorted(s for s, n in Counter(s.strip() for s in strategies).items() if n > 1)
    if twice:
        raise ValueError(f"--strategies names {twice[0]!r} twice; name each strategy once (--seeds repeats it)")
    labels = {spec: replace(base, strategy=spec, strategy_args={}).name for spec in strategies}
    uses = Counter(labels.values())
    configs = []
    for spec in strategies:
        # strategies whose labels coincide (SPARTA's seed, say, is not in its label) are named by their
        # specs: the report takes runs of one name for seeds of one strategy
        shared = uses[labels[spec]] > 1
        for seed in range(base.seed, base.seed + seeds):
            cfg = replace(base, strategy=spec, strategy_args={}, seed=seed, seed_in_name=True,
                          label=spec.strip() if shared else base.label)
            cfg.check(processes)
            configs.append(cfg)
    return configs


def shared_profile(configs: list[TrainConfig], out: str | Path, resume: bool, recalibrate: bool) -> str | None:
    """Gives every config of a calibrated comparison one compute profile of this machine (the one
    saved in ``out`` on ``resume``, else the kept or a new one) and saves it with the results.
    Returns the line that says where it came from (None when the configs name their compute)."""
    if configs[0].compute != "calibrated":
        return None
    saved = Path(out) / "compute_profile.json"
    if resume and saved.is_file():
        profile = ComputeProfile.load(saved)
        line = f"compute profile: reusing {saved} (--resume)"
    else:
        first = configs[0]
        profile, origin = machine_profile(first.workload, first.batch_size, first.seed, recalibrate=recalibrate)
        step = profile.steps[workload_step_key(first.workload, first.batch_size)]
        profile.save(saved)
        line = f"compute profile: {1e3 * step:.2f} ms per forward+backward step, {origin}; saved to {saved}"
    for cfg in configs:
        cfg.profile = profile
    return line


def compare(configs: list[TrainConfig], out: str | Path, resume: bool = False, recalibrate: bool = False,
            options: RunOptions | None = None, say=print) -> list[Result]:
    """Trains every config (keeping the finished ones on ``resume``) into ``out``; returns the results
    in config order. ``say`` prints progress lines."""
    check_out_dir(out)
    line = shared_profile(configs, out, resume, recalibrate)
    if line:
        say(line)
    if resume:   # before any training: a refusal must not come after hours of other runs
        for cfg in configs:
            check_resume(cfg, out)
    first = configs[0]
    seeds = sorted({c.seed for c in configs})
    say(f"{first.workload.name}: {first.nodes} nodes, network {first.network.describe()}, {first.steps} steps x "
        f"{first.batch_size} per node, seeds {seeds[0]}..{seeds[-1]}, target {first.goal}")
    results = []
    for cfg in configs:
        done = finished_run(cfg, out) if resume else None
        if done is not None:
            say(f"{cfg.name} (seed {cfg.seed}): finished earlier, kept (--resume)")
            if options is not None and options.tensorboard is not None:
                tensorboard_log.write_run(done, options.tensorboard)
            results.append(done)
            continue
        say(f"training {cfg.name} (seed {cfg.seed}) ...")
        results.append(run(cfg, out, resume=resume, options=options))
    return results


def report(results: list[Result], plot_path: str | Path, title: str) -> list[str]:
    """The table, the verdicts and the plot of a comparison, as the lines to print."""
    lines = ["", results_table(results), *("- " + v for v in verdicts(results))]
    plot = plot_runs(results, plot_path, title)
    return lines + [f"\nplot: {plot}"]
