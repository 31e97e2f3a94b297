"""Do K nodes of one process train faster stepped together (torch.func.vmap) than one by one?

    python bench/vmap_step.py [--nodes 1,8,32,128] [--repeats 30] [--workload mnist|shakespeare]

Issue 18.3. K models of the workload's architecture, each with its own parameters,
AdamW state and batch (batch 32 of MNIST, or 16 x 64 characters of the GPT), take
one training step (forward, backward, AdamW) on one thread, as a worker process's
nodes do:

- one by one: K ``nn.Module``s and K ``torch.optim.AdamW`` (what pysim runs);
- together: the K parameter sets stacked along a new first dimension, the loss of
  each model on its own batch by ``torch.func.vmap(functional_call)``, summed, one
  backward (the sum's gradient with respect to model k's slice is model k's own
  gradient) and one AdamW over the stacked tensors (elementwise, so it is each
  model's AdamW).

Prints seconds per node-step (median of --repeats after 5 of warm-up; the minimum
in brackets), the ratio, GFLOP/s against one thread's float32 matmul peak (a 1024^3
matmul, the physical limit of this core for this arithmetic), and how far the two
ways' parameters are apart after one step (float32 reassociation only: vmap turns
K convolutions into one grouped convolution and K matmuls into one batched one).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.workload import Batches, get_workload  # noqa: E402


def matmul_peak_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def batches(workload, k: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = Batches(workload.data()[0])
    g = torch.Generator().manual_seed(seed)
    return [data.batch(torch.randint(len(data), (batch_size,), generator=g)) for _ in range(k)]


class OneByOne:
    def __init__(self, models, workload) -> None:
        self.models = models
        self.opts = [workload.optimizer(m.parameters()) for m in models]
        self.loss = workload.loss

    def step(self, xy) -> None:
        for model, opt, (x, y) in zip(self.models, self.opts, xy, strict=True):
            loss = self.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def parameters(self) -> list[torch.Tensor]:
        return [torch.stack([dict(m.named_parameters())[n] for m in self.models]) for n, _ in
                self.models[0].named_parameters()]


class Together:
    def __init__(self, models, workload) -> None:
        self.base = copy.deepcopy(models[0])
        self.names = [n for n, _ in models[0].named_parameters()]
        self.params = [torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_()
                       for n in self.names]
        self.opt = workload.optimizer(self.params)
        self.loss = workload.loss

        def one(params, x, y):
            return self.loss(functional_call(self.base, dict(zip(self.names, params, strict=True)), (x,)), y)

        self.losses = vmap(one)

    def step(self, xy) -> None:
        x = torch.stack([b[0] for b in xy])
        y = torch.stack([b[1] for b in xy])
        loss = self.losses(self.params, x, y).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def parameters(self) -> list[torch.Tensor]:
        return self.params


def time_steps(way, xy, repeats: int, warmup: int = 5) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        way.step(xy)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def step_flops(workload, xy) -> float:
    """Forward and backward floating-point operations of one model's step (forward x 3)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = workload.model()
    x, y = xy[0]
    with FlopCounterMode(display=False) as counter:
        workload.loss(model(x), y).backward()
    return counter.get_total_flops()


def compare(workload, k: int, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    models = [workload.model() for _ in range(k)]
    xy = batches(workload, k, batch_size)
    one, together = OneByOne(copy.deepcopy(models), workload), Together(models, workload)
    one.step(xy)
    together.step(xy)
    apart = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(one.parameters(), together.parameters(), strict=True))
    t_one, t_together = time_steps(one, xy, repeats), time_steps(together, xy, repeats)
    med = {name: sorted(t)[len(t) // 2] / k for name, t in (("one", t_one), ("together", t_together))}
    return {"k": k, "one_s": med["one"], "one_min_s": min(t_one) / k, "together_s": med["together"],
            "together_min_s": min(t_together) / k, "apart": apart, "flops": step_flops(workload, xy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,8,32,128")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--workload", default="mnist")
    a = ap.parse_args()
    torch.set_num_threads(1)
    workload = get_workload(a.workload)
    batch_size = 32 if a.workload == "mnist" else 16
    peak = matmul_peak_gflops()
    print(f"{a.workload}, batch {batch_size}, one thread; matmul peak {peak:.1f} GFLOP/s")
    print("| nodes K | one by one, per node-step | vmap together, per node-step | together / one by one "
          "| GFLOP/s one / together (of peak) | max relative difference after a step |")
    print("|---|---|---|---|---|---|")
    for k in map(int, a.nodes.split(",")):
        r = compare(workload, k, batch_size, a.repeats)
        g1, g2 = r["flops"] / r["one_s"] / 1e9, r["flops"] / r["together_s"] / 1e9
        print(f"| {k} | {1e3 * r['one_s']:.2f} ms [{1e3 * r['one_min_s']:.2f}] "
              f"| {1e3 * r['together_s']:.2f} ms [{1e3 * r['together_min_s']:.2f}] "
              f"| {r['together_s'] / r['one_s']:.2f} | {g1:.1f} / {g2:.1f} ({100 * g1 / peak:.0f}% / "
              f"{100 * g2 / peak:.0f}%) | {r['apart']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
