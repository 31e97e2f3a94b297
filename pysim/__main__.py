"""Command line: ``python -m pysim sweep RESULTS... [options]`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pysim.datasets import DataError
from pysim.launch import NodeError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pysim")
    sub = ap.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="re-time recorded runs under a grid of networks (no retraining)",
                        description="Re-times recorded runs (results .json files or folders of them) under a "
                                    "grid of link bandwidths and latencies and reports where each strategy wins.")
    sw.add_argument("results", nargs="*", help="results .json files or folders (e.g. runs/mnist)")
    sw.add_argument("--config", help="a JSON file with a list of Trainer configs: runs missing from --runs-dir "
                                     "are trained first")
    sw.add_argument("--runs-dir", default="runs/sweep", help="where --config runs are found or trained")
    sw.add_argument("--bandwidths", default="10Mbit:100Gbit:20", help="LO:HI:N (log-spaced) or a list")
    sw.add_argument("--latencies", default="0.1ms:200ms:10", help="LO:HI:N (log-spaced) or a list")
    sw.add_argument("--topology", default="uniform", help="uniform | two-tier:G:BW:LAT (grid sweeps the inter link)")
    sw.add_argument("--target", default=None, help="e.g. accuracy>=0.98 or loss<=1.7 (default: the runs' own)")
    sw.add_argument("--table-latency", default="20ms", help="latency of the printed table and line plot")
    sw.add_argument("--out", default="runs/sweep_out")
    cal = sub.add_parser("calibrate", help="fit latency, bandwidth and framing to a real link (two processes)",
                         description="Times real gloo all-reduces between two processes (run one per end of "
                                     "the link) and fits pysim's link model; rank 0 writes a network file.")
    from pysim.calibrate import add_arguments, run_cli

    add_arguments(cal)
    a = ap.parse_args(argv)
    if a.command == "calibrate":
        try:
            return run_cli(a)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        paths = list(a.results)
        if a.config:
            paths += train_missing(a.config, a.runs_dir)
        if not paths:
            raise ValueError("give results files/folders or --config")
        t0 = time.perf_counter()
        from pysim.sweep import run_sweep

        s, table = run_sweep(paths, a.bandwidths, a.latencies, a.target, a.topology, a.out, a.table_latency)
    except (ValueError, DataError, NodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    grid = len(s.bandwidths_bps) * len(s.latencies_s)
    print(f"\n{len(s.names)} runs x {grid} networks re-timed in {time.perf_counter() - t0:.2f} s; "
          f"outputs in {a.out}/ (sweep.csv, sweep.json, sweep_bandwidth.png, sweep_winner.png)")
    return 0


def train_missing(config_path: str, runs_dir: str) -> list[Path]:
    """Trains each config of the file whose results are not in runs_dir yet (same config)."""
    import json

    from pysim.results import run_path
    from pysim.trainer import TrainConfig, finished_run, run

    try:
        items = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {config_path}: {e}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{config_path} must hold a non-empty JSON list of Trainer configs")
    out = []
    for item in items:
        try:
            cfg = TrainConfig.from_json(item) if "network" in item and isinstance(item["network"], dict) \
                else TrainConfig(**item)
        except TypeError as e:
            raise ValueError(f"bad config in {config_path}: {e}") from None
        cfg.check()
        path = run_path(runs_dir, cfg.run_name)
        if finished_run(cfg, runs_dir) is not None:
            print(f"{cfg.name}: using recorded run {path}")
            out.append(path)
            continue
        print(f"{cfg.name}: training ...", flush=True)
        run(cfg, runs_dir)
        out.append(path)
    return out


if __name__ == "__main__":
    sys.exit(main())
