"""A worker process's simulated nodes: threads that take turns, one running at a time.

A simulated node is a unit of state (model, optimizer, strategy buffers,
sampler, random number generators, clock), not an OS process. A :class:`Host`
runs the nodes placed on its process (:mod:`pysim.placement`), each in a thread
of its own with its own call stack, so a node's training loop and its
strategy's code read as they would on a machine of their own. Exactly one node
runs at a time: a node runs until it must wait for others (a collective, an
evaluation, a barrier: a *meeting*), then passes the turn to the next node that
can run, in node order. Nothing a node computes depends on that order, since
nodes share nothing but meetings; it only sets which one uses the CPU when.

Each node has its own random number generators: torch's, Python's ``random``
and NumPy's global ones are saved when a node passes the turn and restored
when it gets it back, so a node draws the same numbers as it would alone in a
process (each node starts from the same fixed state, as a fresh process would;
:mod:`pysim.global_rng` keeps that cheap).

Meetings (:meth:`Host.meet`). Every local node calls ``meet`` in the same
order (the code is the same on every node, SPMD); the last node to arrive runs
the meeting's ``execute`` once, for all of them (moving packets between its
nodes in memory and with other processes over the transport), and every node
gets its own part of the outcome. A node that raises stops the whole process:
every other node is woken and ends, and :meth:`Host.run` raises
:class:`NodeFailed` naming the node. Nodes that wait for each other in a way
that can never end (a node skipped a collective the others run) are named too.
"""

from __future__ import annotations

import random
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pysim.global_rng import GlobalRNG, RNGState, seed_torch
from pysim.transport import Transport

_local = threading.local()   # .host, .node: the Host and node of the current node thread


def current_host() -> Host | None:
    """The Host whose node thread this is, if any."""
    return getattr(_local, "host", None)


def current_node() -> int | None:
    """The node this thread runs, if it is a node thread."""
    return getattr(_local, "node", None)


class NodeFailed(Exception):
    """A node of this process raised; ``node`` is which, ``message`` its one line, ``node_traceback`` its trace."""

    def __init__(self, node: int, message: str, node_traceback: str) -> None:
        super().__init__(f"node {node}: {message}")
        self.node, self.message, self.node_traceback = node, message, node_traceback


class _Stopped(BaseException):
    """Raised in a node thread woken because another node of the process failed."""


