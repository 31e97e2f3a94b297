"""What running nodes as threads costs their compute: K models stepped in one thread vs in K threads.

    python bench/node_threads.py [--nodes 1,32] [--rounds 40]

A worker process runs its nodes as threads taking turns (:mod:`pysim.host`). This
times the same training steps of the MNIST CNN (batch 32, one torch thread,
AdamW) three ways: one model in one thread, K models in one thread (round robin)
and K models in K threads that pass a turn round robin (a lock each, as a Host
does). Prints the median CPU time (``time.thread_time``) of the forward, the
backward and the optimizer step, over all steps after the first 5 rounds.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.workload import Batches, get_workload  # noqa: E402


def measure(k: int, threads: bool, rounds: int, warmup: int = 5) -> dict[str, float]:
    wl = get_workload("mnist")
    data = Batches(wl.data()[0])
    torch.manual_seed(0)
    models = [wl.model() for _ in range(k)]
    opts = [wl.optimizer(m.parameters()) for m in models]
    batches = [data.batch(torch.randint(len(data), (32,))) for _ in range(k)]
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step(i: int, r: int) -> None:
        x, y = batches[i]
        t0 = time.thread_time()
        out = models[i](x)
        t1 = time.thread_time()
        loss = wl.loss(out, y)
        opts[i].zero_grad()
        loss.backward()
        t2 = time.thread_time()
        opts[i].step()
        t3 = time.thread_time()
        if r >= warmup:
            for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                times[name].append(dt)

    if not threads:
        for r in range(rounds):
            for i in range(k):
                step(i, r)
    else:
        turn = [threading.Lock() for _ in range(k)]
        for lock in turn:
            lock.acquire()

        def node(i: int) -> None:
            torch.set_num_threads(1)
            for r in range(rounds):
                turn[i].acquire()
                step(i, r)
                turn[(i + 1) % k].release()

        workers = [threading.Thread(target=node, args=(i,)) for i in range(k)]
        for w in workers:
            w.start()
        turn[0].release()
        for w in workers:
            w.join()
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,32")
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| models K | how | forward | backward | optimizer | step |")
    print("|---|---|---|---|---|---|")
    for k in map(int, a.nodes.split(",")):
        for threads in (False, True):
            if k == 1 and threads:
                continue
            m = measure(k, threads, a.rounds)
            how = f"{k} threads taking turns" if threads else "one thread"
            print(f"| {k} | {how} | {1e3 * m['forward']:.2f} ms | {1e3 * m['backward']:.2f} ms "
                  f"| {1e3 * m['optimizer']:.2f} ms | {1e3 * sum(m.values()):.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
