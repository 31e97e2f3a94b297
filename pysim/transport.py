"""Moving messages between simulated nodes: in memory within a process, over gloo between processes.

A message from node ``src`` to node ``dst`` is a tensor (a packet, or a piece
of one). When both nodes live in this process (:mod:`pysim.placement`) the
receiver gets the sender's tensor itself, in order, from a mailbox per
(src, dst); otherwise it crosses to the other process with a gloo
point-to-point message tagged with the pair, so messages of different node
pairs between the same two processes never mix and those of one pair arrive
in the order sent. Either way the bytes are those of the real packet.

Beside the messages, a few process-level operations serve the simulator's
bookkeeping (never charged to the simulated network): every node's metadata
row (:meth:`Transport.gather_rows`), node 0's weights for an evaluation
(:meth:`Transport.broadcast_from`), sums of evaluation shares
(:meth:`Transport.sum`), and a barrier.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from pysim.pieces import BufferPool
from pysim.placement import Placement


class Transport:
    """Messages between the nodes of ``placement`` as seen from worker process ``process``.
    With more than one process, torch.distributed's default group must span the processes
    (rank = process)."""

    def __init__(self, placement: Placement, process: int) -> None:
        self.placement, self.process = placement, process
        self._mail: dict[tuple[int, int], deque[torch.Tensor]] = defaultdict(deque)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.sent: dict[int, int] = defaultdict(int)       # bytes each local node has sent, as they left it
        self.received: dict[int, int] = defaultdict(int)   # bytes each local node has received
        self.pool = BufferPool()                           # message buffers, reused from one collective to the next
        if placement.processes > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{placement.describe()}: messages between processes need torch.distributed "
                               "initialised with one rank per process")

    @property
    def nodes(self) -> int:
        return self.placement.nodes

    def local(self, node: int) -> bool:
        """Whether ``node`` lives in this process."""
        return self.placement.process_of(node) == self.process

    def _tag(self, src: int, dst: int) -> int:
        return src * self.placement.nodes + dst

    # ------------------------------------------------------------ messages

    def send(self, src: int, dst: int, message: torch.Tensor) -> None:
        """Sends ``message`` from ``src`` (a node of this process) to ``dst`` without waiting. The
        tensor must not change until the collective is over (:meth:`flush`)."""
        self.sent[src] += message.numel() * message.element_size()
        if self.local(dst):
            self._mail[(src, dst)].append(message)
        else:
            self._sends.append((dist.isend(message, self.placement.process_of(dst), tag=self._tag(src, dst)),
                                message))

    def take(self, dst: int, src: int) -> torch.Tensor:
        """The next message from ``src`` to ``dst``, both nodes of this process (already sent)."""
        box = self._mail.get((src, dst))
        if not box:
            raise RuntimeError(f"no message from node {src} to node {dst}: the schedule's order is broken")
        message = box.popleft()
        self.received[dst] += message.numel() * message.element_size()
        return message

    def post_receive(self, dst: int, src: int, into: torch.Tensor) -> dist.Work:
        """Posts the receive of the next message from ``src`` (another process's node) to ``dst``
        into ``into``; wait on the returned handle."""
        self.received[dst] += into.numel() * into.element_size()
        return dist.irecv(into, self.placement.process_of(src), tag=self._tag(src, dst))

    def flush(self) -> None:
        """Waits until every message sent to another process has left."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ------------------------------------------------------------ bookkeeping between processes

    def gather_rows(self, rows: dict[int, np.ndarray]) -> np.ndarray:
        """Every node's row (float64, same length) from each process's ``rows`` of its own
        nodes: a (nodes x width) table, the same in every process."""
        width = len(next(iter(rows.values())))
        table = np.full((self.nodes, width), np.nan)
        for n, row in rows.items():
            table[n] = row
        if self.placement.processes == 1:
            return table
        most = max(len(self.placement.hosted(p)) for p in range(self.placement.processes))
        mine = np.full((most, width), np.nan)
        first = self.placement.first(self.process)
        for n, row in rows.items():
            mine[n - first] = row
        parts = [torch.empty(most * width, dtype=torch.float64) for _ in range(self.placement.processes)]
        dist.all_gather(parts, torch.from_numpy(mine.reshape(-1)))
        for p, part in enumerate(parts):
            hosted = self.placement.hosted(p)
            table[hosted.start:hosted.stop] = part.numpy().reshape(most, width)[:len(hosted)]
        return table

    def broadcast_from(self, node: int, tensors: list[torch.Tensor]) -> None:
        """Node ``node``'s process sends ``tensors`` (in place) to every other process."""
        if self.placement.processes == 1:
            return
        root = self.placement.process_of(node)
        for t in tensors:
            dist.broadcast(t, root)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place."""
        if self.placement.processes > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.placement.processes > 1:
            dist.barrier()
