"""Where simulated nodes run: which worker process hosts which node, and how many fit in memory.

A run of N simulated nodes is spread over P worker processes in contiguous
blocks: process p hosts nodes [N*p/P, N*(p+1)/P). Contiguous blocks keep ring
neighbours together, so a ring collective crosses between processes P times
per phase, not N. Placement never changes a result (metrics, bytes, simulated
time and trace are the same for every P); it changes only real time and memory.

Memory. A worker process costs a fixed amount (the interpreter, torch, its
copy of the data set) and each node it hosts adds its own state (model,
gradients, optimizer and strategy buffers, sampler). :func:`max_nodes` turns
those two figures into how many nodes fit in the memory available now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROCESS_BYTES = 300 << 20   # a worker process: interpreter, torch, its data set (measured 240-300 MiB)
# What one more node costs, fitted to bench/scale.py's measurements on this machine (bench/RESULTS.md):
# 5.8-9.9 MiB per MNIST-CNN node (0.18 MiB of parameters), 41-48 MiB per GPT node (3.1 MiB). Weights,
# gradients and two Adam moments are 4 copies of the model; the allocator keeps as much again from
# the activations of the node's steps, and strategies hold a global model, momentum, residuals.
STATE_COPIES = 13           # bytes per node per byte of float32 parameters
NODE_FIXED_BYTES = 5 << 20  # a node's thread, Python objects, sampler and records, beside its tensors


def available_memory() -> int:
    """Bytes of memory available for new processes (Linux MemAvailable; 16 GiB if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def default_processes(nodes: int) -> int:
    """Worker processes for ``nodes`` nodes by default: one per core, at most one per node."""
    return max(1, min(nodes, os.cpu_count() or 1))


@dataclass(frozen=True)
class Placement:
    """``nodes`` simulated nodes on ``processes`` worker processes, in contiguous blocks."""

    nodes: int
    processes: int

    def __post_init__(self) -> None:
        for name, v in (("nodes", self.nodes), ("processes", self.processes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.processes > self.nodes:
            raise ValueError(f"{self.processes} processes for {self.nodes} nodes: each process hosts at least "
                             f"one node; use at most {self.nodes} processes")

    def first(self, process: int) -> int:
        """The first node of ``process``."""
        return self.nodes * process // self.processes

    def hosted(self, process: int) -> range:
        """The nodes ``process`` hosts."""
        return range(self.first(process), self.first(process + 1))

    def process_of(self, node: int) -> int:
        """The process hosting ``node``."""
        return ((node + 1) * self.processes - 1) // self.nodes

    def describe(self) -> str:
        if self.processes == self.nodes:
            return f"{self.nodes} node process{'es' if self.nodes > 1 else ''}"
        return f"{self.nodes} nodes on {self.processes} worker process{'es' if self.processes > 1 else ''}"


def node_state_bytes(parameters: int) -> int:
    """The memory one more node costs, for a model of ``parameters`` float32 parameters."""
    return STATE_COPIES * 4 * parameters + NODE_FIXED_BYTES


def check_fits(nodes: int, processes: int, node_bytes: int) -> None:
    """One-line ValueError, saying how many nodes fit, unless ``nodes`` fit in memory now."""
    need = memory_needed(nodes, processes, node_bytes)
    free = available_memory()
    if need > free:
        fit = max_nodes(processes, node_bytes, free)
        raise ValueError(f"{nodes} nodes need about {need / 2**30:.1f} GiB ({processes} worker processes of "
                         f"{PROCESS_BYTES >> 20} MiB, {node_bytes / 2**20:.1f} MiB per node) but this machine has "
                         f"{free / 2**30:.1f} GiB available: use at most {fit} nodes")


def memory_needed(nodes: int, processes: int, node_bytes: int) -> int:
    """Bytes a run needs: every worker process's fixed cost plus every node's state."""
    return processes * PROCESS_BYTES + nodes * node_bytes


def max_nodes(processes: int, node_bytes: int, available: int | None = None) -> int:
    """How many nodes of ``node_bytes`` each fit, with ``processes`` worker processes, in the
    memory available now (or ``available`` bytes)."""
    free = available_memory() if available is None else available
    return max(0, (free - processes * PROCESS_BYTES) // max(1, node_bytes))
