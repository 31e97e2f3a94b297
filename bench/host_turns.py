"""What passing the turn costs: K nodes of one process meeting R times with no work in between.

    python bench/host_turns.py [--nodes 4,32] [--meetings 300] [--repeats 5]

A worker process runs its nodes as threads taking turns (:mod:`pysim.host`): at
every collective each node saves the process's random generators, hands the
turn on and, once its turn is back, restores them. This times that alone, on
one core: a Host whose K nodes do nothing but meet (wall time per node per
meeting, minimum and median over repeats), and the generators' save and
restore by themselves (:class:`pysim.global_rng.GlobalRNG` against the exact
calls it stands in for: ``torch.get_rng_state``, ``random.getstate``,
``np.random.get_state`` and their setters).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.global_rng import GlobalRNG  # noqa: E402
from pysim.host import Host, current_host  # noqa: E402
from pysim.placement import Placement  # noqa: E402
from pysim.transport import Transport  # noqa: E402


def _meet_only(node: int, world: int, meetings: int) -> None:
    host = current_host()
    for _ in range(meetings):
        host.meet("turn", None, dict.fromkeys)


def turn_us(nodes: int, meetings: int) -> float:
    """Wall microseconds per node per meeting of a Host whose nodes only meet."""
    placement = Placement(nodes, 1)
    host = Host(placement.hosted(0), nodes, Transport(placement, 0))
    t0 = time.perf_counter()
    host.run(_meet_only, (meetings,))
    return (time.perf_counter() - t0) / nodes / meetings * 1e6


def _exact_round_trip() -> None:
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def rng_us(repeats: int = 2000) -> tuple[float, float]:
    """Microseconds for one save and one restore: GlobalRNG's, and the exact calls'."""
    generators = GlobalRNG()

    def ours() -> None:
        generators.load(generators.save())

    out = []
    for fn in (ours, _exact_round_trip):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append((time.perf_counter() - t0) / repeats * 1e6)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="4,32")
    ap.add_argument("--meetings", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| nodes | us per node per meeting (min / median) |")
    print("|---|---|")
    for k in map(int, a.nodes.split(",")):
        runs = [turn_us(k, a.meetings) for _ in range(a.repeats)]
        print(f"| {k} | {min(runs):.1f} / {statistics.median(runs):.1f} |", flush=True)
    pairs = [rng_us() for _ in range(a.repeats)]
    ours, exact = zip(*pairs, strict=True)
    print(f"\nsave + restore of the generators: GlobalRNG {min(ours):.1f} us, the exact calls {min(exact):.1f} us "
          f"(minimum of {a.repeats})")


if __name__ == "__main__":
    main()
