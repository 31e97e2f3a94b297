"""Bandwidth sensitivity: re-time recorded runs under a grid of networks, without retraining.

For each run and each (bandwidth, latency) of the grid, the run's trace is
replayed (:func:`pysim.clock.replay`, vectorised over the grid) and the
simulated time at which it reached its target (interpolated between
evaluations, :func:`pysim.result.time_to_target`) is read off. Synchronous
strategies do the same arithmetic on any network, so these numbers equal
those of a fresh run on that network (tested).

Runs of one strategy configuration (the same label) with several seeds are
kept apart: every figure exists per seed, and the report gives the median
and the range over seeds. The crossover bandwidth of a strategy, per seed, is
where its time to target equals the baseline's (SimpleReduce, same seed):
below it the strategy wins. It is interpolated linearly in log(bandwidth) on
log(time ratio) between the two grid points around the sign change. A
verdict ("A beats B here") is given only where every seed agrees; elsewhere
the strategies tie.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pysim.clock import replay
from pysim.network import Link, Network, format_bandwidth
from pysim.probe import check_reachable
from pysim.result import BASELINE, Result, crossing_step, time_at_step
from pysim.rundir import load_result, unique_run_dirs
from pysim.tcp import TcpModel
from pysim.workload import Target

MAX_GRID_AXIS = 1000
MAX_GRID_POINTS = 20000


def parse_grid(spec: str, parse, what: str) -> list[float]:
    """``"LO:HI:N"`` (N log-spaced points, both ends included) or a comma-separated list."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {what} grid; give 'LO:HI:N' (e.g. 10Mbit:100Gbit:20) or a comma-separated list")
    m = re.fullmatch(r"\s*([^:,]+):([^:,]+):(\d+)\s*", spec)
    if m:
        lo, hi, n = parse(m.group(1)), parse(m.group(2)), int(m.group(3))
        if n < 1:
            raise ValueError(f"bad {what} grid {spec!r}: needs at least one point")
        if n > MAX_GRID_AXIS:
            raise ValueError(f"bad {what} grid {spec!r}: {n} points; at most {MAX_GRID_AXIS} per axis "
                             "(the replay holds every point of the grid in memory at once)")
        if lo <= 0 or hi < lo:
            raise ValueError(f"bad {what} grid {spec!r}: needs 0 < LO <= HI for a log-spaced grid")
        values = [lo] if n == 1 else list(np.geomspace(lo, hi, n))
    else:
        values = [parse(v) for v in spec.split(",") if v.strip()]
        if not values:
            raise ValueError(f"empty {what} grid {spec!r}")
    return sorted(set(values))


@dataclass
class Sweep:
    """Time to target (s) per strategy label, seed, bandwidth and latency; NaN where a run never got
    there or a seed is missing."""

    names: list[str]               # strategy labels
    seeds: list[int]
    bandwidths_bps: list[float]
    latencies_s: list[float]
    time_to_target_s: np.ndarray   # (names, seeds, bandwidths, latencies)
    total_s: np.ndarray            # (names, seeds, bandwidths, latencies): whole run
    target: Target

    def winner(self) -> np.ndarray:
        """Index of the label fastest to target in every seed, per (bandwidth, latency); -1 where the
        seeds disagree (a tie) or nothing reached the target."""
        t = np.where(np.isnan(self.time_to_target_s), np.inf, self.time_to_target_s)
        best = t.argmin(axis=0)                       # (seeds, bw, lat)
        reached = np.isfinite(t.min(axis=0))
        agree = np.all(best == best[:1], axis=0) & np.all(reached, axis=0)
        return np.where(agree, best[0], -1)

    def crossover_bps(self, name: str, latency_index: int) -> list[float | None]:
        """Per seed: the largest bandwidth at which ``name`` still reaches the target sooner than
        SimpleReduce (None where there is no sign change on the grid)."""
        if BASELINE not in self.names or name == BASELINE:
            return [None] * len(self.seeds)
        out: list[float | None] = []
        bw = np.log(np.array(self.bandwidths_bps))
        for k in range(len(self.seeds)):
            a = self.time_to_target_s[self.names.index(name), k, :, latency_index]
            b = self.time_to_target_s[self.names.index(BASELINE), k, :, latency_index]
            r = np.log(a / b)  # < 0: the strategy wins
            x = None
            for i in range(len(r) - 1):
                if np.isfinite(r[i]) and np.isfinite(r[i + 1]) and r[i] < 0 <= r[i + 1]:
                    x = float(math.exp(bw[i] + (bw[i + 1] - bw[i]) * (0 - r[i]) / (r[i + 1] - r[i])))
                    break
            out.append(x)
        return out

    def describe_crossover(self, name: str, latency_index: int) -> str:
        """The crossover as a median and a range over seeds, or why there is none."""
        xs = self.crossover_bps(name, latency_index)
        found = [x for x in xs if x is not None]
        if found and len(found) == len(xs):
            lo, mid, hi = min(found), float(np.median(found)), max(found)
            if len(found) == 1:
                return f"wins below {format_bandwidth(mid)}"
            return f"wins below {format_bandwidth(mid)} ({format_bandwidth(lo)} to {format_bandwidth(hi)})"
        a = self.time_to_target_s[self.names.index(name), :, :, latency_index]
        b = self.time_to_target_s[self.names.index(BASELINE), :, :, latency_index]
        if np.all(np.isnan(a)):
            return "never reaches the target"
        if np.all(a < b):
            return "wins on the whole grid"
        if np.all(~(a < b)):
            return "never wins on the grid"
        if found:
            return f"seeds disagree: {len(found)} of {len(xs)} cross, near {format_bandwidth(float(np.median(found)))}"
        return "mixed (no single crossover)"


