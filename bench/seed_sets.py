"""Do two comparisons with disjoint seed sets give the same answer? (issue 8)

    python example/mnist.py --out runs/mnist                       # seeds 0, 1, 2
    python example/mnist.py --seed 100 --out runs/mnist_s100       # seeds 100, 101, 102
    python bench/seed_sets.py runs/mnist runs/mnist_s100

For every strategy: the mean time to target of each set with its 95% interval
(as the table prints it), whether the intervals overlap, and the difference of
the means (target: within +-10%). For every strategy and latency of the sweep
grid: the median crossover bandwidth of each set and their ratio (target:
within +-20%), and whether a verdict of one set is contradicted by the other
(one "wins below X" where the other says "never wins", or the reverse; a tie
on one side contradicts nothing).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pysim.network import parse_bandwidth, parse_latency
from pysim.report import ci95_half_width, markdown_table
from pysim.rundir import load_result, run_dirs
from pysim.sweep import load_runs, parse_grid, sweep


def times_to_target(folder: str) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {}
    for d in run_dirs(folder):
        result = load_result(d)
        out.setdefault(result.label, []).append(result.final.time_to_target_s)
    return out


def interval(values: list[float | None]) -> tuple[float, float, float, int]:
    got = [v for v in values if v is not None]
    if not got:
        return np.nan, np.nan, np.nan, len(values)
    m, h = float(np.mean(got)), ci95_half_width(got)
    return m, m - h, m + h, len(values) - len(got)


def crossovers(folder: str, bandwidths: list[float], latencies: list[float]) -> dict[tuple[str, float], tuple]:
    """(strategy, latency) -> (verdict, median crossover bandwidth or None), as the sweep reports it."""
    s = sweep(load_runs([folder]), bandwidths, latencies)
    out = {}
    for name in s.names:
        if name == "SimpleReduce":
            continue
        for j, lat in enumerate(s.latencies_s):
            text = s.describe_crossover(name, j)
            kind = ("below" if text.startswith("wins below") else "always" if text.startswith("wins on") else
                    "never" if text.startswith("never") else "tie")
            xs = [x for x in s.crossover_bps(name, j) if x is not None]
            out[(name, lat)] = (kind, float(np.median(xs)) if kind == "below" else None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--bandwidths", default="10Mbit:100Gbit:20")
    ap.add_argument("--latencies", default="0.1ms:200ms:10")
    a = ap.parse_args()
    ta, tb = times_to_target(a.a), times_to_target(a.b)
    rows = []
    for label in ta:
        if label not in tb:
            continue
        ma, la, ha, na = interval(ta[label])
        mb, lb, hb, nb = interval(tb[label])
        overlap = la <= hb and lb <= ha
        rows.append([label, f"{ma:.2f} [{la:.2f}, {ha:.2f}]" + (f" ({na} never)" if na else ""),
                     f"{mb:.2f} [{lb:.2f}, {hb:.2f}]" + (f" ({nb} never)" if nb else ""),
                     "yes" if overlap else "NO", f"{100 * (mb / ma - 1):+.1f}%"])
    print("time to target (s): mean [95% interval] per seed set")
    print(markdown_table(["strategy", a.a, a.b, "intervals overlap", "b vs a"], rows))

    bws = parse_grid(a.bandwidths, parse_bandwidth, "bandwidth")
    lats = parse_grid(a.latencies, parse_latency, "latency")
    xa, xb = crossovers(a.a, bws, lats), crossovers(a.b, bws, lats)
    rows, contradictions, ratios = [], 0, []
    for key in xa:
        if key not in xb:
            continue
        (va, ca), (vb, cb) = xa[key], xb[key]
        contra = {va, vb} in ({"below", "never"}, {"always", "never"})
        contradictions += contra
        ratio = f"{100 * (cb / ca - 1):+.0f}%" if ca and cb else "-"
        if ca and cb:
            ratios.append(cb / ca - 1)
        rows.append([key[0], f"{key[1] * 1e3:.3g} ms", va + (f" {ca / 1e6:.0f} Mbit/s" if ca else ""),
                     vb + (f" {cb / 1e6:.0f} Mbit/s" if cb else ""), ratio, "CONTRADICTION" if contra else ""])
    print("\ncrossover vs SimpleReduce: what each set says (median over its seeds)")
    print(markdown_table(["strategy", "latency", a.a, a.b, "b vs a", ""], rows))
    within = sum(abs(r) <= 0.2 for r in ratios)
    print(f"\n{contradictions} contradicted verdicts; {within} of {len(ratios)} crossovers found by both sets "
          f"agree within +-20% (largest difference {100 * max(map(abs, ratios), default=0):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
