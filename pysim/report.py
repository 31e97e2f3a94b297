"""Tables and plots of finished runs and sweeps: every figure pysim draws is drawn here.

Runs of one configuration with several seeds are summarised as the mean ±
the half-width of its 95% confidence interval over seeds (Student's t; the
table says so); curves are drawn as the mean with a band from the lowest to
the highest seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pysim.network import format_bandwidth
from pysim.result import BASELINE, Result
from pysim.sweep import Sweep


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "never"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


def spread(values: list[float | None], unit: str = "") -> str:
    """Median [min, max] of the values that exist, with how many are missing ("never")."""
    got = [v for v in values if v is not None and not math.isnan(v)]
    if not got:
        return "never"
    fmt = human_seconds if unit == "s" else (lambda v: f"{v:.4g}")
    text = fmt(float(np.median(got))) if len(got) == 1 else \
        f"{fmt(float(np.median(got)))} [{fmt(min(got))}, {fmt(max(got))}]"
    missing = len(values) - len(got)
    return text + (f" ({missing} never)" if missing else "")


# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def ci95_half_width(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (Student's t, n-1
    degrees of freedom; the next smaller tabulated df is used between table entries)."""
    n = len(values)
    if n < 2:
        return 0.0
    df = max(k for k in _T95 if k <= n - 1) if n - 1 <= 60 else None
    t = _T95[df] if df is not None else 1.96
    return t * float(np.std(values, ddof=1)) / math.sqrt(n)


def mean_ci(values: list[float], fmt) -> str:
    """``mean ± h``: h the half-width of the 95% confidence interval of the mean over seeds (just
    the value for one seed)."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} ± {fmt(ci95_half_width(values))}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with columns padded to their widest cell."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def group_by_label(results: list[Result]) -> dict[str, list[Result]]:
    """Runs of the same configuration (label), in first-seen order."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.label, []).append(r)
    return groups


def _metric_format(metric: str):
    if metric == "accuracy":
        return lambda v: f"{100 * v:.2f}%"
    return lambda v: f"{v:.3f}"


def final_metric(runs: list[Result], metric: str, fmt) -> str:
    """The final metric over the seeds that did not diverge, and the step where the others did."""
    steps = diverged_steps(runs)
    values = [r.final.metrics[metric] for r in runs if not r.diverged]
    where = f"at step {', '.join(map(str, steps))}"
    if not values:
        return f"diverged {where}"
    return mean_ci(values, fmt) + (f" ({len(steps)}/{len(runs)} diverged {where})" if steps else "")


def bytes_ratio(sent: float, base_bytes: float) -> str:
    """``sent`` bytes against the baseline's ``base_bytes`` (both > 0): "32x fewer", "1.5x more";
    within 0.5% of it, the difference in percent ("0.2% more"), "same" where equal."""
    if sent == base_bytes:
        return "same"
    fewer = sent < base_bytes
    ratio = base_bytes / sent if fewer else sent / base_bytes
    way = "fewer" if fewer else "more"
    if f"{ratio:.3g}" == "1":
        percent = 100 * (ratio - 1)
        return f"{percent:.2g}% {way}" if percent >= 0.01 else f"under 0.01% {way}"
    return f"{ratio:,.0f}x {way}" if ratio >= 1000 else f"{ratio:.3g}x {way}"   # not "1.47e+03x"


def results_table(results: list[Result]) -> str:
    """One row per configuration: final metric, simulated time, time to target, bytes, real runtime;
    mean ± 95% interval over its seeds. The target and metric are the runs' own."""
    groups = group_by_label(results)
    target = results[0].target
    metric = target.metric
    fmt = _metric_format(metric)
    seeds = max(len(g) for g in groups.values())
    head = ["strategy", f"final {metric}", "sim. wall-clock", f"time to {target}", "bytes sent/node",
            f"vs {BASELINE}", "idle/node", "real runtime"]
    base = groups.get(BASELINE) or next((g for g in groups.values() if g[0].strategy == BASELINE), None)
    base_bytes = float(np.mean([r.final.bytes_sent_per_node for r in base])) if base else None
    rows = []
    for label, runs in groups.items():
        finals = [r.final for r in runs]
        reached = [f.time_to_target_s for f in finals if f.time_to_target_s is not None]
        if len(reached) == len(finals):
            ttt = mean_ci(reached, human_seconds)
        elif reached:
            ttt = f"{mean_ci(reached, human_seconds)} ({len(finals) - len(reached)}/{len(finals)} never)"
        else:
            ttt = "never"
        sent = float(np.mean([f.bytes_sent_per_node for f in finals]))
        if not base_bytes or not sent:
            ratio = "-"
        elif runs is base:
            ratio = "baseline"
        else:
            ratio = bytes_ratio(sent, base_bytes)
        idle = [f.idle_s / f.sim_time_s for f in finals if f.sim_time_s]
        rows.append([label, final_metric(runs, metric, fmt),
                     mean_ci([f.sim_time_s for f in finals], human_seconds), ttt, human_bytes(sent), ratio,
                     f"{100 * max(0.0, float(np.mean(idle))):.0f}%" if idle else "-",   # -1e-18: rounding, not time
                     f"{sum(f.real_runtime_s for f in finals):.0f} s"])
    note = (f"mean ± 95% confidence interval of the mean over {seeds} seeds (Student's t)" if seeds > 1
            else "one seed: no spread shown; use --seeds") + \
        "; time to target: end of the first step whose model reaches it (every kept model between " \
        "evaluations checked); idle/node: share of the simulated time a node spends in collectives or " \
        "waiting for others, not computing; real runtime summed over seeds"
    return markdown_table(head, rows) + "\n" + note


