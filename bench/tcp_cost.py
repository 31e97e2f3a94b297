"""What the TCP window model costs the live clock per collective (issue 22 target: < 2% of a step).

    python bench/tcp_cost.py

Times Clock.advance of one blocking ring all-reduce of the MNIST CNN's gradient (186,948
bytes, a chunk of 1/n per member) without a TCP model, with ``--tcp reno`` and with
``reno:rendezvous=on:segment=1MiB`` (gloo's ring, segment by segment), for 2, 8 and 32 nodes:
median of 5 runs of 200 advances each, microseconds per advance. Every node's Comm runs the
clock, so a process pays this once per node it hosts and per collective.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.clock import Clock  # noqa: E402
from pysim.network import Network  # noqa: E402
from pysim.trace import Collective  # noqa: E402


def per_advance_us(net: Network, n: int, chunk: int, reps: int = 200) -> float:
    runs = []
    for _ in range(5):
        clock = Clock(net, n)
        coll = Collective("allreduce", "ring", (chunk,) * n)
        compute = np.full(n, 0.006)
        t0 = time.perf_counter()
        for _ in range(reps):
            clock.advance(compute, coll)
        runs.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(runs)


if __name__ == "__main__":
    for n in (2, 8, 32):
        net = Network.uniform(n, "100Mbit", "20ms", framing="tcp")
        chunk = 186_948 // n
        off, on = per_advance_us(net, n, chunk), per_advance_us(net.with_tcp("reno"), n, chunk)
        gloo = per_advance_us(net.with_tcp("reno:rendezvous=on:segment=1MiB"), n, chunk)
        print(f"{n:>3} nodes: {off:8.1f} us without, {on:8.1f} us with the TCP model, {gloo:8.1f} us with "
              f"gloo's ring (segment=1MiB) per all-reduce")
