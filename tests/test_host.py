"""A process's simulated nodes (pysim/host.py): turns, meetings, per-node random streams, and
failures that end in one NodeFailed instead of a hang."""

import random
import threading

import numpy as np
import pytest
import torch

from pysim.host import Host, NodeFailed, current_host, current_node
from pysim.placement import Placement
from pysim.transport import Transport


def host(n: int) -> Host:
    placement = Placement(n, 1)
    return Host(placement.hosted(0), n, Transport(placement, 0))


def finished_within(seconds: float, fn, *args):
    """``fn(*args)``'s result or exception, or a test failure if it has not returned in
    ``seconds`` (a host that hangs fails the test instead of the suite)."""
    outcome = []

    def call() -> None:
        try:
            outcome.append(("returned", fn(*args)))
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            outcome.append(("raised", e))

    runner = threading.Thread(target=call, daemon=True)
    runner.start()
    runner.join(timeout=seconds)
    assert not runner.is_alive(), f"still running after {seconds} s: the host hung"
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


def _sum_of_all(node: int, world: int) -> float:
    return current_host().meet("sum", node * 10, lambda req: dict.fromkeys(req, sum(req.values())))


def test_every_node_runs_and_meets_the_others():
    assert host(4).run(_sum_of_all) == dict.fromkeys(range(4), 60)


def _draws(node: int, world: int) -> tuple:
    first = (torch.rand(3), random.random(), np.random.rand())
    current_host_meet(node)
    return first + (torch.rand(1), random.random(), np.random.rand())


def current_host_meet(node: int) -> None:
    current_host().meet("turn", None, lambda req: dict.fromkeys(req))


def test_each_node_draws_what_a_fresh_process_would_across_turns():
    out = host(3).run(_draws)
    for node in (1, 2):   # the same streams, whatever ran in between
        a, b = out[0], out[node]
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
        assert a[1:3] == b[1:3] and a[4:] == b[4:]


def _fails_on_two(node: int, world: int) -> int:
    current_host_meet(node)
    if node == 2:
        raise ValueError("bad batch")
    current_host_meet(node)
    return node


def test_a_node_that_raises_stops_the_process_with_its_name():
    with pytest.raises(NodeFailed, match="node 2: ValueError: bad batch"):
        finished_within(20, host(4).run, _fails_on_two)


def _skips(node: int, world: int) -> None:
    if node != 1:
        current_host_meet(node)


def test_nodes_that_wait_for_each_other_forever_are_named():
    with pytest.raises(NodeFailed, match="wait for each other forever"):
        finished_within(20, host(3).run, _skips)


def _meets_another_kind(node: int, world: int) -> None:
    current_host().meet("allreduce" if node != 1 else "broadcast", None, lambda req: dict.fromkeys(req))


def test_nodes_that_run_different_collectives_are_told_to_run_the_same_in_the_same_order():
    with pytest.raises(NodeFailed, match="node 1: RuntimeError: node 1 runs a broadcast where another node runs a "
                                         "allreduce: every node must run the same collectives in the same order"):
        finished_within(20, host(3).run, _meets_another_kind)


def _whoami(node: int, world: int) -> int:
    return current_node()


def test_a_failure_before_a_node_s_first_line_is_reported_not_hung(monkeypatch):
    def broken(state):
        raise RuntimeError("cannot restore the random state")

    monkeypatch.setattr(Host, "_load_rng", staticmethod(broken))
    with pytest.raises(NodeFailed, match="cannot restore"):
        finished_within(20, host(2).run, _whoami)