class _Meeting:
    """One meeting of the local nodes: their requests, then (once executed) their outcomes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.requests: dict[int, Any] = {}
        self.outcomes: dict[int, Any] | None = None


_FRESH_RNG: RNGState | None = None   # the generators' state of a fresh process, which every node starts from


def _fresh_rng() -> RNGState:
    global _FRESH_RNG
    if _FRESH_RNG is None:
        generators = GlobalRNG()
        saved = generators.save()
        seed_torch(torch.initial_seed())
        random.seed(0)
        np.random.seed(0)
        _FRESH_RNG = generators.save()
        generators.load(saved)
    return _FRESH_RNG


class Host:
    """The nodes ``nodes`` (of ``world``) of one process, over ``transport`` (see the module docstring)."""

    def __init__(self, nodes: Sequence[int], world: int, transport: Transport) -> None:
        self.nodes = list(nodes)
        if not self.nodes:
            raise ValueError("a host needs at least one node")
        self.world = world
        self.transport = transport
        self._turn = {n: threading.Lock() for n in self.nodes}
        for lock in self._turn.values():
            lock.acquire()                       # a node runs only once its lock is released to it
        self._blocked: dict[int, Callable[[], bool]] = {}
        self._done: set[int] = set()
        self._rng: dict[int, RNGState] = {}
        self._generators = GlobalRNG()
        self._joined: dict[int, int] = {n: 0 for n in self.nodes}    # meetings each node has joined
        self._meetings: dict[int, _Meeting] = {}
        self._failure: NodeFailed | None = None
        self._shared: dict[Any, Any] = {}
        self.results: dict[int, Any] = {}

    # ------------------------------------------------------------ running

    def run(self, fn: Callable[..., Any], args: tuple = ()) -> dict[int, Any]:
        """Runs ``fn(node, world, *args)`` for every local node; returns their results by node.
        Raises :class:`NodeFailed` for the first node that raised."""
        threads = [threading.Thread(target=self._node_main, args=(n, fn, args), name=f"pysim-node-{n}", daemon=True)
                   for n in self.nodes]
        for t in threads:
            t.start()
        self._turn[self.nodes[0]].release()
        for t in threads:
            t.join()
        if self._failure is not None:
            raise self._failure
        return self.results

    def _node_main(self, node: int, fn: Callable[..., Any], args: tuple) -> None:
        self._turn[node].acquire()
        if self._failure is not None:
            self._finish(node)
            return
        _local.host, _local.node = self, node
        try:
            self._load_rng(_fresh_rng())
            self.results[node] = fn(node, self.world, *args)
        except _Stopped:
            pass
        except BaseException as e:   # report it, and stop the other nodes
            if self._failure is None:
                self._failure = NodeFailed(node, f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())
        finally:
            self._finish(node)

    def _finish(self, node: int) -> None:
        self._done.add(node)
        if self._failure is not None:
            for n in self.nodes:   # wake every node still waiting, so that it ends
                if n not in self._done and self._turn[n].locked():
                    self._turn[n].release()
            return
        self._pass_turn(node)

    def park(self, until: Callable[[], bool]) -> None:
        """Called by the running node: passes the turn on and returns once ``until()`` holds and the
        turn is back. Raises in the node if another node failed meanwhile."""
        node = _local.node
        if until():
            return
        self._rng[node] = self._generators.save()
        self._blocked[node] = until
        self._pass_turn(node)
        self._turn[node].acquire()
        if self._failure is not None:
            raise _Stopped
        self._load_rng(self._rng.pop(node))

    def _pass_turn(self, node: int) -> None:
        """Gives the turn to the next node, in node order after ``node``, that can run."""
        i = self.nodes.index(node)
        for n in self.nodes[i + 1:] + self.nodes[:i + 1]:
            if n in self._done:
                continue
            until = self._blocked.get(n)
            if until is None or until():
                self._blocked.pop(n, None)
                self._turn[n].release()
                return
        if len(self._done) < len(self.nodes):   # every node left waits for another: it can never end
            waiting = {n: self._meetings.get(self._joined[n] - 1) for n in self.nodes if n not in self._done}
            what = "; ".join(f"node {n} at {m.kind if m else 'a meeting'}" for n, m in waiting.items())
            self._failure = NodeFailed(node, f"the nodes wait for each other forever ({what}): a node did not "
                                             "take part in a collective the others ran", "")
            for n in waiting:
                self._turn[n].release()

    def _load_rng(self, state: RNGState) -> None:
        self._generators.load(state)

    # ------------------------------------------------------------ meetings

    def meet(self, kind: str, request: Any, execute: Callable[[dict[int, Any]], dict[int, Any]]) -> Any:
        """The running node's part in the next meeting of every local node (see the module
        docstring): ``request`` in, this node's outcome out. ``execute`` (the last arrival's)
        maps every local node's request to every local node's outcome."""
        node = _local.node
        seq = self._joined[node]
        self._joined[node] = seq + 1
        meeting = self._meetings.setdefault(seq, _Meeting(kind))
        if meeting.kind != kind:
            raise RuntimeError(f"node {node} runs a {kind} where another node runs a {meeting.kind}: every node "
                               "must run the same collectives in the same order")
        meeting.requests[node] = request
        if len(meeting.requests) == len(self.nodes):
            meeting.outcomes = execute(meeting.requests)
        else:
            self.park(lambda: meeting.outcomes is not None)
        outcome = meeting.outcomes[node]
        del meeting.requests[node]
        if not meeting.requests:
            del self._meetings[seq]
        return outcome

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value every local node shares (a data set, a count made once): ``make()`` the first time."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]


def solo_host(node: int, world: int) -> Host:
    """A Host for code that runs one node per process outside :func:`pysim.launch.run_nodes` (a
    process group of ``world`` processes already initialised, or ``world`` 1): this thread is node
    ``node``'s."""
    from pysim.placement import Placement

    host = Host([node], world, Transport(Placement(world, world), node))
    _local.host, _local.node = host, node
    return host
