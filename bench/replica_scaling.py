"""Replica scaling: time to target and final metric vs the number of nodes M (issue 18).

    python bench/replica_scaling.py [--nodes 2,4,8,16,32,64] [--strategies "SimpleReduce; DiLoCo(H=10)"]
                                    [--seeds 3] [--steps 300] [--target "accuracy>=0.97"]
                                    [--out runs/replica_scaling] [--replot]

Each (strategy, M, seed) trains the MNIST CNN on M nodes (batch 32 per node, so the global
batch grows with M; 100 Mbit/s, 20 ms; the machine's kept compute profile, calibrated once
per batch size) and records the final accuracy on the whole test set and the simulated time
to the target. Prints a table (median and range over seeds; plotted alike) and writes
``replica_scaling.png`` and ``replica_scaling.json`` to --out. Runs already in --out with
the same configuration are kept (as ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.config import TrainConfig  # noqa: E402
from pysim.network import Network  # noqa: E402
from pysim.trainer import run  # noqa: E402
from pysim.workload import get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4,8,16,32,64")
    ap.add_argument("--strategies", default="SimpleReduce; DiLoCo(H=10)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", default="accuracy>=0.97")
    ap.add_argument("--out", default="runs/replica_scaling")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from --out's json")
    a = ap.parse_args()
    out = Path(a.out)
    if a.replot:
        points = json.loads((out / "replica_scaling.json").read_text())
        print(table(points, a.target))
        plot(points, out / "replica_scaling.png", a.target)
        return
    out.mkdir(parents=True, exist_ok=True)
    strategies = [s.strip() for s in a.strategies.split(";") if s.strip()]
    points = []
    for strategy in strategies:
        for m in map(int, a.nodes.split(",")):
            for seed in range(a.seeds):
                cfg = TrainConfig(workload=get_workload("mnist"), strategy=strategy, nodes=m,
                                  network=Network.uniform(m, "100Mbit", "20ms"), steps=a.steps, batch_size=32,
                                  eval_every=25, eval_subset=1000, seed=seed, target=a.target,
                                  compute="calibrated")
                r = run(cfg, out / f"M{m}_seed{seed}", resume=True)
                points.append({"strategy": r.label, "nodes": m, "seed": seed,
                               "accuracy": r.final.metrics["accuracy"], "time_to_target_s": r.final.time_to_target_s,
                               "sim_time_s": r.final.sim_time_s, "bytes_sent_per_node": r.final.bytes_sent_per_node})
                print(json.dumps(points[-1]), flush=True)
    (out / "replica_scaling.json").write_text(json.dumps(points, indent=1))
    print(table(points, a.target))
    plot(points, out / "replica_scaling.png", a.target)


def _finite(values: list[float | None]) -> list[float]:
    return sorted(v for v in values if v is not None and math.isfinite(v))


def _summary(values: list[float | None]) -> str:
    got = _finite(values)
    never = len(values) - len(got)
    if not got:
        return "never"
    return f"{statistics.median(got):.2f} [{got[0]:.2f}, {got[-1]:.2f}]" + (f" ({never} never)" if never else "")


def table(points: list[dict], target: str) -> str:
    rows = ["| strategy | nodes | final accuracy (median [min, max]) | sim. time to " + target + " (s) |",
            "|---|---|---|---|"]
    for key in dict.fromkeys((p["strategy"], p["nodes"]) for p in points):
        mine = [p for p in points if (p["strategy"], p["nodes"]) == key]
        acc = _summary([100 * p["accuracy"] for p in mine])
        rows.append(f"| {key[0]} | {key[1]} | {acc} % | {_summary([p['time_to_target_s'] for p in mine])} |")
    return "\n".join(rows)


def plot(points: list[dict], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(p["strategy"] for p in points):
        ms = sorted({p["nodes"] for p in points if p["strategy"] == name})
        for ax, key in zip(axes, ("time_to_target_s", "accuracy"), strict=True):
            vals = [_finite([p[key] for p in points if p["strategy"] == name and p["nodes"] == m]) for m in ms]
            xs = [m for m, vs in zip(ms, vals, strict=True) if vs]
            med = [statistics.median(vs) for vs in vals if vs]
            lo = [min(vs) for vs in vals if vs]
            hi = [max(vs) for vs in vals if vs]
            ax.plot(xs, med, marker="o", label=name)
            ax.fill_between(xs, lo, hi, alpha=0.2)
    axes[0].set(yscale="log", ylabel="simulated seconds", title=f"time to {target} (seeds that reach it)")
    axes[1].set(ylabel="accuracy, whole test set", title="final metric")
    ms = sorted({p["nodes"] for p in points})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
        ax.set_xlabel("nodes M (median of seeds, band: min to max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
