"""Train MNIST on N simulated nodes with several strategies and compare them.

    python example/mnist.py                                   # defaults: 2 nodes, 100 Mbit/s, 20 ms
    python example/mnist.py --bandwidth 1Gbps --latency 1ms --strategies SimpleReduce,DiLoCo
    python example/mnist.py --topology two-tier:2:100Mbit:50ms --nodes 4 --bandwidth 10Gbps

Prints a table (final test accuracy, simulated wall-clock, time to the
target accuracy, bytes sent per node, real runtime) and writes results
(JSON, CSV, traces for replay) and a PNG plot to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pysim.launch import NodeError
from pysim.mnist import DataError
from pysim.network import parse_network
from pysim.report import plot_runs, results_table
from pysim.trainer import TrainConfig, run


def strategy_args(name: str, a: argparse.Namespace) -> dict:
    key = name.lower()
    if key == "diloco":
        return {"H": a.H, "codec": a.diloco_codec, "outer_lr": a.outer_lr, "outer_momentum": a.outer_momentum}
    if key == "sparta":
        return {"p": a.p, "seed": a.seed}
    if key == "powersgd":
        return {"rank": a.rank, "seed": a.seed}
    if key == "topk":
        return {"k": a.topk}
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="SimpleReduce,DiLoCo,SPARTA",
                    help="comma-separated: SimpleReduce, DiLoCo, SPARTA, TopK, PowerSGD")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--bandwidth", default="100Mbit", help="per-node link, e.g. 100Mbit, 1Gbps, 10GB/s")
    ap.add_argument("--latency", default="20ms", help="one-way link latency, e.g. 20ms, 150us")
    ap.add_argument("--topology", default="uniform",
                    help="uniform | two-tier:G:BW:LAT | slow-node:I:BW:LAT")
    ap.add_argument("--algorithm", default="ring", choices=["ring", "star"], help="all-reduce algorithm")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64, help="per node")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--H", type=int, default=25, help="DiLoCo inner steps per outer step")
    ap.add_argument("--diloco-codec", default="lowrank:8", help="DiLoCo pseudo-gradient codec ('dense' for none)")
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--outer-momentum", type=float, default=0.5)
    ap.add_argument("--p", type=float, default=0.005, help="SPARTA fraction of parameters averaged per step")
    ap.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    ap.add_argument("--topk", type=float, default=0.01, help="TopK fraction of gradient entries sent")
    ap.add_argument("--compute", default="measured", help="'measured' or a device profile: cpu, t4, a100, h100")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.98, help="target test accuracy for 'time to target'")
    ap.add_argument("--data-dir", default=None, help="folder with the four MNIST .gz files (default: data/mnist)")
    ap.add_argument("--out", default="runs/mnist")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    try:
        network = parse_network(a.nodes, a.bandwidth, a.latency, a.topology)
        configs = [TrainConfig(strategy=s.strip(), strategy_args=strategy_args(s.strip(), a), nodes=a.nodes,
                               network=network, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                               eval_every=a.eval_every, seed=a.seed, compute=a.compute, algorithm=a.algorithm,
                               data_dir=a.data_dir, target_acc=a.target)
                   for s in a.strategies.split(",") if s.strip()]
        if not configs:
            raise ValueError("--strategies is empty; name at least one strategy")
        for cfg in configs:
            cfg.check()
        print(f"{a.nodes} nodes, network {network.describe()}, {a.steps} steps x {a.batch_size} per node")
        results = []
        for cfg in configs:
            print(f"training {cfg.name} ...", flush=True)
            results.append(run(cfg, a.out))
    except (ValueError, DataError, NodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(results_table(results, a.target))
    plot = plot_runs(results, Path(a.out) / "mnist.png", f"MNIST, {a.nodes} nodes, {network.describe()}")
    print(f"\nresults, traces and CSV in {a.out}/; plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