def build_network(nodes: int, topology: str, bandwidth_bps: float, latency_s: float,
                  tcp: TcpModel | None = None) -> Network:
    """``uniform``: every node on the swept link. ``two-tier:G:BW:LAT``: groups of G on a
    BW/LAT link, the swept link joins the groups. ``tcp``: the window model (None: off)."""
    kind, *args = topology.split(":")
    if kind == "uniform" and not args:
        return Network((Link(bandwidth_bps, bandwidth_bps, latency_s),) * nodes, tcp=tcp)
    if kind == "two-tier" and len(args) == 3:
        intra = Link.of(args[1], args[2])
        return Network((intra,) * nodes, Link(bandwidth_bps, bandwidth_bps, latency_s), int(args[0]), tcp=tcp)
    raise ValueError(f"bad sweep topology {topology!r}: use 'uniform' or 'two-tier:G:BW:LAT' "
                     "(the grid then sweeps the link between groups)")


def sweep(runs: list[Result], bandwidths_bps: list[float], latencies_s: list[float],
          target: Target | str | None = None, topology: str = "uniform", tcp: TcpModel | None = None) -> Sweep:
    """Re-times each run (with its trace) under every grid point (with TCP window model ``tcp``,
    if given). ``target``: default the runs' own (they must agree)."""
    if not runs:
        raise ValueError("sweep needs at least one recorded run")
    if not bandwidths_bps or not latencies_s:
        raise ValueError("sweep needs a non-empty bandwidth and latency grid")
    if len(bandwidths_bps) * len(latencies_s) > MAX_GRID_POINTS:
        raise ValueError(f"a grid of {len(bandwidths_bps)} x {len(latencies_s)} networks is too large; at most "
                         f"{MAX_GRID_POINTS} points (a replay holds steps x nodes x networks clocks in memory)")
    goals = {str(r.target) for r in runs}
    if target is None:
        if len(goals) != 1:
            raise ValueError(f"the runs have different targets {sorted(goals)}; pass --target")
        target = goals.pop()
    target = Target.parse(target)
    recorded = {m for r in runs for e in r.evals for m in e.metrics}
    if target.metric not in recorded:
        raise ValueError(f"target {target} names metric {target.metric!r}, which the runs do not record; they "
                         f"record {', '.join(sorted(recorded)) or 'no metrics'}")
    if all((getattr(r, "config", None) or {}).get("workload", {}).get("spec") for r in runs):   # built-in: ranges known
        check_reachable(target)
    names = list(dict.fromkeys(r.label for r in runs))
    seeds = sorted({r.seed for r in runs})
    seen = set()
    for r in runs:
        key = (r.label, r.seed)
        if key in seen:
            raise ValueError(f"two runs of {key[0]!r} with seed {key[1]}; give them distinct labels or folders")
        seen.add(key)
    shape = (len(names), len(seeds), len(bandwidths_bps), len(latencies_s))
    ttt, total = np.full(shape, np.nan), np.full(shape, np.nan)
    for result in runs:
        if result.trace is None:
            raise ValueError(f"run {result.name!r} has no trace to re-time")
        if result.trace.server_rounds():
            raise ValueError(f"run {result.name!r} is asynchronous: the order in which its server applied updates "
                             "depends on the network, so re-timing it under another network would keep an order "
                             "that network would not produce; train it on each network instead")
        k, j = names.index(result.label), seeds.index(result.seed)
        nets = [build_network(result.trace.nodes, topology, b, lat, tcp) for b in bandwidths_bps
                for lat in latencies_s]
        tl = replay(result.trace, nets, result.scaling)
        total[k, j] = tl.total_s.reshape(shape[2:])
        reached = time_to_target_grid(result, target, tl.step_end_s)
        if reached is not None:
            ttt[k, j] = reached.reshape(shape[2:])
    return Sweep(names, seeds, list(bandwidths_bps), list(latencies_s), ttt, total, target)


