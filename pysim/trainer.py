"""The Trainer: N node processes train a model with a strategy over a simulated network.

Each node trains on its own shard of the training set. Node 0 evaluates the
strategy's model on the full test set every ``eval_every`` steps and at the
end. The run's result (JSON + per-step CSV) and its trace (for replay under
other networks) are written to ``out_dir``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pysim.clock import replay, trace_from_nodes
from pysim.comm import Comm
from pysim.compute import ComputeMeter, count_flops, device_flops_per_s
from pysim.launch import run_nodes
from pysim.mnist import load_mnist, verify_mnist
from pysim.models import MnistCNN
from pysim.network import Network, network_from_json, network_to_json
from pysim.results import RESULT_VERSION, check_out_dir, save_result, time_to_target
from pysim.strategies import make_strategy


@dataclass
class TrainConfig:
    """Everything a run depends on. Units: seconds, bytes; ``lr`` is the inner optimizer's."""

    strategy: str = "SimpleReduce"
    strategy_args: dict = field(default_factory=dict)
    nodes: int = 2
    network: Network = field(default_factory=lambda: Network.uniform(2, "100Mbit", "20ms"))
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    eval_every: int = 100
    seed: int = 0
    compute: str = "measured"          # or a device profile: "cpu", "a100", "h100", ...
    algorithm: str = "ring"            # all-reduce algorithm: "ring" or "star"
    data_dir: str | None = None
    train_subset: int | None = None    # use only this many training images (tests)
    target_acc: float = 0.98
    label: str | None = None

    def check(self) -> None:
        for name in ("nodes", "steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.compute != "measured":
            device_flops_per_s(self.compute)
        if self.algorithm not in ("ring", "star"):
            raise ValueError(f"algorithm must be 'ring' or 'star', got {self.algorithm!r}")
        if not 0 < self.target_acc <= 1:
            raise ValueError(f"target_acc must be in (0, 1], got {self.target_acc}")
        self.network = self.network.with_nodes(self.nodes)
        make_strategy(self.strategy, **self.strategy_args)  # fails early on bad arguments
        verify_mnist(self.data_dir)  # a missing or corrupt file is reported here, not by every node

    @property
    def name(self) -> str:
        return self.label or self.strategy

    def to_json(self) -> dict:
        d = asdict(self)
        d["network"] = network_to_json(self.network)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["network"] = network_from_json(d["network"])
        return cls(**d)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0.05 at the last step."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the given set."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(images), batch):
        out = model(images[i:i + batch])
        loss += F.cross_entropy(out, labels[i:i + batch], reduction="sum").item()
        correct += int((out.argmax(1) == labels[i:i + batch]).sum())
    model.train()
    return loss / len(images), correct / len(images)


