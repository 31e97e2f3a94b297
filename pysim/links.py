"""Byte streams between the worker processes of one machine, in shared memory.

Between two processes on one machine a message need not cross a socket: each
ordered pair of worker processes (p, q) shares a ring of bytes in shared memory
that only p writes and only q reads, and every process has a *doorbell* (a
semaphore) that the others ring whenever they write to it or free room in a
ring it writes to. A message is a 16-byte frame header (its tag and length,
unsigned 64-bit, little-endian) and its bytes, padded to 8; a message larger
than the free room leaves in parts as the reader makes room. Sends never block:
they queue, and every process moves what it can whenever it waits for anything
(so two processes that send to each other at once cannot deadlock). A receive
names its source and tag; messages of one (source, tag) arrive in the order
sent, and one that arrives before its receive is posted waits in a side queue.

Compared with gloo's point-to-point messages over loopback TCP on a 2-core
machine, an exchange of 94 KB each way took 21 us instead of about 1.4 ms, and
without gloo's loop thread taking CPU from the other process (bench/RESULTS.md).

Ordering: the reader reads a ring's write position without a lock and then its
bytes, which is safe where stores become visible in program order (x86's TSO);
:func:`available` says False elsewhere, and runs use gloo there.

The parent makes the segments and doorbells (:func:`create`) and removes the
segments when the run is over; a worker attaches with :meth:`Links.attach`.
"""

from __future__ import annotations

import platform
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

HEADER = 64          # bytes before a ring's data: its write position, its read position (cache line apart)
FRAME = 16           # a message's frame header: tag, length
_FRAME = struct.Struct("<QQ")
_PADDING = np.zeros(8, dtype=np.uint8)


def available() -> bool:
    """Whether this machine's memory order lets the rings work without locks."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def ring_bytes(processes: int, budget: int = 256 << 20) -> int:
    """Bytes of each of the P(P-1) rings: 16 MiB, less when there are many processes (at least 1 MiB)."""
    pairs = max(1, processes * (processes - 1))
    return max(1 << 20, min(16 << 20, budget // pairs)) // 8 * 8


@dataclass
class LinkSpec:
    """What a worker needs to attach: the segments' names by (src, dst) process, ring size, doorbells."""

    names: dict[tuple[int, int], str]
    size: int
    doorbells: list[Any]        # multiprocessing semaphores, one per process


def create(processes: int, ctx) -> tuple[LinkSpec, list[shared_memory.SharedMemory]]:
    """The parent's part: a ring per ordered pair of processes and a doorbell per process. The
    returned segments are the parent's to close and unlink when the run is over."""
    size = ring_bytes(processes)
    segments, names = [], {}
    try:
        for p in range(processes):
            for q in range(processes):
                if p != q:
                    seg = shared_memory.SharedMemory(create=True, size=HEADER + size)
                    np.ndarray(2, dtype=np.uint64, buffer=seg.buf)[:] = 0
                    segments.append(seg)
                    names[(p, q)] = seg.name
    except OSError:
        destroy(segments)
        raise
    return LinkSpec(names, size, [ctx.Semaphore(0) for _ in range(processes)]), segments


def destroy(segments: list[shared_memory.SharedMemory]) -> None:
    for seg in segments:
        seg.close()
        try:
            seg.unlink()
        except FileNotFoundError:
            pass


class _Ring:
    """One direction of one pair: positions in the segment's header, bytes after it."""

    def __init__(self, seg: shared_memory.SharedMemory, size: int) -> None:
        self.seg = seg
        self.pos = np.ndarray(2, dtype=np.uint64, buffer=seg.buf)   # [written, read]: byte counters
        self.data = np.ndarray(size, dtype=np.uint8, buffer=seg.buf, offset=HEADER)
        self.size = size

    def used(self) -> int:
        return int(self.pos[0]) - int(self.pos[1])

    def put(self, src: np.ndarray, at: int) -> None:
        """Copies ``src`` into the ring at stream position ``at`` (wrapping)."""
        start = at % self.size
        first = min(len(src), self.size - start)
        self.data[start:start + first] = src[:first]
        if first < len(src):
            self.data[:len(src) - first] = src[first:]

    def get(self, into: np.ndarray, at: int) -> None:
        start = at % self.size
        first = min(len(into), self.size - start)
        into[:first] = self.data[start:start + first]
        if first < len(into):
            into[first:] = self.data[:len(into) - first]


