"""How many node processes fit on this machine: a short MNIST run with N nodes.

    python bench/scale.py --nodes 16 --steps 60

Reports real runtime, the machine's peak memory in use during the run
(sampled from /proc/meminfo every 0.1 s) and per node, and the result.
"""

from __future__ import annotations

import argparse
import threading
import time

from pysim.config import TrainConfig
from pysim.network import Network
from pysim.trainer import run


def used_gib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--strategy", default="SimpleReduce")
    a = ap.parse_args()
    base, peak, stop = used_gib(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], used_gib())
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    cfg = TrainConfig(strategy=a.strategy, nodes=a.nodes, network=Network.uniform(a.nodes, "1Gbps", "1ms"),
                      steps=a.steps, eval_every=a.steps, batch_size=32)
    r = run(cfg, timeout_s=600)
    stop.set()
    extra = peak[0] - base
    f = r.final
    print(f"{a.nodes} nodes, {a.steps} steps of {a.strategy}: real {f['real_runtime_s']:.1f} s, "
          f"peak memory +{extra:.2f} GiB ({1024 * extra / a.nodes:.0f} MiB per node), "
          f"test acc {100 * f['test_acc']:.2f}%, simulated {f['sim_time_s']:.2f} s, "
          f"{f['bytes_sent_per_node'] / 1e6:.1f} MB sent per node")


if __name__ == "__main__":
    main()
