"""The command line: ``python -m pysim compare | sweep | calibrate | show`` (``--help`` on each).

- ``compare`` (alias ``run``): train strategies over seeds on a workload and a simulated
  network; print the table and verdicts, write results, traces and a plot.
- ``sweep``: re-time recorded runs under a grid of links (no retraining).
- ``calibrate``: fit pysim's link model to a real link (run on both ends).
- ``show``: reprint the table, verdicts and plot of saved runs.

Every subcommand takes ``--config FILE``: a TOML file whose keys are the
subcommand's flags (``bandwidth = "1Gbps"``, ``strategies = ["SimpleReduce",
"DiLoCo(H=10)"]``, ``import = ["mystrategies"]``); flags on the command line
win. ``--import MODULE`` (repeatable; a dotted name or a ``.py`` file) loads a
user's module first, so its strategies and workloads can be named.
Input errors end in one line on stderr (``error: ...``) and exit code 2; a
comparison in which every seed of some strategy diverged (its training loss
became NaN or inf) exits with code 3 after printing its table.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
import time
from pathlib import Path
from typing import NoReturn

import tomllib

from pysim import plugins
from pysim.datasets import DataError
from pysim.launch import NodeError, RunInterrupted

EXIT_INPUT_ERROR = 2
EXIT_DIVERGED = 3      # every seed of some strategy diverged
GENERIC_DEFAULTS = {"steps": 600, "batch_size": 64, "nodes": 2, "eval_every": 25, "eval_subset": None}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    try:
        apply_config_file(argv, subparsers)
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:   # --help (0) or a one-line usage error (2), already printed
            return int(e.code or 0)
        for module in getattr(a, "imports", None) or ():
            plugins.load_module(module)
        return COMMANDS[a.command](a)
    except (ValueError, DataError, NodeError) as e:
        print(f"error: {str(e).splitlines()[0] if isinstance(e, NodeError) else e}", file=sys.stderr)
        if isinstance(e, NodeError) and e.node_traceback:
            print(f"(node traceback follows)\n{e.node_traceback}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except RunInterrupted as e:
        print(f"{e}; finished runs are saved, run again with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:   # between runs, or while the report is made
        print("interrupted; finished runs are saved, run again with --resume to continue", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- the parser


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``error: ...`` with where to look, like pysim's own.
    A value that starts with a minus and a digit (``--bandwidth -5Mbit``, ``--lr -1e-3``) is a
    value, so it gets the option's own message rather than "expected one argument" (argparse
    takes only plain negative numbers as values; no pysim option looks like ``-5``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    ap = OneLineParser(prog="python -m pysim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", aliases=["run"], help="train strategies over seeds and compare them",
                             description="Trains every strategy with every seed on a workload over a simulated "
                                         "network, then prints a table (final metric, simulated time, time to "
                                         "target, bytes, idle share), verdicts and a plot.")
    add_compare_arguments(compare)
    sweep = sub.add_parser("sweep", help="re-time recorded runs under a grid of networks (no retraining)",
                           description="Re-times recorded runs (run folders, or folders of them) under a grid of "
                                       "link bandwidths and latencies and reports where each strategy wins.")
    add_sweep_arguments(sweep)
    cal = sub.add_parser("calibrate", help="fit latency, bandwidth and framing to a real link (two processes)",
                         description="Times real gloo all-reduces between two processes (run one per end of "
                                     "the link) and fits pysim's link model; rank 0 writes a network file.")
    from pysim.calibrate import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(cal)
    show = sub.add_parser("show", help="reprint the table, verdicts and plot of saved runs",
                          description="Loads saved runs (run folders, or folders of them) and prints their table "
                                      "and verdicts as a comparison does, and writes the plot.")
    show.add_argument("results", nargs="+", help="run folders or folders of them (e.g. runs/mnist)")
    show.add_argument("--plot", default=None, help="where to write the plot (default: beside the first folder)")
    parsers = {"compare": compare, "run": compare, "sweep": sweep, "calibrate": cal, "show": show}
    for p in parsers.values():
        if not any(a.dest == "config" for a in p._actions):
            p.add_argument("--config", default=None, metavar="FILE",
                           help="a TOML file of flags (keys: flag names, e.g. nodes = 4); flags given here win")
    return ap, parsers


def add_compare_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of a comparison."""
    ap.add_argument("--workload", default="mnist",
                    help="mnist | shakespeare | idx:DIR (IDX image set) | a registered name | "
                         "package.module:function (a factory returning a pysim.Workload)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import a module (dotted name or .py file) first, so its strategies and workloads "
                         "can be named; repeatable")
    ap.add_argument("--strategies", default="SimpleReduce; DiLoCo(H=10)",
                    help="strategy specs separated by ';' (or commas outside parentheses), e.g. "
                         "\"SimpleReduce; DiLoCo(H=50); SPARTA(p=0.01)\"")
    ap.add_argument("--nodes", type=int, default=None, help="simulated nodes (default: the workload's study, 2)")
    ap.add_argument("--processes", type=int, default=None,
                    help="worker processes the nodes are spread over (default: one per core, at most one per "
                         "node); changes real time only, never a result")
    ap.add_argument("--no-pin-cpus", dest="pin_cpus", action="store_false",
                    help="leave the worker processes to the scheduler (default: one CPU each when there are as "
                         "many workers as CPUs); for a machine that other jobs share")
    add_network_arguments(ap)
    ap.add_argument("--algorithm", default="ring", choices=["ring", "star"], help="all-reduce algorithm")
    ap.add_argument("--steps", type=int, default=None, help="training steps per node (default: the workload's)")
    ap.add_argument("--batch-size", type=int, default=None, help="per node (default: the workload's)")
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
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: the workload's)")
    ap.add_argument("--eval-subset", type=int, default=None,
                    help="evaluation examples used between full evaluations (the final one uses all)")
    ap.add_argument("--target", default=None, help="e.g. accuracy>=0.98 or loss<=1.7 (default: the workload's)")
    ap.add_argument("--data-dir", default=None, help="folder of the data set (default: the one shipped in data/)")
    ap.add_argument("--out", default=None, help="results folder (default: runs/<workload>)")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="steps between checkpoints of the run in progress (see --resume)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted comparison in --out: finished runs are kept, a killed run "
                         "continues from its last checkpoint, the saved compute profile is reused")
    ap.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="write TensorBoard event files (loss, evaluations, bytes, simulated time per step) here")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds per strategy")
    ap.add_argument("--title", default=None, help="title of the plot (default: the workload's name)")


