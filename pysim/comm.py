"""The comm layer of a node: real packets between processes, charged to a virtual clock.

Each collective (1) moves the real packets between the node processes with
point-to-point gloo messages in the pattern of the chosen algorithm, (2)
shares an uncharged metadata row per node (its clock, compute since the last
collective and packet length: simulator bookkeeping, whose real-network
counterpart is the packet header) riding ahead of the all-reduce's own
messages, or for all-gathers, whose packet sizes the receivers must learn
first, in a small separate all-gather, and (3) advances the virtual clock with
:func:`pysim.clock.advance` by the cost of exactly those packets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pysim.clock import Collective, advance
from pysim.compress import Codec, DenseCodec, split_packets
from pysim.compute import ComputeMeter
from pysim.network import Network, collective_s


class Comm:
    """Collectives for one node of a ``world``-node run on ``network``.

    ``algorithm`` is the all-reduce algorithm: "ring" (default) or "star"
    (parameter server at node 0). All-gathers use a ring.
    """

    def __init__(self, rank: int, world: int, network: Network, meter: ComputeMeter | None = None,
                 algorithm: str = "ring") -> None:
        if algorithm not in ("ring", "star"):
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; use 'ring' or 'star'")
        self.rank, self.world = rank, world
        self.network = network.with_nodes(world)
        self.meter = meter or ComputeMeter()
        self.algorithm = algorithm
        self.clock_s = 0.0               # this node's virtual time
        self.bytes_sent = 0              # real packet bytes this node sent
        self.bytes_received = 0
        self.comm_s = 0.0                # virtual time spent waiting for and in collectives
        self.compute_total_s = 0.0
        # this node's view of the trace: per segment (compute_s, flops, collective)
        self.segments: list[tuple[float, float, Collective | None]] = []
        self.step_ends: list[int] = []
        self._dense = DenseCodec()

    # ------------------------------------------------------------ clock

    def end_step(self) -> float:
        """Closes a training step: the compute since the last collective is added to
        this node's clock. Returns the node's virtual time (s)."""
        comp, flops = self.meter.take()
        self.clock_s = float(advance(np.array([self.clock_s]), np.array([comp]), None)[0])
        self.compute_total_s += comp
        self.segments.append((comp, flops, None))
        self.step_ends.append(len(self.segments) - 1)
        return self.clock_s

    def _my_row(self, my_bytes: int) -> np.ndarray:
        """This node's metadata row (clock, compute s, flops, bytes) in a (nodes x 4)
        float64 table whose unknown rows are NaN. NumPy: these are tiny arrays on the
        hot path, where torch's per-op dispatch would cost more than the data."""
        comp, flops = self.meter.take()
        table = np.full((self.world, 4), np.nan)
        table[self.rank] = (self.clock_s, comp, flops, my_bytes)
        return table

    def _charge(self, op: str, algo: str, sizes: list[int], table: np.ndarray) -> None:
        """Advances the clock over one collective, given every node's metadata row."""
        comp, flops = float(table[self.rank, 1]), float(table[self.rank, 2])
        coll = Collective(op, algo, tuple(sizes))
        cost = collective_s(self.network, op, algo, coll.sizes)
        before = self.clock_s + comp
        self.clock_s = float(advance(table[:, 0].copy(), table[:, 1].copy(), cost)[self.rank])
        self.comm_s += self.clock_s - before
        self.compute_total_s += comp
        self.segments.append((comp, flops, coll))

    def _begin(self, op: str, algo: str, my_bytes: int) -> list[int]:
        """Exchanges metadata in a separate small collective (for packets whose sizes the
        receivers cannot know in advance) and charges the clock; returns the member sizes."""
        table = self._my_row(my_bytes)
        if self.world > 1:
            rows = [torch.empty(4, dtype=torch.float64) for _ in range(self.world)]
            dist.all_gather(rows, torch.from_numpy(table[self.rank].copy()))
            table = torch.stack(rows).numpy()
        sizes = [int(v) for v in table[:, 3]]
        self._charge(op, algo, sizes, table)
        return sizes

    # ------------------------------------------------------------ transport

    def _exchange(self, send: torch.Tensor | None, dst: int, recv_bytes: int | None, src: int,
                  table: np.ndarray | None = None) -> torch.Tensor | None:
        """Sends ``send`` to dst and receives ``recv_bytes`` from src (either may be None).
        With ``table``, the metadata table rides along, uncharged, ahead of the packet and
        the rows the sender knew are merged into ``table`` in place."""
        trailer = 0 if table is None else table.nbytes
        req = None
        if send is not None:
            if table is None:
                wire = send
            else:
                wire = torch.empty(trailer + send.numel(), dtype=torch.uint8)
                w = wire.numpy()
                w[:trailer] = table.reshape(-1).view(np.uint8)
                w[trailer:] = send.numpy()
            req = dist.isend(wire, dst)
            self.bytes_sent += send.numel()
        out = None
        if recv_bytes is not None:
            buf = torch.empty(recv_bytes + trailer, dtype=torch.uint8)
            dist.recv(buf, src)
            self.bytes_received += recv_bytes
            out = buf[trailer:]
            if table is not None:
                theirs = buf.numpy()[:trailer].view(np.float64).reshape(table.shape)
                unknown = np.isnan(table[:, 0])
                table[unknown] = theirs[unknown]
        if req is not None:
            req.wait()
        return out

    # ------------------------------------------------------------ collectives

    def allreduce_mean(self, x: torch.Tensor, codec: Codec | None = None) -> torch.Tensor:
        """Mean of ``x`` over all nodes. Values travel as packets of a summable ``codec``
        (dense fp32 default; fp16/bf16/int8/int4 quantise every hop, as on a real wire)."""
        codec = codec or self._dense
        if not codec.summable:
            raise ValueError(f"allreduce_mean takes a summable codec (dense, int8, int4); "
                             f"use allgather_mean for {codec.name}")
        flat = x.detach().reshape(-1).float().clone()
        n, r = self.world, self.rank
        if self.algorithm == "star":
            return self._star_allreduce(flat, codec).reshape(x.shape).to(x.dtype)
        bounds = [flat.numel() * c // n for c in range(n + 1)]
        chunks = [flat[bounds[c]:bounds[c + 1]] for c in range(n)]
        sizes = [codec.nbytes((bounds[c + 1] - bounds[c],)) for c in range(n)]
        table = self._my_row(sizes[r])
        if n == 1:
            self._charge("allreduce", "ring", sizes, table)
            return flat.reshape(x.shape).to(x.dtype)
        right, left = (r + 1) % n, (r - 1) % n
        with self.meter.measure():
            packet = codec.pack(chunks[r])
        # the metadata rows travel with the reduce-scatter: after n-1 hops every node has all
        for t in range(n - 1):  # reduce-scatter: chunk (r-t) leaves, chunk (r-t-1) arrives
            got = self._exchange(packet, right, sizes[(r - t - 1) % n], left, table)
            with self.meter.measure():
                c = (r - t - 1) % n
                chunks[c] += codec.unpack(got)
                packet = codec.pack(chunks[c])
        self._charge("allreduce", "ring", sizes, table)
        # node r now owns the full sum of chunk (r+1); everyone keeps the wire version of it
        own = (r + 1) % n
        if codec.lossy:
            chunks[own].copy_(codec.unpack(packet))
        for t in range(n - 1):  # all-gather: chunk (r+1-t) leaves, chunk (r-t) arrives
            got = self._exchange(packet, right, sizes[(r - t) % n], left)
            c = (r - t) % n
            chunks[c].copy_(codec.unpack(got))
            packet = got
        return (flat / n).reshape(x.shape).to(x.dtype)

    def _star_allreduce(self, flat: torch.Tensor, codec: Codec) -> torch.Tensor:
        n = self.world
        size = codec.nbytes((flat.numel(),))
        table = self._my_row(size)
        if n == 1:
            self._charge("allreduce", "star", [size], table)
            return flat
        if self.rank == 0:  # workers' rows arrive with their packets, the full table goes back
            total = flat.clone()
            for j in range(1, n):
                total += codec.unpack(self._exchange(None, j, size, j, table))
            packet = codec.pack(total / n)
            for j in range(1, n):
                self._exchange(packet, j, None, j, table)
            self._charge("allreduce", "star", [size] * n, table)
            return codec.unpack(packet).float()
        self._exchange(codec.pack(flat), 0, None, 0, table)
        result = codec.unpack(self._exchange(None, 0, size, 0, table)).float()
        self._charge("allreduce", "star", [size] * n, table)
        return result

    def allgather(self, packet: torch.Tensor) -> list[torch.Tensor]:
        """Every node's packet (index = rank), moved around a ring; packets may differ in size."""
        if packet.dtype != torch.uint8 or packet.dim() != 1:
            raise ValueError("allgather moves packets: 1-D torch.uint8 tensors from a codec")
        sizes = self._begin("allgather", "ring", packet.numel())
        n, r = self.world, self.rank
        out: list[torch.Tensor | None] = [None] * n
        out[r] = packet
        current = packet
        for t in range(n - 1):  # packet (r-t) leaves, packet (r-t-1) arrives
            src_packet = (r - t - 1) % n
            current = self._exchange(current, (r + 1) % n, sizes[src_packet], (r - 1) % n)
            out[src_packet] = current
        return out  # type: ignore[return-value]

    def allgather_mean(self, x: torch.Tensor, codec: Codec, key: str = "", step: int = 0) -> torch.Tensor:
        """Mean over nodes of ``codec``'s reconstruction of each node's ``x`` (for sparse and
        low-rank codecs, whose packets cannot be summed on the wire)."""
        return self.allgather_mean_many({key: x}, codec, step)[key]

    def allgather_mean_many(self, tensors: dict[str, torch.Tensor], codec: Codec, step: int = 0
                            ) -> dict[str, torch.Tensor]:
        """Like :meth:`allgather_mean` for several named tensors in one collective: each node
        sends one bundle, the concatenation of its packets (bytes = the sum of their lengths)."""
        with self.meter.measure():
            bundle = torch.cat([codec.pack(t, key=name, step=step) for name, t in tensors.items()])
        bundles = self.allgather(bundle)
        with self.meter.measure():
            totals = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in tensors.items()}
            for b in bundles:
                packets = split_packets(b)
                if len(packets) != len(totals):
                    raise ValueError(f"a node sent {len(packets)} packets, expected {len(totals)}")
                for name, p in zip(totals, packets, strict=True):
                    totals[name] += codec.unpack(p).float()
            return {name: (tot / self.world).to(tensors[name].dtype) for name, tot in totals.items()}
