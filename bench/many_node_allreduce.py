"""What one all-reduce of many simulated nodes costs the worker processes that host them.

    python bench/many_node_allreduce.py [--nodes 16,64,256] [--numel 46730] [--reps 100] [--runs 5]

N nodes spread over 2 worker processes (the default layout on this 2-core
machine) each hold a vector of ``numel`` float32 values (46,730: the MNIST CNN's
gradient) and run ``Comm.allreduce_mean`` on it ``reps`` times, with nothing
else in between: the dense ring of the simulator, every hop a real packet
(header, payload, CRC) written by one node and checked by the next, in memory
between nodes of one process and through shared memory between the two
processes, the clock charged at every collective. Printed: wall milliseconds
per all-reduce in the slower worker (minimum and median over ``runs`` runs) and
that over the nodes a worker hosts: the all-reduce's share of one node-step.

The baseline (PyTorch, the same 2 processes, one thread each): the least work
that gives every process the same mean, with no node simulated: each process
sums its nodes' vectors (``torch.stack(...).sum(0)``) and one gloo
``all_reduce`` over loopback adds the two sums. The gap is what the simulator
pays for per-node packets, checks, schedule and clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.comm import Comm  # noqa: E402
from pysim.launch import run_nodes  # noqa: E402
from pysim.network import Network  # noqa: E402

_NETWORK: dict[int, Network] = {}


def _loop(rank: int, world: int, numel: int, reps: int) -> float:
    """A node's part: seconds per all-reduce after 3 untimed ones."""
    net = _NETWORK.setdefault(world, Network.uniform(world, "1Gbps", "1ms"))   # one per process, as a run's config
    comm = Comm(rank, world, net)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        comm.allreduce_mean(x)
        comm.end_step()
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.allreduce_mean(x)
        comm.end_step()
    return (time.perf_counter() - t0) / reps


def pysim_ms(nodes: int, numel: int, reps: int) -> float:
    """Milliseconds per all-reduce in the slower worker process."""
    return 1e3 * max(run_nodes(_loop, nodes, (numel, reps), processes=2))


def _baseline_worker(process: int, store: str, nodes: int, numel: int, reps: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=process, world_size=2)
    local = range(process * nodes // 2, (process + 1) * nodes // 2)
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in local]
    for i in range(reps + 3):
        if i == 3:
            dist.barrier()
            t0 = time.perf_counter()
        total = torch.stack(xs).sum(0)
        dist.all_reduce(total)
        total /= nodes
    out[process] = (time.perf_counter() - t0) / reps
    dist.destroy_process_group()


def baseline_ms(nodes: int, numel: int, reps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = tmp.Manager().dict()
        tmp.spawn(_baseline_worker, args=(os.path.join(d, "store"), nodes, numel, reps, out), nprocs=2)
        return 1e3 * max(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="16,64,256")
    ap.add_argument("--numel", type=int, default=46730)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    run_nodes(_loop, 2, (100, 2), processes=2)    # starts the fork server the workers come from
    print(f"all-reduce of {a.numel} float32 per node, N nodes over 2 worker processes; ms per all-reduce "
          f"(min / median of {a.runs} runs of {a.reps})")
    print("| nodes N | pysim | per node-step | PyTorch baseline | pysim / baseline |")
    print("|---|---|---|---|---|")
    for n in map(int, a.nodes.split(",")):
        ours, base = [], []
        for _ in range(a.runs):          # in turn, so that a slow moment of the host hits both
            ours.append(pysim_ms(n, a.numel, a.reps))
            base.append(baseline_ms(n, a.numel, a.reps))
        print(f"| {n} | {min(ours):.2f} / {statistics.median(ours):.2f} ms | {min(ours) / (n / 2):.3f} ms "
              f"| {min(base):.3f} / {statistics.median(base):.3f} ms | {min(ours) / min(base):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