TCP_HELP = ("TCP window model: off | reno | cubic (initial window 10, slow start, restart after an idle RTO, as "
            "Linux) | bbr (no restart after idle), with optional :iw=SEGMENTS:cap=BYTES[KiB|MiB]:idle=restart|keep"
            ":rto_min=MS:rendezvous=on|off:segment=BYTES[KiB|MiB] (gloo: reno:rendezvous=on:segment=1MiB, its ready "
            "notice per message and its ring in 1 MiB segments); see pysim/tcp.py")


def add_network_arguments(ap: argparse.ArgumentParser) -> None:
    """The simulated network of a comparison: link, topology, framing, TCP model, or a file."""
    ap.add_argument("--bandwidth", default="100Mbit", help="per-node link with its unit, e.g. 100Mbit, 1Gbps, 10MB/s")
    ap.add_argument("--latency", default="20ms", help="one-way link latency with its unit, e.g. 20ms, 150us")
    ap.add_argument("--topology", default="uniform", help="uniform | two-tier:G:BW:LAT | slow-node:I:BW:LAT")
    ap.add_argument("--framing", default="ideal",
                    help="protocol bytes charged on top of the packets: ideal | tcp (TCP/IPv4 as tc counts it, "
                         "66 B per 1448-byte segment, and a 66 B ACK per 2 segments on the reverse path) | "
                         "tcp-ethernet (90 B per segment and per ACK, a physical wire)")
    ap.add_argument("--tcp", default="off",
                    help=TCP_HELP)
    ap.add_argument("--network", default=None,
                    help="a network file (e.g. written by `python -m pysim calibrate`); replaces --bandwidth, "
                         "--latency, --topology and --framing")


def add_sweep_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("results", nargs="*", help="run folders or folders of them (e.g. runs/mnist)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import a module first (its strategies, for --train); repeatable")
    ap.add_argument("--train", default=None, metavar="JSON",
                    help="a JSON file with a list of run configs: runs missing from --runs-dir are trained first")
    ap.add_argument("--runs-dir", default="runs/sweep", help="where --train runs are found or trained")
    ap.add_argument("--bandwidths", default="10Mbit:100Gbit:20", help="LO:HI:N (log-spaced) or a list")
    ap.add_argument("--latencies", default="0.1ms:200ms:10", help="LO:HI:N (log-spaced) or a list")
    ap.add_argument("--topology", default="uniform", help="uniform | two-tier:G:BW:LAT (grid sweeps the inter link)")
    ap.add_argument("--tcp", default="off",
                    help=TCP_HELP)
    ap.add_argument("--target", default=None, help="e.g. accuracy>=0.98 or loss<=1.7 (default: the runs' own)")
    ap.add_argument("--table-latency", default=None,
                    help="latency of the printed table and line plot, one of --latencies (default: nearest 20ms)")
    ap.add_argument("--out", default="runs/sweep_out")