def time_to_target_grid(result: Result, target: Target, step_end_s: np.ndarray) -> np.ndarray | None:
    """Time to target of one run under every replayed network (``step_end_s``: steps x networks)."""
    crossing = crossing_step(result.metric_series(target.metric), target)
    return None if crossing is None else time_at_step(step_end_s, crossing[0])


def load_runs(paths: list[str | Path]) -> list[Result]:
    """The runs at ``paths`` (run directories, or folders of them: see :mod:`pysim.rundir`), each checked
    against its manifest. Other files in a folder, such as a sweep's own outputs, are not runs and are
    ignored. Runs of different node counts are refused: their times are not comparable."""
    runs = [load_result(d) for d in unique_run_dirs(paths)]
    by_nodes: dict[int, list[str]] = {}
    for result in runs:
        by_nodes.setdefault(result.trace.nodes, []).append(result.name)
    if len(by_nodes) > 1:
        mix = "; ".join(f"{n} nodes: {', '.join(names)}" for n, names in sorted(by_nodes.items()))
        raise ValueError(f"runs differ in node count ({mix}); a sweep compares runs of one node count, "
                         "so give only runs trained with the same number of nodes")
    return runs


def nearest(values: list[float], x: float) -> int:
    return int(np.argmin([abs(math.log(v / x)) if v > 0 and x > 0 else abs(v - x) for v in values]))


def write_data(s: Sweep, out_dir: str | Path) -> list[Path]:
    """CSV + JSON of the whole grid (every seed); the plots are :func:`pysim.report.plot_sweep`'s."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "bandwidth_bps", "latency_s", "time_to_target_s", "total_s"])
        for k, name in enumerate(s.names):
            for q, seed in enumerate(s.seeds):
                for i, b in enumerate(s.bandwidths_bps):
                    for j, lat in enumerate(s.latencies_s):
                        t = s.time_to_target_s[k, q, i, j]
                        w.writerow([name, seed, b, lat, "" if np.isnan(t) else t, s.total_s[k, q, i, j]])
    crossovers = {name: {f"{lat:g}": s.crossover_bps(name, j) for j, lat in enumerate(s.latencies_s)}
                  for name in s.names if name != BASELINE}

    def nan_to_none(a: np.ndarray) -> list:
        return np.where(np.isnan(a), None, a).tolist()

    (out / "sweep.json").write_text(json.dumps({
        "target": str(s.target), "strategies": s.names, "seeds": s.seeds, "bandwidths_bps": s.bandwidths_bps,
        "latencies_s": s.latencies_s, "time_to_target_s": nan_to_none(s.time_to_target_s),
        "total_s": nan_to_none(s.total_s), "crossover_bps_per_seed": crossovers,
        "winner": [[s.names[w] if w >= 0 else None for w in row] for row in s.winner().tolist()]}, indent=1))
    return [out / "sweep.csv", out / "sweep.json"]
