"""Shared-memory links between worker processes: every message arrives whole and in order, none deadlocks."""

import hashlib
import multiprocessing as mp

import numpy as np
import pytest

from pysim import links
from pysim.links import Links

pytestmark = pytest.mark.skipif(not links.available(), reason="lock-free rings need x86's store order")


def _exchange(me: int, spec, sizes: list[int], out: mp.Queue) -> None:
    """Sends messages of ``sizes`` bytes (tag = index, contents from a seed) to the other process
    while receiving its messages, half of them posted late; reports digests of what arrived."""
    ends = Links.attach(spec, me, timeout_s=60)
    other = 1 - me
    for i, n in enumerate(sizes):
        ends.send(other, i, np.random.default_rng([me, i]).integers(0, 256, n, dtype=np.uint8))
    early = [ends.receive(other, i, np.empty(n, dtype=np.uint8)) for i, n in enumerate(sizes) if i % 2 == 0]
    late = [ends.receive(other, i, np.empty(n, dtype=np.uint8)) for i, n in enumerate(sizes) if i % 2 == 1]
    got = [r.wait() for r in early + late]
    ends.flush()
    ends.close()
    out.put((me, [hashlib.sha256(g.tobytes()).hexdigest() for g in got], [len(g) for g in got]))


def test_messages_larger_than_the_ring_sent_both_ways_at_once_arrive_intact():
    ctx = mp.get_context("spawn")
    spec, segments = links.create(2, ctx)
    try:
        sizes = [0, 1, 7, 8, 100_000, spec.size + 12_345, 3 * spec.size, 64]   # some need several passes
        out = ctx.Queue()
        procs = [ctx.Process(target=_exchange, args=(me, spec, sizes, out)) for me in range(2)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(2):
            me, sums, lengths = out.get(timeout=120)
            results[me] = (sums, lengths)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        links.destroy(segments)
    order = [i for i in range(len(sizes)) if i % 2 == 0] + [i for i in range(len(sizes)) if i % 2 == 1]
    for me in range(2):
        sent_by_other = [hashlib.sha256(np.random.default_rng([1 - me, i]).integers(0, 256, sizes[i], dtype=np.uint8)
                                        .tobytes()).hexdigest() for i in order]
        assert results[me] == (sent_by_other, [sizes[i] for i in order])


def _parts(me: int, i: int, sizes: list[int]) -> list[np.ndarray]:
    return [np.random.default_rng([me, i, j]).integers(0, 256, n, dtype=np.uint8) for j, n in enumerate(sizes)]


def _exchange_parts(me: int, spec, messages: list[list[int]], out: mp.Queue) -> None:
    """Sends each message of ``messages`` (the sizes of its parts, bytes) as a list of parts to
    the other process while receiving its; reports which arrived exactly as the parts joined."""
    ends = Links.attach(spec, me, timeout_s=60)
    other = 1 - me
    for i, sizes in enumerate(messages):
        ends.send(other, i, _parts(me, i, sizes))
    got = [ends.receive(other, i, np.empty(sum(sizes), dtype=np.uint8)) for i, sizes in enumerate(messages)]
    exact = [bytes(r.wait()) == b"".join(p.tobytes() for p in _parts(other, i, messages[i]))
             for i, r in enumerate(got)]
    ends.flush()
    ends.close()
    out.put((me, exact))


def test_a_message_of_several_parts_arrives_as_their_bytes_back_to_back():
    ctx = mp.get_context("spawn")
    spec, segments = links.create(2, ctx)
    try:
        messages = [[3, 0, 5], [0], [], [spec.size - 3, 11, spec.size + 7], [1] * 9, [4096, 4096]]
        out = ctx.Queue()
        procs = [ctx.Process(target=_exchange_parts, args=(me, spec, messages, out)) for me in range(2)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in range(2))
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        links.destroy(segments)
    assert results == {0: [True] * len(messages), 1: [True] * len(messages)}


def _mismatched(me: int, spec, posted_first: bool, go, out: mp.Queue) -> None:
    """Process 0 sends a 200-byte message (tag 0), then an 8-byte one (tag 1); process 1 expects
    100 bytes for tag 0, its receive posted before the message arrives or after (tag 1 waited
    first: the message before it has arrived whole). Reports what process 1 was told."""
    ends = Links.attach(spec, me, timeout_s=30)
    if me == 0:
        go.wait(30)
        ends.send(1, 0, np.zeros(200, dtype=np.uint8))
        ends.send(1, 1, np.zeros(8, dtype=np.uint8))
        ends.flush()
        return
    try:
        if posted_first:
            r = ends.receive(0, 0, np.empty(100, dtype=np.uint8))
            go.set()
            r.wait()
        else:
            go.set()
            ends.receive(0, 1, np.empty(8, dtype=np.uint8)).wait()
            ends.receive(0, 0, np.empty(100, dtype=np.uint8))
        out.put("accepted")
    except ValueError as e:
        out.put(str(e))


@pytest.mark.parametrize("posted_first", [True, False])
def test_a_message_of_another_length_than_its_receive_is_refused(posted_first):
    ctx = mp.get_context("spawn")
    spec, segments = links.create(2, ctx)
    try:
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_mismatched, args=(me, spec, posted_first, go, out)) for me in range(2)]
        for p in procs:
            p.start()
        told = out.get(timeout=120)
        for p in procs:
            p.join(30)
    finally:
        links.destroy(segments)
    assert "message 0 from process 0 has 200 bytes" in told and "100" in told, told


def test_ring_size_shrinks_with_many_processes_but_not_below_a_mebibyte():
    assert links.ring_bytes(2) == 16 << 20
    assert links.ring_bytes(64) == 1 << 20
    assert links.ring_bytes(8) % 8 == 0 and (1 << 20) <= links.ring_bytes(8) <= 16 << 20