def apply_config_file(argv: list[str], parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Reads ``--config FILE`` from ``argv`` (after the subcommand) and makes its keys that
    subcommand's defaults, so flags on the command line still win."""
    command = next((a for a in argv if not a.startswith("-")), None)
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None or command not in parsers:
        return
    try:
        values = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} is not TOML ({e})") from None
    parser = parsers[command]
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    names = {a.dest: a.dest for a in dests.values()} | {"import": "imports"}
    defaults = {}
    for key, value in values.items():
        dest = names.get(key.replace("-", "_"))
        if dest is None:
            close = difflib.get_close_matches(key.replace("-", "_"), list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config {path}: {command} has no flag {key!r}{hint}")
        defaults[dest] = config_value(dests[dest], value, path, key)
    parser.set_defaults(**defaults)


def config_value(action: argparse.Action, value: object, path: str, key: str) -> object:
    """A TOML value as the flag's default: lists join (strategies) or stay lists (repeatable flags),
    scalars become the string the flag would parse, booleans set switches."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} is a switch; give true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [str(v) for v in values]
    if isinstance(value, list):
        if action.dest != "strategies":
            raise ValueError(f"--config {path}: {key} takes one value, not a list")
        return "; ".join(str(v) for v in value)
    if isinstance(value, dict):
        raise ValueError(f"--config {path}: {key} takes a value, not a table")
    text = str(value)
    if not callable(action.type):
        return text
    try:
        return action.type(text)
    except ValueError:
        raise ValueError(f"--config {path}: {key} = {value!r} is not {_TYPE_NAMES.get(action.type, 'valid')}") \
            from None


_TYPE_NAMES = {int: "an integer", float: "a number"}


# ---------------------------------------------------------------- compare


def compare_command(a: argparse.Namespace) -> int:
    from pysim.compare import compare, comparison_configs, report, split_specs
    from pysim.trainer import RunOptions

    workload = plugins.resolve_workload(a.workload, a.data_dir, a.lr)
    for name, generic in GENERIC_DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, workload.defaults.get(name, generic))
    out = a.out or f"runs/{workload.name.split(':')[0]}"
    configs = comparison_configs(base_config(a, workload), split_specs(a.strategies), a.seeds, a.processes)
    options = RunOptions(processes=a.processes, tensorboard=a.tensorboard, pin_cpus=a.pin_cpus)
    results = compare(configs, out, a.resume, a.recalibrate, options, say=lambda line: print(line, flush=True))
    net = configs[0].network
    title = f"{a.title or workload.name}, {nodes_text(a.nodes)}, {net.describe()}"
    for line in report(results, Path(out) / f"{workload.name.split(':')[0]}.png", title):
        print(line)
    print(f"results, traces and CSV in {out}/")
    return diverged_exit(results)


def nodes_text(n: int) -> str:
    """``"1 node"``, ``"4 nodes"``: for plot titles."""
    return f"{n} node{'s' if n != 1 else ''}"


def diverged_exit(results) -> int:
    """:data:`EXIT_DIVERGED`, with a line on stderr, if every seed of some strategy diverged; else 0."""
    from pysim.report import group_by_label

    gone = [label for label, runs in group_by_label(results).items() if all(r.diverged for r in runs)]
    if not gone:
        return 0
    print(f"error: diverged in every seed: {'; '.join(gone)} (training loss NaN or inf; lower --lr, or check "
          "the model and loss)", file=sys.stderr)
    return EXIT_DIVERGED


def base_config(a: argparse.Namespace, workload):
    """The TrainConfig every run of the comparison shares (strategy and seed vary)."""
    from pysim.config import TrainConfig
    from pysim.network import load_network_file, parse_network
    from pysim.sharding import Sharding

    network = load_network_file(a.network).with_nodes(a.nodes) if a.network else \
        parse_network(a.nodes, a.bandwidth, a.latency, a.topology, a.framing)
    if a.tcp != "off" or not a.network:
        network = network.with_tcp(a.tcp)
    compute = f"profile:{a.compute_profile}" if a.compute_profile else a.compute
    if a.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {a.seed}")
    if a.lr is not None and not 0 < a.lr < float("inf"):
        raise ValueError(f"--lr must be a positive finite learning rate, got {a.lr}")
    return TrainConfig(workload=workload, nodes=a.nodes, network=network, steps=a.steps, batch_size=a.batch_size,
                       eval_every=a.eval_every, eval_subset=a.eval_subset, seed=a.seed, compute=compute,
                       algorithm=a.algorithm, sharding=Sharding.parse(a.sharding), target=a.target,
                       compute_speed=parse_speeds(a.compute_speed), jitter=a.jitter,
                       checkpoint_every=a.checkpoint_every)


def parse_speeds(text: str | None) -> tuple[float, ...]:
    """``"1,1,1,0.5"`` -> (1.0, 1.0, 1.0, 0.5); None -> () (every node at speed 1)."""
    if text is None:
        return ()
    try:
        speeds = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"bad --compute-speed {text!r}: give one number per node, e.g. 1,1,1,0.5") from None
    if not all(0 < v < float("inf") for v in speeds):
        raise ValueError(f"bad --compute-speed {text!r}: speeds must be positive finite numbers")
    return speeds


# ---------------------------------------------------------------- sweep, show, calibrate


def sweep_command(a: argparse.Namespace) -> int:
    paths = list(a.results)
    if a.train:
        paths += train_missing(a.train, a.runs_dir)
    if not paths:
        raise ValueError("give run folders, or --train JSON")
    t0 = time.perf_counter()
    s, table = run_sweep(paths, a.bandwidths, a.latencies, a.target, a.topology, a.out, a.table_latency, a.tcp)
    print(table)
    grid = len(s.bandwidths_bps) * len(s.latencies_s)
    print(f"\n{len(s.names)} runs x {grid} networks re-timed in {time.perf_counter() - t0:.2f} s; "
          f"outputs in {a.out}/ (sweep.csv, sweep.json, sweep_bandwidth.png, sweep_winner.png)")
    return 0


def run_sweep(paths: list, bandwidths: str, latencies: str, target: str | None = None, topology: str = "uniform",
              out_dir: str | Path | None = None, table_latency: str | None = None, tcp: str = "off"):
    """Loads runs, re-times them over the grid (``"LO:HI:N"`` or lists; ``tcp``: the window model,
    :func:`pysim.tcp.parse_tcp`), writes the data and plots to ``out_dir`` if given; returns the
    :class:`pysim.sweep.Sweep` and its printed table."""
    from pysim.network import parse_bandwidth, parse_latency
    from pysim.report import plot_sweep, sweep_table
    from pysim.sweep import load_runs, nearest, parse_grid, sweep, write_data
    from pysim.tcp import parse_tcp

    s = sweep(load_runs(paths), parse_grid(bandwidths, parse_bandwidth, "bandwidth"),
              parse_grid(latencies, parse_latency, "latency"), target, topology, parse_tcp(tcp))
    if table_latency is None:
        j = nearest(s.latencies_s, 0.020)
    else:
        wanted = parse_latency(table_latency)
        j = nearest(s.latencies_s, wanted)
        if not math.isclose(s.latencies_s[j], wanted, rel_tol=1e-6):
            grid = ", ".join(f"{1e3 * v:g}ms" for v in s.latencies_s)
            raise ValueError(f"--table-latency {table_latency} is not on the latency grid ({grid}); give one of them")
    if out_dir is not None:
        write_data(s, out_dir)
        plot_sweep(s, Path(out_dir), j)
    return s, sweep_table(s, j)


def train_missing(config_path: str, runs_dir: str) -> list[Path]:
    """Trains each config of the JSON file whose results are not in runs_dir yet (same config)."""
    import json

    from pysim.config import TrainConfig
    from pysim.rundir import run_path
    from pysim.trainer import finished_run, run

    try:
        items = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read --train {config_path}: {e}") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{config_path} must hold a non-empty JSON list of run configs (objects)")
    out = []
    for item in items:
        try:
            cfg = TrainConfig.from_json(item) if isinstance(item.get("network"), dict) else TrainConfig(**item)
        except TypeError as e:
            raise ValueError(f"bad run config in {config_path}: {e}") from None
        cfg.check()
        path = run_path(runs_dir, cfg.run_name)
        if finished_run(cfg, runs_dir) is not None:
            print(f"{cfg.name}: using recorded run {path}")
        else:
            print(f"{cfg.name}: training ...", flush=True)
            run(cfg, runs_dir)
        out.append(path)
    return out


def show_command(a: argparse.Namespace) -> int:
    from pysim.report import plot_runs, results_table, verdicts
    from pysim.rundir import load_result, unique_run_dirs

    results = [load_result(d) for d in unique_run_dirs(a.results)]   # a run named twice counts once
    print(results_table(results))
    for line in verdicts(results):
        print("- " + line)
    first, r = Path(a.results[0]), results[0]
    plot = Path(a.plot) if a.plot else (first if first.is_dir() else first.parent) / f"{r.workload.split(':')[0]}.png"
    print(f"plot: {plot_runs(results, plot, f'{r.workload}, {nodes_text(r.nodes)}, {r.network}')}")
    return 0


def calibrate_command(a: argparse.Namespace) -> int:
    from pysim.calibrate import run_cli

    return run_cli(a)


COMMANDS = {"compare": compare_command, "run": compare_command, "sweep": sweep_command,
            "calibrate": calibrate_command, "show": show_command}
