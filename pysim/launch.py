"""Node processes: one OS process per node, torch.distributed (gloo) on loopback.

:func:`run_nodes` spawns ``n`` processes running ``fn(rank, world, *args)``
and returns their results in rank order. A node that raises stops the run
with :class:`NodeError` naming the node and carrying its traceback; the other
nodes are terminated (none is left behind, even if the parent is killed:
each child asks the kernel to end it when its parent dies). Under
``torchrun`` (RANK and WORLD_SIZE set) the current process is the node.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class NodeError(RuntimeError):
    """A node process failed; ``rank`` and ``node_traceback`` say where and why."""

    def __init__(self, rank: int, message: str, node_traceback: str = "") -> None:
        super().__init__(f"node {rank} failed: {message}" + (f"\n--- node {rank} traceback ---\n{node_traceback}"
                                                            if node_traceback else ""))
        self.rank = rank
        self.node_traceback = node_traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _node_main(rank: int, world: int, port: int, timeout_s: float, fn: Callable, args: tuple,
               results: mp.Queue) -> None:
    _die_with_parent()
    torch.set_num_threads(1)
    try:
        from pysim import _C

        _C.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel by value, not as shared-memory handles that
        # die with this process
        results.put(("ok", rank, pickle.dumps(out)))
    except BaseException as e:  # report everything, then exit non-zero
        results.put(("error", rank, (f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())))
        sys.exit(1)


def run_nodes(fn: Callable[..., Any], n: int, args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
    """Runs ``fn(rank, n, *args)`` in n node processes and returns the results by rank.

    ``fn`` must be importable (a module-level function). ``timeout_s`` bounds
    any single collective (gloo) and the wait for a silent node.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be an integer >= 1, got {n!r}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(fn, args, timeout_s)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_node_main, args=(r, n, port, timeout_s, fn, args, results), daemon=True,
                         name=f"pysim-node-{r}") for r in range(n)]
    out: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        last_news = time.monotonic()
        while len(out) < n:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    time.sleep(0.2)  # let a dying node's report arrive first
                    try:
                        status, rank, payload = results.get_nowait()
                    except queue.Empty:
                        r = dead[0]
                        raise NodeError(r, f"process exited with code {procs[r].exitcode} without a report "
                                           "(killed, out of memory, or crashed in native code)") from None
                elif time.monotonic() - last_news > timeout_s + 30:
                    missing = [r for r in range(n) if r not in out]
                    raise NodeError(missing[0], f"no result after {timeout_s + 30:.0f} s; "
                                                f"nodes {missing} hung") from None
                else:
                    continue
            last_news = time.monotonic()
            if status == "error":
                message, tb = payload
                raise NodeError(rank, message, tb)
            out[rank] = pickle.loads(payload)
        return [out[r] for r in range(n)]
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        results.close()


def _run_under_torchrun(fn: Callable, args: tuple, timeout_s: float) -> list[Any]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if owned:
            dist.barrier()
        return gathered
    finally:
        if owned:  # a process group left alive at exit aborts in gloo's threads
            dist.destroy_process_group()
