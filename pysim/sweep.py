"""Bandwidth sensitivity: re-time recorded runs under a grid of networks, without retraining.

For each run and each (bandwidth, latency) of the grid, the run's trace is
replayed (:func:`pysim.clock.replay`, vectorised over the grid) and the
simulated time of its first evaluation at or above the target accuracy is
read off. Synchronous strategies do the same arithmetic on any network, so
these numbers equal those of a fresh run on that network.

The crossover bandwidth of a strategy is where its time to target equals
SimpleReduce's: below it the strategy wins. It is interpolated linearly in
log(bandwidth) on log(time ratio) between the two grid points around the
sign change.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pysim.clock import Trace, replay
from pysim.network import Link, Network, format_bandwidth, parse_bandwidth, parse_latency
from pysim.report import markdown_table
from pysim.results import load_result, run_dirs, time_to_target

BASELINE = "SimpleReduce"


def parse_grid(spec: str, parse, what: str) -> list[float]:
    """``"LO:HI:N"`` (N log-spaced points, both ends included) or a comma-separated list."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {what} grid; give 'LO:HI:N' (e.g. 10Mbit:100Gbit:20) or a comma-separated list")
    m = re.fullmatch(r"\s*([^:,]+):([^:,]+):(\d+)\s*", spec)
    if m:
        lo, hi, n = parse(m.group(1)), parse(m.group(2)), int(m.group(3))
        if n < 1:
            raise ValueError(f"bad {what} grid {spec!r}: needs at least one point")
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
    """Time to target (s) per run, bandwidth and latency; NaN where the run never got there."""

    names: list[str]
    bandwidths_bps: list[float]
    latencies_s: list[float]
    time_to_target_s: np.ndarray   # (runs, bandwidths, latencies)
    total_s: np.ndarray            # (runs, bandwidths, latencies): whole run
    target_acc: float

    def winner(self) -> np.ndarray:
        """Index of the fastest run to target per (bandwidth, latency); -1 if none reached it."""
        t = np.where(np.isnan(self.time_to_target_s), np.inf, self.time_to_target_s)
        w = t.argmin(axis=0)
        return np.where(np.isinf(t.min(axis=0)), -1, w)

    def crossover_bps(self, name: str, latency_index: int) -> float | None:
        """Largest bandwidth at which ``name`` still reaches the target sooner than SimpleReduce;
        None if there is no sign change on the grid (see :meth:`describe_crossover`)."""
        if BASELINE not in self.names or name == BASELINE:
            return None
        a = self.time_to_target_s[self.names.index(name), :, latency_index]
        b = self.time_to_target_s[self.names.index(BASELINE), :, latency_index]
        r = np.log(a / b)  # < 0: the strategy wins
        bw = np.log(np.array(self.bandwidths_bps))
        for i in range(len(r) - 1):
            if np.isfinite(r[i]) and np.isfinite(r[i + 1]) and r[i] < 0 <= r[i + 1]:
                x = bw[i] + (bw[i + 1] - bw[i]) * (0 - r[i]) / (r[i + 1] - r[i])
                return float(math.exp(x))
        return None

    def describe_crossover(self, name: str, latency_index: int) -> str:
        x = self.crossover_bps(name, latency_index)
        if x is not None:
            return f"wins below {format_bandwidth(x)}"
        a = self.time_to_target_s[self.names.index(name), :, latency_index]
        b = self.time_to_target_s[self.names.index(BASELINE), :, latency_index]
        if np.all(np.isnan(a)):
            return "never reaches the target"
        if np.all(a < b):
            return "wins on the whole grid"
        if np.all(~(a < b)):
            return "never wins on the grid"
        return "mixed (no single crossover)"