def seeds_phrase(n: int) -> str:
    return f"in all {n} seeds" if n > 1 else "(one seed)"


def diverged_steps(runs: list[Result]) -> list[int]:
    return [r.final.diverged_at_step for r in runs if r.final.diverged_at_step is not None]


def verdict(label: str, runs: list[Result], base_t: dict[int, float | None]) -> str:
    """One configuration against the baseline, paired by seed, naming the case it is in: diverged,
    neither reaches the target, faster or slower in every seed (or never), or the seeds disagree."""
    n = len(runs)
    diverged = diverged_steps(runs)
    if len(diverged) == n:
        return f"{label} diverged {seeds_phrase(n)} (at step {', '.join(map(str, diverged))}): no verdict"
    pairs = [(r.final.time_to_target_s, base_t.get(r.seed)) for r in runs]
    inf = float("inf")
    faster = sum((a if a is not None else inf) < (b if b is not None else inf) for a, b in pairs)
    slower = sum((a if a is not None else inf) > (b if b is not None else inf) for a, b in pairs)
    neither = sum(a is None and b is None for a, b in pairs)
    never = sum(a is None for a, _ in pairs)
    base_never = sum(b is None for _, b in pairs)
    seeds = seeds_phrase(n)
    if neither == n:
        return f"{label} and {BASELINE}: neither reaches the target {seeds}"
    if faster == n:
        tail = f"; {BASELINE} never does" if base_never == n else \
            f" ({BASELINE} never does in {base_never} of them)" if base_never else ""
        return f"{label} reaches the target before {BASELINE} {seeds}{tail}"
    if slower == n and never == n:
        return f"{label} never reaches the target; {BASELINE} does {seeds}"
    if slower == n:
        tail = f" (never in {never} of them)" if never else ""
        return f"{label} reaches the target after {BASELINE} {seeds}{tail}"
    parts = [f"{faster} of {n} faster", f"{slower} slower"]
    if neither:
        parts.append(f"{neither} where neither reaches it")
    if n - faster - slower - neither:
        parts.append(f"{n - faster - slower - neither} equal")
    return f"{label} and {BASELINE} tie: the seeds disagree ({', '.join(parts)})"


def verdicts(results: list[Result]) -> list[str]:
    """For each configuration against SimpleReduce (paired by seed), the case it is in: see
    :func:`verdict`. Also a line for a diverged baseline."""
    groups = group_by_label(results)
    base = groups.get(BASELINE)
    if base is None:
        return []
    base_t = {r.seed: r.final.time_to_target_s for r in base}
    lines = []
    steps = diverged_steps(base)
    if steps:
        lines.append(f"{BASELINE} diverged in {len(steps)} of {len(base)} seeds (at step "
                     f"{', '.join(map(str, steps))})")
    return lines + [verdict(label, runs, base_t) for label, runs in groups.items() if runs is not base]