class _Outgoing:
    """A message on its way into a ring: its bytes (frame, payload parts, padding) and how many have left."""

    def __init__(self, tag: int, payload: list[np.ndarray]) -> None:
        n = sum(len(part) for part in payload)
        self.parts = [np.frombuffer(_FRAME.pack(tag, n), dtype=np.uint8), *payload]
        pad = -n % 8
        if pad:
            self.parts.append(_PADDING[:pad])
        self.total = FRAME + n + pad
        self.done = 0

    def write(self, ring: _Ring, room: int, at: int) -> int:
        """Writes up to ``room`` more bytes at stream position ``at``; returns how many."""
        wrote, offset = 0, 0
        for part in self.parts:
            lo = max(0, self.done - offset)
            if lo < len(part) and wrote < room:
                piece = part[lo:lo + (room - wrote)]
                ring.put(piece, at + wrote)
                wrote += len(piece)
                self.done += len(piece)
            offset += len(part)
        return wrote


class Receive:
    """A posted receive: ``wait()`` returns once the message is in ``into``."""

    def __init__(self, links: Links, into: np.ndarray | None) -> None:
        self.links, self.into, self.complete = links, into, False

    def wait(self) -> np.ndarray:
        if not self.complete:
            self.links.wait_for(lambda: self.complete)
        return self.into


class _Incoming:
    """The message a ring is delivering: frame read, payload bytes received so far."""

    def __init__(self, tag: int, length: int, target: Receive) -> None:
        self.tag, self.length, self.target, self.got = tag, length, target, 0
        self.padded = length + (-length % 8)


