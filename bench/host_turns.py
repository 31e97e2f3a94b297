"""What passing the turn costs: K nodes of one process meeting R times with no work in between.

    python bench/host_turns.py [--nodes 4,32] [--meetings 300] [--repeats 5]
    python bench/host_turns.py --step --nodes 32 --meetings 100   # a training step between meetings

A worker process runs its nodes as threads taking turns (:mod:`pysim.host`): at
every collective each node saves the process's random generators, hands the
turn on and, once its turn is back, restores them. This times that alone, on
one core: a Host whose K nodes do nothing but meet (wall time per node per
meeting, minimum and median over repeats), and the generators' save and
restore by themselves (:class:`pysim.global_rng.GlobalRNG` against the exact
calls it stands in for: ``torch.get_rng_state``, ``random.getstate``,
``np.random.get_state`` and their setters).

``--step``: each node runs a training step of the MNIST CNN (forward and
backward of a batch of 32, one thread) before each meeting, as a SimpleReduce
node does, so a turn finds the caches cold; the time per turn is then the wall
time less the steps' own, per node per meeting.
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


def _meet_only(node: int, world: int, meetings: int, step: bool) -> float:
    """Meets ``meetings`` times (after a training step each, with ``step``); returns the steps' seconds."""
    host = current_host()
    t0 = time.perf_counter()
    train = _training_step() if step else None
    busy = time.perf_counter() - t0   # making the model is not the turn's cost either
    for _ in range(meetings):
        if train is not None:
            t0 = time.perf_counter()
            train()
            busy += time.perf_counter() - t0
        host.meet("turn", None, dict.fromkeys)
    return busy


def _training_step():
    from pysim.workload import get_workload

    wl = get_workload("mnist")
    model, x, y = wl.model(), torch.randn(32, 1, 28, 28), torch.randint(10, (32,))

    def train() -> None:
        for p in model.parameters():
            p.grad = None
        wl.loss(model(x), y).backward()

    return train


class _TimedRNG(GlobalRNG):
    """GlobalRNG that keeps the seconds of every save and load (a Host's turn saves and restores)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, list[float]] = {"save": [], "load": []}

    def save(self):
        t0 = time.perf_counter()
        try:
            return super().save()
        finally:
            self.seconds["save"].append(time.perf_counter() - t0)

    def load(self, state) -> None:
        t0 = time.perf_counter()
        try:
            super().load(state)
        finally:
            self.seconds["load"].append(time.perf_counter() - t0)


def turn_us(nodes: int, meetings: int, step: bool = False) -> tuple[float, float, float]:
    """Wall microseconds per node per meeting of a Host whose nodes only meet (with ``step``: less
    the training steps' own time), and the median microseconds of the generators' save and restore
    in those turns."""
    placement = Placement(nodes, 1)
    host = Host(placement.hosted(0), nodes, Transport(placement, 0))
    host.run(_meet_only, (1, step))   # the model's first step (oneDNN's kernels made) is not timed
    host = Host(placement.hosted(0), nodes, Transport(placement, 0))
    host._generators = rng = _TimedRNG()
    t0 = time.perf_counter()
    busy = sum(host.run(_meet_only, (meetings, step)).values())
    wall = (time.perf_counter() - t0 - busy) / nodes / meetings * 1e6
    return wall, 1e6 * statistics.median(rng.seconds["save"]), 1e6 * statistics.median(rng.seconds["load"])


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
    ap.add_argument("--step", action="store_true", help="a training step of the MNIST CNN before each meeting")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| nodes | us per node per meeting (min / median) | of which the generators' save / restore (median) |")
    print("|---|---|---|")
    for k in map(int, a.nodes.split(",")):
        runs = [turn_us(k, a.meetings, a.step) for _ in range(a.repeats)]
        walls, saves, loads = zip(*runs, strict=True)
        print(f"| {k} | {min(walls):.1f} / {statistics.median(walls):.1f} | "
              f"{statistics.median(saves):.1f} / {statistics.median(loads):.1f} |", flush=True)
    pairs = [rng_us() for _ in range(a.repeats)]
    ours, exact = zip(*pairs, strict=True)
    print(f"\nsave + restore of the generators: GlobalRNG {min(ours):.1f} us, the exact calls {min(exact):.1f} us "
          f"(minimum of {a.repeats})")


if __name__ == "__main__":
    main()
