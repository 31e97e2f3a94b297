"""A comparison: several strategies, each over several seeds, on one workload and network.

The examples (``example/mnist.py``, ``example/shakespeare.py``) are thin
wrappers around :func:`main`: they pick a workload and defaults. Strategies
come from one generic flag, each a spec that :func:`pysim.strategies.make_strategy`
understands (``"DiLoCo(H=50, codec='lowrank:8')"``), so a new strategy needs no
edit here. Seeds ``--seed`` ... ``--seed + --seeds - 1`` vary the initial model,
the data order and the strategies' own randomness; every strategy runs with
the same seeds, so runs pair up by seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from pysim.compute import ComputeProfile
from pysim.datasets import DataError
from pysim.launch import NodeError, RunInterrupted
from pysim.network import load_network_file, parse_network
from pysim.report import plot_runs, results_table, verdicts
from pysim.results import check_out_dir
from pysim.sharding import Sharding
from pysim.trainer import TrainConfig, config_step_key, finished_run, machine_profile, run
from pysim.workload import Workload


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


def add_arguments(ap: argparse.ArgumentParser, strategies: str, steps: int, batch_size: int, eval_every: int,
                  eval_subset: int | None, seeds: int, out: str, nodes: int = 2) -> None:
    """The flags every comparison takes, with the example's defaults."""
    ap.add_argument("--strategies", default=strategies,
                    help="strategy specs separated by ';' (or commas outside parentheses), e.g. "
                         "\"SimpleReduce; DiLoCo(H=50); SPARTA(p=0.01)\"")
    ap.add_argument("--nodes", type=int, default=nodes)
    ap.add_argument("--bandwidth", default="100Mbit", help="per-node link, e.g. 100Mbit, 1Gbps, 10MB/s")
    ap.add_argument("--latency", default="20ms", help="one-way link latency, e.g. 20ms, 150us")
    ap.add_argument("--topology", default="uniform", help="uniform | two-tier:G:BW:LAT | slow-node:I:BW:LAT")
    ap.add_argument("--framing", default="ideal",
                    help="protocol bytes charged on top of the packets: ideal | tcp (TCP/IPv4 as tc counts it, "
                         "66 B per 1448-byte segment, and a 66 B ACK per 2 segments on the reverse path) | "
                         "tcp-ethernet (90 B per segment and per ACK, a physical wire)")
    ap.add_argument("--network", default=None,
                    help="a network file (e.g. written by `python -m pysim calibrate`); replaces --bandwidth, "
                         "--latency, --topology and --framing")
    ap.add_argument("--algorithm", default="ring", choices=["ring", "star"], help="all-reduce algorithm")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=batch_size, help="per node")
    ap.add_argument("--lr", type=float, default=None, help="inner learning rate (default: the workload's)")
    ap.add_argument("--sharding", default="iid", help="iid | contiguous | dirichlet:ALPHA")
    ap.add_argument("--compute", default="calibrated",
                    help="'calibrated' (one profile of this machine shared by every run, saved to --out, and "
                         "kept between comparisons in $PYSIM_CACHE_DIR or ~/.cache/pysim), 'measured' (raw per "
                         "step), or a device profile: cpu, t4, a100, h100")
    ap.add_argument("--recalibrate", action="store_true",
                    help="measure this machine's compute profile again instead of reusing the kept one")
    ap.add_argument("--compute-profile", default=None,
                    help="a saved compute profile (compute_profile.json of an earlier comparison): the same "
                         "seeds then give the same simulated times on any machine")
    ap.add_argument("--compute-speed", default=None,
                    help="per-node compute speed factors, e.g. 1,1,1,0.5 (node 3 takes twice as long)")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="per-step compute jitter: sigma of a lognormal factor exp(sigma * z), seeded")
    ap.add_argument("--eval-every", type=int, default=eval_every, help="steps between evaluations")
    ap.add_argument("--eval-subset", type=int, default=eval_subset,
                    help="evaluation examples used between full evaluations (the final one uses all)")
    ap.add_argument("--target", default=None, help="e.g. accuracy>=0.98 or loss<=1.7 (default: the workload's)")
    ap.add_argument("--data-dir", default=None, help="folder of the data set (default: the one shipped in data/)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="steps between checkpoints of the run in progress (see --resume)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted comparison in --out: finished runs are kept, a killed run "
                         "continues from its last checkpoint, the saved compute profile is reused")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=seeds, help="number of seeds per strategy")