def build_network(nodes: int, topology: str, bandwidth_bps: float, latency_s: float) -> Network:
    """``uniform``: every node on the swept link. ``two-tier:G:BW:LAT``: groups of G on a
    BW/LAT link, the swept link joins the groups."""
    kind, *args = topology.split(":")
    if kind == "uniform" and not args:
        return Network((Link(bandwidth_bps, bandwidth_bps, latency_s),) * nodes)
    if kind == "two-tier" and len(args) == 3:
        intra = Link.of(args[1], args[2])
        return Network((intra,) * nodes, Link(bandwidth_bps, bandwidth_bps, latency_s), int(args[0]))
    raise ValueError(f"bad sweep topology {topology!r}: use 'uniform' or 'two-tier:G:BW:LAT' "
                     "(the grid then sweeps the link between groups)")


def sweep(runs: list[tuple[dict, Trace]], bandwidths_bps: list[float], latencies_s: list[float],
          target_acc: float, topology: str = "uniform") -> Sweep:
    """Re-times each (result, trace) under every grid point."""
    if not runs:
        raise ValueError("sweep needs at least one recorded run")
    if not bandwidths_bps or not latencies_s:
        raise ValueError("sweep needs a non-empty bandwidth and latency grid")
    names = [r["name"] for r, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a name in {names}; give them distinct labels")
    shape = (len(runs), len(bandwidths_bps), len(latencies_s))
    ttt, total = np.full(shape, np.nan), np.zeros(shape)
    for k, (result, trace) in enumerate(runs):
        nets = [build_network(trace.nodes, topology, b, lat) for b in bandwidths_bps for lat in latencies_s]
        device = result["config"]["compute"]
        tl = replay(trace, nets, None if device == "measured" else device)
        total[k] = tl.total_s.reshape(shape[1:])
        first = time_to_target(result["evals"], target_acc, key="step")
        if first is not None:
            ttt[k] = tl.step_end_s[first - 1].reshape(shape[1:])
    return Sweep(names, list(bandwidths_bps), list(latencies_s), ttt, total, target_acc)


def load_runs(paths: list[str | Path]) -> list[tuple[dict, Trace]]:
    """The runs at ``paths`` (run directories, or folders of them: see :mod:`pysim.results`), each checked
    against its manifest. Other files in a folder, such as a sweep's own outputs, are not runs and are
    ignored. Runs of different node counts are refused: their times are not comparable."""
    dirs: list[Path] = []
    for p in paths:
        dirs += [d for d in run_dirs(p) if d.resolve() not in {x.resolve() for x in dirs}]
    runs = [load_result(d) for d in dirs]
    by_nodes: dict[int, list[str]] = {}
    for result, trace in runs:
        by_nodes.setdefault(trace.nodes, []).append(result["name"])
    if len(by_nodes) > 1:
        mix = "; ".join(f"{n} nodes: {', '.join(names)}" for n, names in sorted(by_nodes.items()))
        raise ValueError(f"runs differ in node count ({mix}); a sweep compares runs of one node count, "
                         "so give only runs trained with the same number of nodes")
    return runs


def nearest(values: list[float], x: float) -> int:
    return int(np.argmin([abs(math.log(v / x)) if v > 0 and x > 0 else abs(v - x) for v in values]))


def format_table(s: Sweep, latency_index: int) -> str:
    lat = s.latencies_s[latency_index]
    head = ["bandwidth"] + s.names + ["winner"]
    winner = s.winner()
    rows = []
    for i, b in enumerate(s.bandwidths_bps):
        cells = [format_bandwidth(b)]
        for k in range(len(s.names)):
            t = s.time_to_target_s[k, i, latency_index]
            cells.append("never" if np.isnan(t) else f"{t:.2f} s")
        w = winner[i, latency_index]
        cells.append(s.names[w] if w >= 0 else "-")
        rows.append(cells)
    lines = [f"simulated time to {100 * s.target_acc:g}% test accuracy, latency {lat * 1e3:.3g} ms",
             markdown_table(head, rows)]
    if BASELINE in s.names and len(s.names) > 1:
        others = [n for n in s.names if n != BASELINE]
        crossings = []
        for j, lat_j in enumerate(s.latencies_s):
            cells = [f"{lat_j * 1e3:.3g} ms"]
            for n in others:
                x = s.crossover_bps(n, j)
                cells.append(format_bandwidth(x) if x is not None else s.describe_crossover(n, j))
            crossings.append(cells)
        lines += ["", f"crossover: the bandwidth below which each strategy reaches the target before {BASELINE}",
                  markdown_table(["latency", *others], crossings)]
    return "\n".join(lines)


def write_outputs(s: Sweep, out_dir: str | Path, latency_index: int) -> list[Path]:
    """CSV + JSON of the whole grid, a line plot at one latency and a winner heatmap."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "bandwidth_bps", "latency_s", "time_to_target_s", "total_s"])
        for k, name in enumerate(s.names):
            for i, b in enumerate(s.bandwidths_bps):
                for j, lat in enumerate(s.latencies_s):
                    t = s.time_to_target_s[k, i, j]
                    w.writerow([name, b, lat, "" if np.isnan(t) else t, s.total_s[k, i, j]])
    crossovers = {name: {f"{lat:g}": s.crossover_bps(name, j) for j, lat in enumerate(s.latencies_s)}
                  for name in s.names if name != BASELINE}
    (out / "sweep.json").write_text(json.dumps({
        "target_acc": s.target_acc, "strategies": s.names, "bandwidths_bps": s.bandwidths_bps,
        "latencies_s": s.latencies_s,
        "time_to_target_s": np.where(np.isnan(s.time_to_target_s), None, s.time_to_target_s).tolist(),
        "total_s": s.total_s.tolist(), "crossover_bps": crossovers}, indent=1))
    return [out / "sweep.csv", out / "sweep.json", *plot_sweep(s, out, latency_index)]


def plot_sweep(s: Sweep, out: Path, latency_index: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    lat = s.latencies_s[latency_index]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, name in enumerate(s.names):
        ax.plot(s.bandwidths_bps, s.time_to_target_s[k, :, latency_index], marker="o", ms=3, label=name)
        x = s.crossover_bps(name, latency_index)
        if x is not None:
            ax.axvline(x, ls=":", color=ax.lines[-1].get_color(), alpha=0.7)
    ax.set_xscale("log")
    if np.isfinite(s.time_to_target_s[:, :, latency_index]).any():
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", transform=ax.transAxes, ha="center")
    ax.set_xlabel("link bandwidth (bit/s)")
    ax.set_ylabel(f"simulated time to {100 * s.target_acc:g}% (s)")
    ax.set_title(f"time to target vs bandwidth, latency {lat * 1e3:.3g} ms (dotted: crossover)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    line = out / "sweep_bandwidth.png"
    fig.savefig(line, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors[:len(s.names)]
    cmap = ListedColormap(["#dddddd", *colors])
    ax.imshow(s.winner().T + 1, origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=len(s.names),
              interpolation="nearest")
    step = max(1, len(s.bandwidths_bps) // 8)
    ticks = list(range(0, len(s.bandwidths_bps), step))
    ax.set_xticks(ticks, [format_bandwidth(s.bandwidths_bps[i]).replace("bit/s", "b/s") for i in ticks],
                  fontsize=7, rotation=30)
    ax.set_yticks(range(len(s.latencies_s)), [f"{lat * 1e3:.3g} ms" for lat in s.latencies_s], fontsize=7)
    ax.set_xlabel("bandwidth")
    ax.set_ylabel("latency")
    ax.set_title(f"fastest to {100 * s.target_acc:g}% test accuracy")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, s.names, strict=True)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    heat = out / "sweep_winner.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [line, heat]


def run_sweep(paths: list[str | Path], bandwidths: str, latencies: str, target_acc: float,
              topology: str = "uniform", out_dir: str | Path | None = None,
              table_latency: str | None = None) -> tuple[Sweep, str]:
    """Loads runs, sweeps, writes outputs; returns the sweep and the printed table."""
    runs = load_runs(paths)
    s = sweep(runs, parse_grid(bandwidths, parse_bandwidth, "bandwidth"),
              parse_grid(latencies, parse_latency, "latency"), target_acc, topology)
    j = nearest(s.latencies_s, parse_latency(table_latency) if table_latency else 0.02)
    table = format_table(s, j)
    if out_dir is not None:
        write_outputs(s, out_dir, j)
    return s, table