class Links:
    """This process's end of every ring (see the module docstring)."""

    def __init__(self, spec: LinkSpec, me: int, timeout_s: float = 300.0) -> None:
        self.me, self.timeout_s = me, timeout_s
        self.doorbells = spec.doorbells
        self._segments = []
        self.out: dict[int, _Ring] = {}
        self.into: dict[int, _Ring] = {}
        for (p, q), name in spec.names.items():
            if me not in (p, q):
                continue
            seg = shared_memory.SharedMemory(name=name)   # the parent's resource tracker already knows it
            self._segments.append(seg)
            (self.out if p == me else self.into)[q if p == me else p] = _Ring(seg, spec.size)
        self.queued: dict[int, deque[_Outgoing]] = defaultdict(deque)
        self.posted: dict[tuple[int, int], deque[Receive]] = defaultdict(deque)
        self.early: dict[tuple[int, int], deque[Receive]] = defaultdict(deque)   # arrived before posted
        self.current: dict[int, _Incoming | None] = dict.fromkeys(self.into)

    @classmethod
    def attach(cls, spec: LinkSpec, me: int, timeout_s: float = 300.0) -> Links:
        return cls(spec, me, timeout_s)

    def close(self) -> None:
        for seg in self._segments:
            seg.close()

    # ------------------------------------------------------------ sending and receiving

    def send(self, dst: int, tag: int, payload: np.ndarray | list[np.ndarray]) -> None:
        """Queues ``payload`` (1-D uint8, unchanged until :meth:`flush`) for process ``dst``: one
        array, or a list of arrays whose bytes leave back to back as one message."""
        self.queued[dst].append(_Outgoing(tag, payload if isinstance(payload, list) else [payload]))
        self.progress()

    def receive(self, src: int, tag: int, into: np.ndarray | None = None) -> Receive:
        """Posts the receive of the next message ``tag`` from process ``src`` (into ``into``, 1-D
        uint8 of the message's length; None: a new array of whatever length arrives)."""
        key = (src, tag)
        early = self.early.get(key)
        if early:
            got = early.popleft()
            if into is None:
                return got
            if got.complete:
                if len(got.into) != len(into):
                    raise ValueError(f"message {tag} from process {src} has {len(got.into)} bytes, "
                                     f"expected {len(into)}")
                into[:] = got.into
                got.into = into
                return got
            got.into = self._rebind(got, into)
            return got
        r = Receive(self, into)
        self.posted[key].append(r)
        return r

    @staticmethod
    def _rebind(got: Receive, into: np.ndarray) -> np.ndarray:
        """A receive posted while its message is arriving into a side buffer: what came so far is
        copied, and the rest arrives in ``into``."""
        if len(got.into) != len(into):
            raise ValueError(f"a message has {len(got.into)} bytes, expected {len(into)}")
        into[:] = got.into
        return into

    def flush(self) -> None:
        """Returns once every queued message has entered its ring."""
        self.wait_for(lambda: not any(self.queued.values()))

    def wait_for(self, done) -> None:
        """Moves bytes until ``done()`` holds, sleeping on this process's doorbell when nothing moves."""
        deadline = time.monotonic() + self.timeout_s
        bell = self.doorbells[self.me]
        while True:
            self.progress()
            if done():
                return
            if bell.acquire(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                while bell.acquire(False):   # and the rings queued up meanwhile: the next progress() reads it all
                    pass
            elif time.monotonic() > deadline:
                raise TimeoutError(f"process {self.me} waited {self.timeout_s:g} s for a message from another "
                                   "worker process (it stopped, or the nodes run different collectives)")

    def progress(self) -> None:
        """Writes what fits of every queued message and reads what has arrived; rings the doorbells
        of the processes whose rings this changed."""
        for dst, queue in self.queued.items():
            if queue and self._write(dst, queue):
                self.doorbells[dst].release()
        for src in self.into:
            if self._read(src):
                self.doorbells[src].release()

    def _write(self, dst: int, queue: deque[_Outgoing]) -> bool:
        ring = self.out[dst]
        written = int(ring.pos[0])
        moved = False
        while queue:
            room = ring.size - (written - int(ring.pos[1]))
            if room <= 0:
                break
            msg = queue[0]
            n = msg.write(ring, room, written)
            written += n
            moved = moved or n > 0
            if msg.done < msg.total:
                break
            queue.popleft()
        if moved:
            ring.pos[0] = written       # after the bytes: a reader that sees it sees them (x86 store order)
        return moved

    def _read(self, src: int) -> bool:
        ring = self.into[src]
        read = int(ring.pos[1])
        moved = False
        while True:
            avail = int(ring.pos[0]) - read
            cur = self.current[src]
            if cur is None:
                if avail < FRAME:
                    break
                frame = np.empty(FRAME, dtype=np.uint8)
                ring.get(frame, read)
                read += FRAME
                moved = True
                cur = self.current[src] = self._start(src, *_FRAME.unpack(frame))
                continue
            take = min(avail, cur.padded - cur.got)
            if take > 0:
                payload = min(take, max(0, cur.length - cur.got))
                if payload:
                    ring.get(cur.target.into[cur.got:cur.got + payload], read)
                read += take
                cur.got += take
                moved = True
            if cur.got < cur.padded:
                break
            cur.target.complete = True   # an empty message is whole once its frame is read
            self.current[src] = None
        if moved:
            ring.pos[1] = read
        return moved

    def _start(self, src: int, tag: int, length: int) -> _Incoming:
        """A message's frame has arrived: where its bytes go (a posted receive, or a side buffer)."""
        posted = self.posted.get((src, tag))
        if posted:
            target = posted.popleft()
            if target.into is None:
                target.into = np.empty(length, dtype=np.uint8)
            elif len(target.into) != length:
                raise ValueError(f"message {tag} from process {src} has {length} bytes, the receive expects "
                                 f"{len(target.into)}: the processes disagree on a collective")
        else:
            target = Receive(self, np.empty(length, dtype=np.uint8))
            self.early[(src, tag)].append(target)
        return _Incoming(tag, length, target)