def sweep_table(s: Sweep, latency_index: int) -> str:
    """Time to target per bandwidth at one latency (median and range over seeds), the winner where
    every seed agrees, and the crossover bandwidths per latency."""
    lat = s.latencies_s[latency_index]
    head = ["bandwidth"] + s.names + ["winner (all seeds)"]
    winner = s.winner()
    rows = []
    for i, b in enumerate(s.bandwidths_bps):
        cells = [format_bandwidth(b)]
        for k in range(len(s.names)):
            t = s.time_to_target_s[k, :, i, latency_index]
            cells.append("never" if np.all(np.isnan(t)) else spread(list(t), "s"))
        w = winner[i, latency_index]
        cells.append(s.names[w] if w >= 0 else "tie")
        rows.append(cells)
    seeds = f"{len(s.seeds)} seed{'s' if len(s.seeds) > 1 else ''}"
    lines = [f"simulated time to {s.target}, latency {lat * 1e3:.3g} ms (median [min, max] over {seeds})",
             markdown_table(head, rows)]
    if BASELINE in s.names and len(s.names) > 1:
        others = [n for n in s.names if n != BASELINE]
        crossings = [[f"{lat_j * 1e3:.3g} ms"] + [s.describe_crossover(n, j) for n in others]
                     for j, lat_j in enumerate(s.latencies_s)]
        lines += ["", f"crossover: the bandwidth below which each strategy reaches the target before {BASELINE} "
                      f"(median, and range over {seeds})",
                  markdown_table(["latency", *others], crossings)]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(results: list[Result], path: str | Path, title: str = "") -> Path:
    """The target metric vs simulated time and vs bytes sent per node: one line per configuration
    (mean over seeds), shaded from the lowest to the highest seed."""
    plt = _plt()
    metric = results[0].target.metric
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, runs in group_by_label(results).items():
        # seeds may be evaluated at different steps (bisection near the target): each seed's
        # metric is interpolated in steps onto the union of their evaluation steps
        steps = np.array(sorted(set().union(*[{e.step for e in r.evals} for r in runs])))
        vals = np.array([np.interp(steps, [e.step for e in r.evals], [scale * e.metrics[metric] for e in r.evals])
                         for r in runs])
        times = np.array([[r.steps[s - 1].sim_time_s for s in steps] for r in runs]).mean(axis=0)
        sent = np.maximum(np.array([[r.steps[s - 1].bytes_sent_per_node for s in steps]
                                    for r in runs]).mean(axis=0), 1)
        for ax, x in ((ax_t, times), (ax_b, sent)):
            line, = ax.plot(x, vals.mean(axis=0), label=label, lw=1.5)
            if len(runs) > 1:
                ax.fill_between(x, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.2)
    ax_t.set_xlabel("simulated wall-clock (s)")
    ax_b.set_xlabel("bytes sent per node")
    ax_b.set_xscale("log")
    name = "test accuracy (%)" if metric == "accuracy" else metric
    for ax in (ax_t, ax_b):
        ax.set_ylabel(name)
        if metric == "accuracy":
            ax.set_ylim(90, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + ("" if len(results) == len(group_by_label(results)) else "  (band: range over seeds)"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_sweep(s: Sweep, out: Path, latency_index: int) -> list[Path]:
    """Time to target vs bandwidth at one latency (median over seeds, band = range, dotted lines at
    the median crossovers), and a heatmap of the winner where every seed agrees (grey: tie)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    lat = s.latencies_s[latency_index]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, name in enumerate(s.names):
        t = s.time_to_target_s[k, :, :, latency_index]
        ok = ~np.all(np.isnan(t), axis=0)
        mid = np.full(t.shape[1], np.nan)
        mid[ok] = np.nanmedian(t[:, ok], axis=0)
        line, = ax.plot(s.bandwidths_bps, mid, marker="o", ms=3, label=name)
        if len(s.seeds) > 1 and ok.any():
            lo, hi = np.full_like(mid, np.nan), np.full_like(mid, np.nan)
            lo[ok], hi[ok] = np.nanmin(t[:, ok], axis=0), np.nanmax(t[:, ok], axis=0)
            ax.fill_between(s.bandwidths_bps, lo, hi, color=line.get_color(), alpha=0.2)
        xs = [x for x in s.crossover_bps(name, latency_index) if x is not None]
        if xs:
            ax.axvline(float(np.median(xs)), ls=":", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    if np.isfinite(s.time_to_target_s[..., latency_index]).any():
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", transform=ax.transAxes, ha="center")
    ax.set_xlabel("link bandwidth (bit/s)")
    ax.set_ylabel(f"simulated time to {s.target} (s)")
    ax.set_title(f"time to target vs bandwidth, latency {lat * 1e3:.3g} ms\n"
                 f"(median over {len(s.seeds)} seeds, band: range; dotted: crossover)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    line_path = out / "sweep_bandwidth.png"
    fig.savefig(line_path, dpi=120)
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
    ax.set_title(f"fastest to {s.target} in every seed (grey: the seeds disagree)", fontsize=9)
    ax.legend(handles=[Patch(color="#dddddd", label="tie")] +
              [Patch(color=c, label=n) for c, n in zip(colors, s.names, strict=True)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    heat = out / "sweep_winner.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [line_path, heat]