def parse_speeds(text: str | None) -> tuple[float, ...]:
    """``"1,1,1,0.5"`` -> (1.0, 1.0, 1.0, 0.5); None -> () (every node at speed 1)."""
    if text is None:
        return ()
    try:
        speeds = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"bad --compute-speed {text!r}: give one number per node, e.g. 1,1,1,0.5") from None
    if not all(math.isfinite(v) and v > 0 for v in speeds):
        raise ValueError(f"bad --compute-speed {text!r}: speeds must be positive finite numbers")
    return speeds


def configs_from_args(a: argparse.Namespace, workload: Workload) -> list[TrainConfig]:
    """One TrainConfig per (strategy, seed), checked."""
    if isinstance(a.seeds, bool) or a.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {a.seeds}")
    if a.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {a.seed}")
    if a.lr is not None and not 0 < a.lr < math.inf:
        raise ValueError(f"--lr must be a positive finite learning rate, got {a.lr}")
    network = load_network_file(a.network).with_nodes(a.nodes) if a.network else \
        parse_network(a.nodes, a.bandwidth, a.latency, a.topology, a.framing)
    compute = f"profile:{a.compute_profile}" if a.compute_profile else a.compute
    speeds = parse_speeds(a.compute_speed)
    specs = split_specs(a.strategies)
    if not specs:
        raise ValueError("--strategies is empty; name at least one strategy")
    configs = []
    for spec in specs:
        for seed in range(a.seed, a.seed + a.seeds):
            cfg = TrainConfig(workload=workload, strategy=spec, nodes=a.nodes, network=network, steps=a.steps,
                              batch_size=a.batch_size, eval_every=a.eval_every, eval_subset=a.eval_subset, seed=seed,
                              compute=compute, algorithm=a.algorithm, sharding=Sharding.parse(a.sharding),
                              target=a.target, seed_in_name=True, compute_speed=speeds, jitter=a.jitter,
                              checkpoint_every=a.checkpoint_every)
            cfg.check()
            configs.append(cfg)
    return configs


def main(argv: list[str] | None, description: str, build_workload: Callable[[argparse.Namespace], Workload],
         title: str, **defaults) -> int:
    """Parses flags, trains every (strategy, seed), prints the table and verdicts, writes a plot."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, **defaults)
    a = ap.parse_args(argv)
    try:
        workload = build_workload(a)
        configs = configs_from_args(a, workload)
        check_out_dir(a.out)
        net = configs[0].network
        saved_profile = Path(a.out) / "compute_profile.json"
        if configs[0].compute == "calibrated":  # one profile for the whole comparison, saved with it
            if a.resume and saved_profile.is_file():
                profile = ComputeProfile.load(saved_profile)
                print(f"compute profile: reusing {saved_profile} (--resume)")
            else:
                profile, origin = machine_profile(configs[0], recalibrate=a.recalibrate)
                step = profile.steps[config_step_key(configs[0])]
                profile.save(saved_profile)
                print(f"compute profile: {1e3 * step:.2f} ms per forward+backward step, {origin}; saved to "
                      f"{saved_profile}")
            for cfg in configs:
                cfg.profile = profile
        print(f"{workload.name}: {a.nodes} nodes, network {net.describe()}, {a.steps} steps x {a.batch_size} per "
              f"node, seeds {a.seed}..{a.seed + a.seeds - 1}, target {configs[0].goal}")
        results = []
        for cfg in configs:
            done = finished_run(cfg, a.out) if a.resume else None
            if done is not None:
                print(f"{cfg.name} (seed {cfg.seed}): finished earlier, kept (--resume)")
                results.append(done)
                continue
            print(f"training {cfg.name} (seed {cfg.seed}) ...", flush=True)
            results.append(run(cfg, a.out, resume=a.resume))
    except (ValueError, DataError, NodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"{e}; finished runs are saved in {a.out}/, run again with --resume to continue", file=sys.stderr)
        return 130
    print()
    print(results_table(results))
    for line in verdicts(results):
        print("- " + line)
    plot = plot_runs(results, Path(a.out) / f"{workload.name.split(':')[0]}.png",
                     f"{title}, {a.nodes} nodes, {net.describe()}")
    print(f"\nresults, traces and CSV in {a.out}/; plot: {plot}")
    return 0