def train_node(rank: int, world: int, cfg: TrainConfig) -> dict:
    """One node's training loop (runs inside a node process)."""
    def my_rows(n: int) -> torch.Tensor:  # this node's shard: a seeded permutation, every world-th row
        n = min(n, cfg.train_subset or n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[rank::world]

    data = load_mnist(cfg.data_dir, train_rows=my_rows)
    images, labels = data["train_images"], data["train_labels"]
    test_images, test_labels = (data["test_images"], data["test_labels"]) if rank == 0 else (None, None)
    del data
    torch.manual_seed(cfg.seed)  # identical initial model on every node
    model = MnistCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    strategy = make_strategy(cfg.strategy, **cfg.strategy_args)
    meter = ComputeMeter(None if cfg.compute == "measured" else cfg.compute)
    comm = Comm(rank, world, cfg.network, meter, cfg.algorithm)
    strategy.setup(model, optimizer, comm, scheduler)

    order = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    perm, pos = torch.randperm(len(images), generator=order), 0

    def next_batch():  # reshuffled every pass over this node's shard
        nonlocal perm, pos
        if pos + cfg.batch_size > len(perm):
            perm, pos = torch.randperm(len(images), generator=order), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        return images[idx], labels[idx]

    xb, yb = next_batch()
    flops = count_flops(lambda: F.cross_entropy(model(xb), yb).backward())
    optimizer.zero_grad()
    steps, evals = [], []
    # a progress bar on node 0 for runs long enough to want one, when a person is watching
    bar = tqdm(total=cfg.steps, desc=f"{cfg.name} (node 0)", unit="step", leave=False, mininterval=0.5,
               disable=rank != 0 or cfg.steps < 200 or not sys.stderr.isatty())
    for step in range(cfg.steps):
        xb, yb = next_batch()
        with meter.measure(flops=flops):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
        strategy.step(step, last=step == cfg.steps - 1)
        clock = comm.end_step()
        steps.append((loss.item(), clock, comm.bytes_sent, comm.bytes_received, comm.compute_total_s, comm.comm_s))
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            test_loss, acc = evaluate(strategy.eval_model(), test_images, test_labels)
            evals.append((step + 1, test_loss, acc))
            bar.set_postfix(acc=f"{100 * acc:.2f}%", sim=f"{clock:.1f}s")
        bar.update()
    bar.close()
    return {"steps": steps, "evals": evals, "segments": comm.segments, "step_ends": comm.step_ends}


def run(cfg: TrainConfig, out_dir: str | Path | None = None, timeout_s: float = 300.0) -> dict:
    """Trains ``cfg`` in ``cfg.nodes`` processes; returns (and writes) the result."""
    cfg.check()
    if out_dir is not None:
        check_out_dir(out_dir)  # an unwritable --out fails now, not after training
    t0 = time.perf_counter()
    nodes = run_nodes(train_node, cfg.nodes, (cfg,), timeout_s=timeout_s)
    runtime_s = time.perf_counter() - t0
    trace = trace_from_nodes([r["segments"] for r in nodes], nodes[0]["step_ends"])
    timeline = replay(trace, cfg.network, None)
    live = [r["steps"][-1][1] for r in nodes]
    if list(timeline.end_s[-1]) != live:  # the invariant everything else rests on
        raise RuntimeError(f"live clock {live} and replay {list(timeline.end_s[-1])} disagree")
    n = cfg.nodes
    steps = []
    for k in range(cfg.steps):
        rows = [r["steps"][k] for r in nodes]
        steps.append({
            "step": k + 1,
            "loss": sum(row[0] for row in rows) / n,
            "sim_time_s": float(timeline.step_end_s[k]),
            "bytes_sent_per_node": sum(row[2] for row in rows) / n,
            "bytes_received_per_node": sum(row[3] for row in rows) / n,
            "compute_s": max(row[4] for row in rows),
            "comm_s": max(row[5] for row in rows),
        })
    evals = [{"step": s, "sim_time_s": steps[s - 1]["sim_time_s"], "test_loss": tl, "test_acc": acc,
              "bytes_sent_per_node": steps[s - 1]["bytes_sent_per_node"]}
             for s, tl, acc in nodes[0]["evals"]]
    sent, recv = trace.bytes_per_node()
    result = {
        "version": RESULT_VERSION,
        "name": cfg.name,
        "config": cfg.to_json(),
        "network": cfg.network.describe(),
        "steps": steps,
        "evals": evals,
        "final": {
            "test_acc": evals[-1]["test_acc"],
            "test_loss": evals[-1]["test_loss"],
            "sim_time_s": float(timeline.total_s),
            "time_to_target_s": time_to_target(evals, cfg.target_acc),
            "bytes_sent_per_node": sum(sent) / n,
            "bytes_received_per_node": sum(recv) / n,
            "compute_s": steps[-1]["compute_s"],
            "comm_s": steps[-1]["comm_s"],
            "real_runtime_s": runtime_s,
        },
    }
    if out_dir is not None:
        save_result(result, trace, out_dir)
    result["trace"] = trace
    return result
