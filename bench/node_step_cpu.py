"""Where a node-step's CPU goes in a many-node run: thread CPU time of each part, per node-step.

    python bench/node_step_cpu.py                                     # SimpleReduce, 16 nodes, 100 steps
    python bench/node_step_cpu.py --nodes 64 --strategy "DiLoCo(H=30)" --repeats 3

Trains ``bench/scale.py``'s configuration (MNIST CNN, batch 32 per node, compute profile
"cpu", 1 Gbit/s, 1 ms) on N nodes over the default worker processes, after a 1-step run that
starts the fork server. In every worker, ``time.thread_time()`` is taken around the functions
a training step calls, in the node threads and only inside ``NodeRun.train_step``: the CPU a
node spends on each part, not the time it waits for its turn or for the other worker, and not
the evaluations. Parts nest (the indented rows are inside the row above them); "rest" is what
the step's own code adds. Per node-step, over both workers: the workers' wall time from their
first step to their last, the process CPU time in that window, the node threads' CPU, and the
wall time a worker waits at a collective's start for the other workers' rows (the
``Transport.gather_rows`` of ``Comm``'s collectives: where the worker that arrives first
idles until the other has stepped its nodes).

The script is imported in every worker as ``__mp_main__``; the environment variable
``PYSIM_NODE_STEP_CPU`` (a folder) makes that import install the timers and write each
worker's sums there when its nodes are done.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

_FOLDER = os.environ.get("PYSIM_NODE_STEP_CPU")
# (label, nesting depth); the parts timed, in the order printed
PARTS = (("train_step", 0), ("batch", 1), ("forward", 1), ("backward", 1), ("strategy.step", 1),
         ("local step (optimizer)", 2), ("collectives, node's share", 2), ("passing the turn", 3),
         ("ring run (C++ hops, sends)", 3), ("clock and trace", 3), ("gradients flattened", 2),
         ("gradients set", 2))
WAIT = "waiting for the other workers at collectives (wall)"


def _install(folder: str) -> None:
    """Wraps the parts' functions (in this worker) with thread-CPU timers."""
    import torch
    from torch import nn

    import pysim.comm
    import pysim.host
    import pysim.node
    import pysim.sharding
    import pysim.strategies.base as base
    import pysim.transport

    sums: dict[str, list[float]] = {}
    local = threading.local()
    clock = time.thread_time

    def add(label: str, seconds: float) -> None:
        s = sums.setdefault(label, [0, 0.0])
        s[0] += 1
        s[1] += seconds

    def timed(owner, name: str, label: str, timer=clock) -> None:   # inside a node's step; thread CPU by default
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*args, **kwargs):
            if not getattr(local, "in_step", False):
                return f(*args, **kwargs)
            t = timer()
            try:
                return f(*args, **kwargs)
            finally:
                add(label, timer() - t)
        setattr(owner, name, g)

    call = nn.Module.__call__

    def module_call(self, *args, **kwargs):   # the model's own call only, not its submodules'
        if not getattr(local, "in_step", False) or getattr(local, "in_forward", False):
            return call(self, *args, **kwargs)
        local.in_forward, t = True, clock()
        try:
            return call(self, *args, **kwargs)
        finally:
            local.in_forward = False
            add("forward", clock() - t)

    nn.Module.__call__ = module_call
    window: dict[str, float] = {}
    train_step = pysim.node.NodeRun.train_step

    def step(self, s: int) -> None:
        window.setdefault("wall0", time.perf_counter())
        window.setdefault("cpu0", time.process_time())
        local.in_step, t = True, clock()
        try:
            train_step(self, s)
        finally:
            local.in_step = False
            add("train_step", clock() - t)
            window["wall1"], window["cpu1"] = time.perf_counter(), time.process_time()

    pysim.node.NodeRun.train_step = step
    for owner, name, label in ((pysim.sharding.ShardSampler, "next", "batch"), (torch.Tensor, "backward", "backward"),
                               (base.Strategy, "step", "strategy.step"),
                               (base.Strategy, "local_step", "local step (optimizer)"),
                               (pysim.comm.Comm, "_collective", "collectives, node's share"),
                               (pysim.host.Host, "park", "passing the turn"),
                               (pysim.comm.RingPlan, "run", "ring run (C++ hops, sends)"),
                               (pysim.comm.Comm, "_charge", "clock and trace"),
                               (base.Strategy, "flat_grads", "gradients flattened"),
                               (base.Strategy, "set_grads", "gradients set")):
        timed(owner, name, label)
    timed(pysim.transport.Transport, "gather_rows", WAIT, timer=time.perf_counter)   # wall: it waits
    run = pysim.host.Host.run

    def host_run(self, fn, args=()):
        out = run(self, fn, args)
        record = {"sums": sums, "wall_s": window["wall1"] - window["wall0"], "cpu_s": window["cpu1"] - window["cpu0"]}
        Path(folder, f"worker{os.getpid()}.json").write_text(json.dumps(record))
        return out

    pysim.host.Host.run = host_run


if _FOLDER and __name__ == "__mp_main__":
    _install(_FOLDER)


def measure(strategy: str, nodes: int, steps: int) -> dict[str, float]:
    """One run: milliseconds of CPU per node-step for each part, and wall / process CPU."""
    from scale import point_config

    from pysim.trainer import RunOptions, run

    for f in glob.glob(os.path.join(_FOLDER, "worker*.json")):
        os.remove(f)
    run(point_config("mnist", strategy, nodes, steps, 32), options=RunOptions(timeout_s=1200))
    records = [json.loads(Path(f).read_text()) for f in glob.glob(os.path.join(_FOLDER, "worker*.json"))]
    node_steps = sum(r["sums"]["train_step"][0] for r in records)
    out = {label: 1e3 * sum(r["sums"].get(label, [0, 0.0])[1] for r in records) / node_steps for label, _ in PARTS}
    out["rest"] = out["train_step"] - sum(out[k] for k in ("batch", "forward", "backward", "strategy.step"))
    out[WAIT] = 1e3 * sum(r["sums"].get(WAIT, [0, 0.0])[1] for r in records) / node_steps
    out["wall"] = 1e3 * sum(r["wall_s"] for r in records) / node_steps
    out["process CPU"] = 1e3 * sum(r["cpu_s"] for r in records) / node_steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", default="SimpleReduce")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    if a.nodes < 2 or a.steps < 1 or a.repeats < 1:
        ap.error("--nodes must be >= 2 (the workers host the nodes), --steps and --repeats >= 1")
    from scale import start_fork_server

    start_fork_server("mnist", 32)
    runs = [measure(a.strategy, a.nodes, a.steps) for _ in range(a.repeats)]
    print(f"{a.strategy}, {a.nodes} nodes, {a.steps} steps, mnist batch 32; CPU ms per node-step"
          + (f", median (range) of {a.repeats} runs" if a.repeats > 1 else ""))
    print("| part | ms |\n|---|---|")
    rows = [("wall (workers, first to last step)", 0), (WAIT, 1), ("process CPU in that window", 0)] + \
        list(PARTS) + [("rest", 1)]
    keys = {"wall (workers, first to last step)": "wall", "process CPU in that window": "process CPU"}
    for label, depth in rows:
        v = [r[keys.get(label, label)] for r in runs]
        spread = f" ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else ""
        print(f"| {'&nbsp;&nbsp;' * depth}{label} | {statistics.median(v):.3f}{spread} |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        os.environ["PYSIM_NODE_STEP_CPU"] = _FOLDER = folder
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        main()
