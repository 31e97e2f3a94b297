"""Moving messages between simulated nodes: in memory within a process, then between processes.

A message from node ``src`` to node ``dst`` is a tensor (a packet, or a piece
of one). When both nodes live in this process (:mod:`pysim.placement`) the
receiver gets the sender's tensor itself, in order, from a mailbox per
(src, dst); otherwise it crosses to the other process tagged with the pair, so
messages of different node pairs between the same two processes never mix and
those of one pair arrive in the order sent: through shared memory between the
worker processes of one machine (:mod:`pysim.links`), or as gloo
point-to-point messages (across machines under torchrun, and where shared
memory cannot be had). Either way the bytes are those of the real packet.

Beside the messages, a few process-level operations serve the simulator's
bookkeeping (never charged to the simulated network): every node's metadata
row (:meth:`Transport.gather_rows`), node 0's weights for an evaluation
(:meth:`Transport.broadcast_from`), sums of evaluation shares
(:meth:`Transport.sum`), and a barrier.
"""

from __future__ import annotations

import pickle
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from pysim.links import Links
from pysim.pieces import BufferPool
from pysim.placement import Placement

_BUNDLES = 5   # the tag kind (above the node pairs') of send_bundle's messages


class Transport:
    """Messages between the nodes of ``placement`` as seen from worker process ``process``:
    between processes through ``links`` (shared memory) if given, else torch.distributed's
    default group, which must then span the processes (rank = process)."""

    def __init__(self, placement: Placement, process: int, links: Links | None = None) -> None:
        self.placement, self.process, self.links = placement, process, links
        self._control = placement.nodes * placement.nodes   # tags above the node pairs': bookkeeping
        self._mail: dict[tuple[int, int], deque[torch.Tensor]] = defaultdict(deque)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.sent: dict[int, int] = defaultdict(int)       # bytes each local node has sent, as they left it
        self.received: dict[int, int] = defaultdict(int)   # bytes each local node has received
        self.pool = BufferPool()                           # message buffers, reused from one collective to the next
        if placement.processes > 1 and links is None and not (dist.is_available() and dist.is_initialized()):
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

    def send(self, src: int, dst: int, message: torch.Tensor, raw: np.ndarray | None = None) -> None:
        """Sends ``message`` from ``src`` (a node of this process) to ``dst`` without waiting. The
        tensor must not change until the collective is over (:meth:`flush`). ``raw``: the
        message's bytes as a 1-D uint8 NumPy view, where the caller keeps one (a plan that sends
        from the same buffers every time), saving the conversion."""
        self.sent[src] += message.numel() * message.element_size()
        if self.local(dst):
            self._mail[(src, dst)].append(message)
        elif self.links is not None:
            payload = _bytes(message) if raw is None else raw
            self.links.send(self.placement.process_of(dst), self._tag(src, dst), payload)
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

    def post_receive(self, dst: int, src: int, into: torch.Tensor, raw: np.ndarray | None = None) -> dist.Work:
        """Posts the receive of the next message from ``src`` (another process's node) to ``dst``
        into ``into`` (``raw``: its bytes as a NumPy view, as for :meth:`send`); wait on the
        returned handle."""
        self.received[dst] += into.numel() * into.element_size()
        if self.links is not None:
            return self.links.receive(self.placement.process_of(src), self._tag(src, dst),
                                      _bytes(into) if raw is None else raw)
        return dist.irecv(into, self.placement.process_of(src), tag=self._tag(src, dst))

    def send_bundle(self, process: int, packets: list[tuple[int, torch.Tensor, np.ndarray]]) -> None:
        """Sends packets from nodes of this process to nodes of process ``process`` as one message:
        their bytes back to back, in the order given. ``packets``: (sending node, the packet, its
        bytes as a 1-D uint8 NumPy view); each is charged to its node as :meth:`send` charges it.
        The other process receives them with one :meth:`post_bundle` of the same packets, in the
        same order. Messages of one pair of processes arrive in the order sent."""
        for src, message, _ in packets:
            self.sent[src] += message.numel() * message.element_size()
        if self.links is not None:
            self.links.send(process, self._control + _BUNDLES, [raw for _, _, raw in packets])
        else:
            whole = torch.cat([message for _, message, _ in packets])
            self._sends.append((dist.isend(whole, process, tag=self._control + _BUNDLES), whole))

    def post_bundle(self, process: int, into: torch.Tensor, raw: np.ndarray,
                    shares: list[tuple[int, int]]) -> dist.Work:
        """Posts the receive of the next :meth:`send_bundle` from process ``process`` into ``into``
        (``raw``: its bytes as a NumPy view); ``shares``: (receiving node, bytes) of each packet in
        it, in order, counted as each node's received bytes. Wait on the returned handle."""
        for dst, nbytes in shares:
            self.received[dst] += nbytes
        if self.links is not None:
            return self.links.receive(process, self._control + _BUNDLES, raw)
        return dist.irecv(into, process, tag=self._control + _BUNDLES)

    def flush(self) -> None:
        """Waits until every message sent to another process has left."""
        if self.links is not None:
            self.links.flush()
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ------------------------------------------------------------ between processes, through the links

    def _others(self) -> list[int]:
        return [p for p in range(self.placement.processes) if p != self.process]

    def _exchange(self, kind: int, payload: np.ndarray) -> dict[int, np.ndarray]:
        """Sends ``payload`` to every other process and returns what each sent (links only)."""
        tag = self._control + kind
        for p in self._others():
            self.links.send(p, tag, payload)
        got = {p: self.links.receive(p, tag).wait() for p in self._others()}
        self.links.flush()
        return got

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
        if self.links is not None:
            own = self.placement.hosted(self.process)
            mine = table[own.start:own.stop].copy()
            for p, data in self._exchange(0, mine.view(np.uint8).reshape(-1)).items():
                hosted = self.placement.hosted(p)
                table[hosted.start:hosted.stop] = data.view(np.float64).reshape(len(hosted), width)
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
        if self.links is not None:
            tag = self._control + 1
            if root == self.process:
                for t in tensors:
                    for p in self._others():
                        self.links.send(p, tag, _bytes(t))
                self.links.flush()
            else:
                for t in tensors:
                    self.links.receive(root, tag, _bytes(t)).wait()
            return
        for t in tensors:
            dist.broadcast(t, root)

    def broadcast_object(self, value: object, node: int) -> object:
        """``value`` of node ``node``'s process, in every process (pickled; a small bookkeeping value)."""
        if self.placement.processes == 1:
            return value
        root = self.placement.process_of(node)
        if self.links is None:
            box = [value]
            dist.broadcast_object_list(box, root)
            return box[0]
        tag = self._control + 4
        if root == self.process:
            data = np.frombuffer(pickle.dumps(value), dtype=np.uint8)
            for p in self._others():
                self.links.send(p, tag, data)
            self.links.flush()
            return value
        return pickle.loads(self.links.receive(root, tag).wait().tobytes())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place (with the links: in process order, the same
        everywhere)."""
        if self.placement.processes == 1:
            return t
        if self.links is None:
            dist.all_reduce(t)
            return t
        parts = self._exchange(2, _bytes(t.contiguous()).copy())
        parts[self.process] = _bytes(t.contiguous()).copy()
        total = None
        for p in range(self.placement.processes):
            v = torch.from_numpy(parts[p].view(t.numpy().dtype).reshape(t.shape))
            total = v.clone() if total is None else total + v
        t.copy_(total)
        return t

    def barrier(self) -> None:
        if self.placement.processes == 1:
            return
        if self.links is not None:
            self._exchange(3, np.zeros(0, dtype=np.uint8))
        else:
            dist.barrier()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as a 1-D uint8 NumPy view (no copy)."""
    if not t.is_contiguous():
        raise ValueError("messages must be contiguous tensors")
    return t.detach().reshape(-1).view(torch.uint8).numpy()
