"""Many nodes on one machine: real time, efficiency and memory per node, N = 2 ... 256.

    python bench/scale.py                                   # SimpleReduce and DiLoCo(H=30), N = 2..256
    python bench/scale.py --nodes 16,64 --strategies SimpleReduce --steps 100
    python bench/scale.py --workload shakespeare --nodes 64 --steps 100 --batch-size 16
    python bench/scale.py --nodes 16,64 --repeats 3                   # each point 3 times: median and range

Each point trains the workload (MNIST CNN by default, batch 32 per node, a
compute profile so the clock never depends on this machine's noise; 1 Gbit/s,
1 ms) on N nodes spread over the default worker processes (one per core),
after a 1-step run that starts the fork server the workers come from (a
process's first run pays its ~2 s of imports once).

- efficiency: the bare compute those node-steps need, N x steps x bare step /
  cores, over the real time of the whole run (start, training, the final
  evaluation on the whole test set); the bare step (forward, backward and the
  AdamW step of one batch, one thread, hot caches) is timed in this process
  right before and right after each run, median of 100 after 20 of warm-up
  each, and the faster of the two is used (the host's speed drifts: one
  timing caught in a slow moment would credit the run with more than it did);
- of busy cores: the same with the bare step of the run's own layout: each
  core's share of the nodes (N / cores models, each with its own optimizer and
  sampler) stepped round robin on one thread, in as many processes at once as
  the run has cores, timed before and after the run as well (the faster
  counts). No simulator: what the node-steps cost when every core steps its
  nodes at once, their models, optimizer states and activations competing
  for the caches. The gap to it is pysim's own cost;
- repeats: with ``--repeats R`` each point runs R times in a row (the bare steps
  timed around each run), and the row shows the median real time and efficiency
  with their range over the R runs, the largest peak memory: one run on this
  shared host moves by 10-20%;
- memory: the machine's memory in use (MemTotal - MemAvailable, sampled every
  0.1 s) at its peak during the run, less what was in use before it; per node:
  that over N; marginal: the difference to the previous N, per added node.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time

import torch

from pysim.config import TrainConfig
from pysim.network import Network
from pysim.placement import default_processes
from pysim.sharding import ShardSampler
from pysim.trainer import RunOptions, run
from pysim.workload import Batches, get_workload


def used_bytes() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class PeakMemory:
    """The largest memory in use while the block runs, sampled every 0.1 s."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = used_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, used_bytes())
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def bare_step_s(workload_name: str, batch_size: int, models: int = 1, steps: int = 100, warmup: int = 20) -> float:
    """Median seconds of one training step (forward, backward, optimizer) on one thread; with
    ``models`` > 1, that many models (each its own optimizer and sampler) stepped round robin,
    as a worker process steps its nodes, and at least ``steps`` steps timed after ``warmup``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wl = get_workload(workload_name)
        data = Batches(wl.data()[0])
        nodes = []
        for k in range(models):
            model = wl.model()
            nodes.append((model, wl.optimizer(model.parameters()),
                          ShardSampler(data, torch.arange(len(data)), batch_size, k)))
        rounds = -(-warmup // models) + -(-steps // models)
        times = []
        for r in range(rounds):
            for model, opt, sampler in nodes:
                x, y = sampler.next()
                t0 = time.perf_counter()
                loss = wl.loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if r >= -(-warmup // models):
                    times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(threads)


_start = None   # in a pool worker: the barrier that starts the timings together


def _pool_init(barrier) -> None:
    global _start
    _start = barrier


def _busy_bare_step_s(workload_name: str, batch_size: int, models: int, busy: bool) -> float | None:
    _start.wait()   # every pool process holds one task here, so they start together
    return bare_step_s(workload_name, batch_size, models) if busy else None


def busy_bare_step_s(pool, pool_size: int, cores: int, workload_name: str, batch_size: int, models: int) -> float:
    """Median over ``cores`` processes (of the pool's ``pool_size``, the rest idle) of the bare step
    of ``models`` models stepped round robin, every one of them timing at once."""
    tasks = [(workload_name, batch_size, models, i < cores) for i in range(pool_size)]
    return statistics.median(t for t in pool.starmap(_busy_bare_step_s, tasks, chunksize=1) if t is not None)


def point_config(workload: str, strategy: str, nodes: int, steps: int, batch_size: int) -> TrainConfig:
    """The run of one point (also ``bench/node_step_cpu.py``'s)."""
    return TrainConfig(workload=workload, strategy=strategy, nodes=nodes, steps=steps, batch_size=batch_size,
                       eval_every=steps, eval_subset=500, compute="cpu", warmup_steps=min(30, steps // 3),
                       network=Network.uniform(nodes, "1Gbps", "1ms"))


def start_fork_server(workload: str, batch_size: int) -> None:
    """A 1-step run: the fork server that starts workers pays its ~2 s of imports once per
    process, here rather than in the first measured run."""
    run(TrainConfig(workload=workload, nodes=2, steps=1, batch_size=batch_size, eval_every=1, eval_subset=100),
        options=RunOptions(timeout_s=600))


def measure(workload: str, strategy: str, nodes: int, steps: int, batch_size: int, pool, pin_cpus: bool = True) -> dict:
    bare = bare_step_s(workload, batch_size)
    cfg = point_config(workload, strategy, nodes, steps, batch_size)
    cores = min(os.cpu_count() or 1, default_processes(nodes))

    def busy_step() -> float:
        return busy_bare_step_s(pool, os.cpu_count() or 1, cores, workload, batch_size, -(-nodes // cores))

    busy = busy_step()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = run(cfg, options=RunOptions(timeout_s=1200, pin_cpus=pin_cpus))
        real = time.perf_counter() - t0
    after = bare_step_s(workload, batch_size)
    busy = min(busy, busy_step())
    ideal = nodes * steps * min(bare, after) / cores
    return {"strategy": strategy, "nodes": nodes, "processes": default_processes(nodes), "real_s": real,
            "bare_step_ms": (1e3 * bare, 1e3 * after), "efficiency": ideal / real, "busy_step_ms": 1e3 * busy,
            "of_busy": nodes * steps * busy / cores / real, "peak_gib": mem.extra / 2**30,
            "per_node_mib": mem.extra / nodes / 2**20, "metric": result.final.metrics}


def repeated(runs: list[dict]) -> dict:
    """One row for repeated runs of a point: real time, efficiency and of-busy as (median, lowest,
    highest); the bare steps of the median run; the largest peak memory."""
    if len(runs) == 1:
        one = runs[0]
        return one | {k: (one[k],) for k in ("real_s", "efficiency", "of_busy")}
    middle = sorted(runs, key=lambda r: r["efficiency"])[len(runs) // 2]
    row = dict(middle)
    for k in ("real_s", "efficiency", "of_busy"):
        values = [r[k] for r in runs]
        row[k] = (statistics.median(values), min(values), max(values))
    peak = max(runs, key=lambda r: r["peak_gib"])
    row["peak_gib"], row["per_node_mib"] = peak["peak_gib"], peak["per_node_mib"]
    return row


def spread(values: tuple, fmt: str) -> str:
    """A value, or a median with its range: ``70% (65-74%)``."""
    if len(values) == 1:
        return fmt.format(values[0])
    median, low, high = values
    return f"{fmt.format(median)} ({fmt.format(low).rstrip('%s ')}-{fmt.format(high)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4,8,16,32,64,128,256")
    ap.add_argument("--strategies", default="SimpleReduce;DiLoCo(H=30)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workload", default="mnist")
    ap.add_argument("--repeats", type=int, default=1, help="runs per point: the row shows the median and range")
    ap.add_argument("--pin-cpus", default="on", choices=["on", "off"],
                    help="one CPU per worker process (RunOptions.pin_cpus; on: the default of a run)")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {a.repeats}")
    print(f"{a.workload}, batch {a.batch_size} per node, {a.steps} steps, {os.cpu_count()} cores, "
          f"workers pinned to CPUs: {a.pin_cpus}")
    print("| strategy | nodes | processes | real | bare step before / after | efficiency | bare step, cores busy "
          "| of busy cores | peak memory | per node | marginal per node |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cores = os.cpu_count() or 1
    pool = mp.get_context("spawn").Pool(cores, _pool_init, (mp.get_context("spawn").Barrier(cores),))
    start_fork_server(a.workload, a.batch_size)   # before the first row
    for strategy in a.strategies.split(";"):
        previous = None
        for n in (int(v) for v in a.nodes.split(",")):
            r = repeated([measure(a.workload, strategy.strip(), n, a.steps, a.batch_size, pool, a.pin_cpus == "on")
                          for _ in range(a.repeats)])
            marginal = "-" if previous is None else \
                f"{(r['peak_gib'] - previous['peak_gib']) * 1024 / (n - previous['nodes']):.1f} MiB"
            print(f"| {strategy} | {n} | {r['processes']} | {spread(r['real_s'], '{:.1f}')} s | "
                  f"{r['bare_step_ms'][0]:.2f} / {r['bare_step_ms'][1]:.2f} ms | "
                  f"{spread(r['efficiency'], '{:.0%}')} | {r['busy_step_ms']:.2f} ms | "
                  f"{spread(r['of_busy'], '{:.0%}')} | "
                  f"{r['peak_gib']:.2f} GiB | {r['per_node_mib']:.0f} MiB "
                  f"| {marginal} |", flush=True)
            previous = r

if __name__ == "__main__":
    main()
