"""Worker processes that host the simulated nodes, torch.distributed (gloo) on loopback between them.

:func:`run_nodes` runs ``fn(node, world, *args)`` for ``n`` simulated nodes
spread over worker processes (:mod:`pysim.placement`: contiguous blocks; by
default one process per node, as torchrun runs them; ``processes=P`` puts
several nodes in each process, where a :class:`pysim.host.Host` runs them as
threads taking turns) and returns their results in node order. Everything a
local run opens listens on 127.0.0.1 only: the coordination store (a TCPStore
the parent serves on a socket it bound to loopback) and gloo's connections
(``GLOO_SOCKET_IFNAME`` = the loopback interface).

Failures stop the run with a :class:`NodeError` that names the right node:

- a node that raises: its exception and traceback;
- a process that dies without a report (killed by a signal, ``os._exit``, a
  crash in native code): named with its signal or exit code, as its first
  node. The other processes then fail too ("connection closed" in gloo);
  their reports are not trusted while another process died: after the first
  report the parent waits ``BLAME_GRACE_S`` (``PEER_GONE_GRACE_S`` if every
  report is a lost peer) for a silent death, and prefers an error that is not
  a lost peer;
- a process that stops (SIGSTOP) or hangs with its interpreter stuck: every
  process sends a heartbeat several times per ``heartbeat_s``; one silent for
  ``heartbeat_s`` seconds is named.

Ctrl-C in the parent stops every process and raises :class:`RunInterrupted`
(a KeyboardInterrupt) whose message is one line. No process is left behind in
any case: the parent stops them (SIGTERM, then SIGKILL) before it returns or
raises, and each asks the kernel to end it if the parent dies.

Under ``torchrun`` (RANK and WORLD_SIZE set) the current process is a worker:
rank r of W hosts its block of the ``n`` nodes (W ranks x n/W nodes), and
results travel to rank 0 as JSON (never pickle), so there ``fn`` must return
JSON-able data (dicts, lists, str, numbers, bool, None; tuples arrive as
lists). Rank 0 gets the list of results, the other ranks get None. Across
hosts, gloo must listen on the interface that reaches the master: a host whose
name resolves to loopback is told in one line which ``GLOO_SOCKET_IFNAME`` to set.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import multiprocessing as mp
import os
import pickle
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pysim import links

BLAME_GRACE_S = 0.5   # after a node's error report, how long to wait for a node that died silently
PEER_GONE_GRACE_S = 2.0  # the same, when every report so far is a lost peer (someone else is the cause)
POLL_S = 0.05         # the parent's polling interval
STOP_GRACE_S = 2.0    # SIGTERM, then SIGKILL after this long
START_LIMIT_S = 60.0  # a node's first heartbeat must come this soon after its process starts

# errors a node raises because another node went away: never blamed while another explanation exists
_PEER_GONE = re.compile(r"connection (closed|reset|refused)|broken pipe|peer|read error|write error|"
                        r"socket closed|ECONNRESET|EPIPE|recv|timed out|timeout", re.IGNORECASE)


class NodeError(RuntimeError):
    """A node failed; ``rank`` (the node) and ``node_traceback`` say where and why."""

    def __init__(self, rank: int, message: str, node_traceback: str = "") -> None:
        super().__init__(f"node {rank} failed: {message}" + (f"\n--- node {rank} traceback ---\n{node_traceback}"
                                                            if node_traceback else ""))
        self.rank = rank
        self.node_traceback = node_traceback


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_nodes`: every node was stopped; the message is one line to print."""

    def __init__(self, stopped: int) -> None:
        super().__init__(f"interrupted; stopped {stopped} node process{'es' if stopped != 1 else ''}")
        self.stopped = stopped


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str:
    """Name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    for _, name in socket.if_nameindex():
        try:
            if int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return name
        except (OSError, ValueError):
            continue
    return "lo0" if sys.platform == "darwin" else "lo"


UNGUARDED_MAIN_EXIT = 87  # a node process found the user's script starting runs at import time


def describe_exit(exitcode: int | None) -> str:
    """Words for a process's exit: "killed by signal 9 (SIGKILL)", "exited with code 7"."""
    if exitcode is None:
        return "still running"
    if exitcode == UNGUARDED_MAIN_EXIT:
        return ("stopped: your script starts pysim runs when it is imported, and node processes import it; "
                "put that code under `if __name__ == \"__main__\":`")
    if exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


NODE_PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "pysim.node", "pysim.shipped_data")


def _describe_process(placement, p: int, pid: int | None) -> str:
    hosted = placement.hosted(p)
    if len(hosted) == 1:
        return f"process {pid}"
    return f"process {pid} (worker {p} of {placement.processes}, nodes {hosted.start}-{hosted.stop - 1})"


def node_context() -> mp.context.BaseContext:
    """How node processes start: forked from multiprocessing's fork server, which imports torch
    and pysim (:data:`NODE_PRELOAD`) and decodes the shipped MNIST (:mod:`pysim.shipped_data`)
    once, so a node is ready in milliseconds instead of the 3-4 s those imports take in every
    process of every run. Otherwise a node starts as a
    spawned process does: fresh from the server (no state of the parent is inherited; the
    user's script is imported as ``__mp_main__``), with the parent's environment as of the
    start (:func:`_worker_main` applies it). Falls back to spawn where there is no fork server."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(NODE_PRELOAD))
    return ctx


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class _Reporter:
    """A node's side of its pipe to the parent; the heartbeat thread and the node share it."""

    def __init__(self, conn: Connection) -> None:
        self._conn, self._lock = conn, threading.Lock()

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message)
        with self._lock:
            self._conn.send_bytes(data)

    def beat_forever(self, period_s: float) -> None:
        try:
            while True:
                self.send(("alive", os.getpid()))
                time.sleep(period_s)
        except OSError:
            # the parent is gone (its end of the pipe closed): end this node now. PR_SET_PDEATHSIG
            # cannot do it for a node forked from the fork server, whose parent is the server
            os._exit(1)


def _unreadable_main() -> str | None:
    """Where the main program came from when node processes could not read it again (standard
    input: ``python3 - < script.py``), else None. multiprocessing re-runs the main script in
    every process it starts from the path in ``__main__.__file__``; such a path names no file,
    so the start hides it (the nodes' code comes from importable modules anyway)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path):
        return None
    return "standard input" if path == "<stdin>" else repr(path)


def _worker_main(process: int, placement, store_port: int, timeout_s: float, heartbeat_s: float, job: tuple,
                 conn: Connection, environ: dict[str, str], links=None, pin_cpus: bool = False) -> None:
    """A worker process: hosts its block of nodes. The heartbeat starts first: ``fn``'s module is imported only
    after it (``job`` holds the pickled (fn, args)), so a process stopped while it starts is found too.
    ``environ``: the parent's environment when it started the process (a process forked from the fork server
    would otherwise have the server's). ``links``: the shared-memory rings pysim's messages take between the
    workers (:mod:`pysim.links`), or None for gloo. torch.distributed's default group (gloo, rank = process) is
    initialised either way, for code of the user's own (a node per process). ``pin_cpus``: :func:`pin_to_cpu`."""
    # Ctrl-C reaches the whole process group; only the parent acts on it (the parent also starts
    # workers with SIGINT blocked; a fork server's children inherit the server's mask instead)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    _die_with_parent()
    os.environ.clear()
    os.environ.update(environ)
    reporter = _Reporter(conn)
    threading.Thread(target=reporter.beat_forever, args=(min(1.0, heartbeat_s / 4),), daemon=True,
                     name="pysim-heartbeat").start()
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()  # gloo's own sockets on loopback too
    # spawn's bootstrap made "spawn" this process's default start method, so every lock the node
    # creates (tqdm makes one) would be a named semaphore tracked by the parent's resource tracker,
    # and a node stopped by a signal would leave a "leaked semaphore" warning behind. The node's own
    # multiprocessing uses the platform default instead, as in any program.
    mp.set_start_method(None, force=True)
    first = placement.first(process)
    _one_malloc_arena()
    if pin_cpus:
        pin_to_cpu(process, placement.processes)
    try:
        import torch
        import torch.distributed as dist

        from pysim import _C, plugins
        from pysim.host import Host, NodeFailed
        from pysim.links import Links
        from pysim.transport import Transport

        modules, payload = job
        plugins.import_all(modules)   # the user's --import modules, before their classes are unpickled
        fn, args = pickle.loads(payload)
        torch.set_num_threads(1)
        _C.set_num_threads(1)
        ends = Links.attach(links, process, timeout_s) if links is not None else None
        if placement.processes > 1:   # pysim's messages take the links; a node's own code may use the group
            store = dist.TCPStore("127.0.0.1", store_port, placement.processes, False, timedelta(seconds=timeout_s))
            dist.init_process_group("gloo", store=store, rank=process, world_size=placement.processes,
                                    timeout=timedelta(seconds=timeout_s))
        try:
            out = Host(placement.hosted(process), placement.nodes, Transport(placement, process, ends)).run(fn, args)
            # plain pickle to our parent (tensors by value, not handles that die with this process), before
            # the group is taken down (15-20 ms): the parent stops every worker once all have reported
            reporter.send(("ok", out))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            if ends is not None:
                ends.close()
    except NodeFailed as e:
        _report_error(reporter, e.node, e.message, e.node_traceback)
    except BaseException as e:  # report everything, then exit non-zero
        _report_error(reporter, first, f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())


def pin_to_cpu(process: int, processes: int) -> int | None:
    """Keeps the calling thread, and the threads it starts from now on (a worker's nodes), on one
    CPU of those this process may use: worker ``process``'s, when there are exactly as many
    workers as CPUs (the default layout); otherwise, or where the platform has no CPU affinity,
    leaves the scheduler free. Returns the CPU, or None.

    A worker's nodes take turns, one running at a time; unpinned, the node woken next is often
    placed on the CPU the other worker runs on and waits there while its own CPU idles, and it
    finds another core's caches (64 MNIST-CNN nodes on 2 cores: workers busy 88-93% of the
    run's wall time unpinned, 96-99% pinned; the run about 5% shorter, median of 6 pairs)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) != processes:
        return None
    try:
        os.sched_setaffinity(0, {cpus[process]})
    except OSError:   # not permitted here (a restricted container): the scheduler stays free
        return None
    return cpus[process]


def _one_malloc_arena() -> None:
    """One malloc arena for the process's threads (glibc): its node threads run one at a time, so
    they never contend for it, and one arena per thread would each keep the peak of what its node
    allocated (a GPT node's activations), many times over."""
    if os.environ.get("PYSIM_MALLOC_ARENAS") == "default":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _report_error(reporter: _Reporter, node: int, message: str, node_traceback: str) -> None:
    try:
        reporter.send(("error", node, message, node_traceback))
    except OSError:  # the parent is gone
        pass
    sys.exit(1)


def _read_reports(process: int, first: int, conn: Connection, events: queue.Queue) -> None:
    """Parent side: forwards one worker process's messages to ``events``; ("eof",) once its pipe
    closes. ``first``: its first node, named when its report cannot be read."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            events.put((process, ("eof",)))
            return
        try:
            events.put((process, pickle.loads(data)))
        except Exception as e:  # e.g. the result's class cannot be imported here
            events.put((process, ("error", first, f"the parent cannot read node {first}'s report: "
                                                  f"{type(e).__name__}: {e}", traceback.format_exc())))


def _loopback_store(world: int, timeout_s: float) -> Any:
    """A TCPStore server listening on 127.0.0.1 only (TCPStore's own bind would take every interface)."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(max(128, 2 * world))
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the store owns and closes the listening socket
    return dist.TCPStore("127.0.0.1", port, world, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                         master_listen_fd=fd)


def run_nodes(fn: Callable[..., Any], n: int, args: tuple = (), timeout_s: float = 120.0,
              heartbeat_s: float = 10.0, processes: int | None = None, pin_cpus: bool = True) -> list[Any] | None:
    """Runs ``fn(node, n, *args)`` for ``n`` nodes and returns the results by node.

    ``fn`` must be importable (a module-level function). ``processes``: the worker processes
    the nodes are spread over (default ``n``: one process per node); results do not depend on
    it. ``timeout_s`` (seconds) bounds any single collective (gloo) and joining the group.
    ``heartbeat_s`` (seconds) is how long a process may go without a heartbeat before it is
    declared stopped or hung; a process still starting (importing) gets ``START_LIMIT_S``
    unless /proc shows it stopped. ``pin_cpus``: one CPU per worker where there are as many
    workers as CPUs (:func:`pin_to_cpu`; no result depends on it). Raises :class:`NodeError` naming the failed node,
    :class:`RunInterrupted` on Ctrl-C. Under torchrun see the module docstring: rank 0 gets
    the list, the other ranks None.
    """
    from pysim.placement import Placement

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be an integer >= 1, got {n!r}")
    for name, v in (("timeout_s", timeout_s), ("heartbeat_s", heartbeat_s)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
    if getattr(mp.current_process(), "_inheriting", False):
        # a spawned node process is importing the user's script, which calls us at import time
        sys.stderr.write("pysim: a node process imported a script that starts runs at import time; guard its "
                         "entry point with `if __name__ == \"__main__\":`\n")
        sys.stderr.flush()
        os._exit(UNGUARDED_MAIN_EXIT)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(fn, n, args, timeout_s)
    source = _unreadable_main() if getattr(fn, "__module__", None) == "__main__" else None
    if source is not None:
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} is defined in a program read from "
                         f"{source}, which node processes cannot import: save it to a file and run that")
    return _LocalRun(fn, Placement(n, n if processes is None else processes), args, timeout_s, heartbeat_s,
                     pin_cpus).run()


class _LocalRun:
    """One run of local worker processes, watched by the parent (see the module docstring)."""

    def __init__(self, fn: Callable, placement, args: tuple, timeout_s: float, heartbeat_s: float,
                 pin_cpus: bool = True) -> None:
        from pysim import plugins

        self.placement, self.pin_cpus = placement, pin_cpus
        self.p = placement.processes
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.ctx = node_context()
        # by value: no shared-memory handles that die with the parent; with the modules to import first
        self.job = (plugins.loaded(), pickle.dumps((fn, args)))
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.events: queue.Queue = queue.Queue()
        self.results: dict[int, Any] = {}              # process -> {node: result}
        self.errors: dict[int, tuple[int, str, str]] = {}   # process -> (node, message, traceback), by arrival
        self.closed: set[int] = set()                 # processes whose pipe closed (every report read)
        self.last_beat: dict[int, float] = {}

    def run(self) -> list[Any]:
        # the store's server threads start with SIGINT blocked, as the report readers do: Ctrl-C is
        # then delivered to the main thread, the one that acts on it
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            store = _loopback_store(self.p, self.timeout_s)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        spec, segments = self._links()
        try:
            self._start(store.port, spec)
            by_process = self._watch()
        except KeyboardInterrupt:
            stopped = self._stop()
            raise RunInterrupted(stopped) from None
        finally:
            self._stop()
            del store
            links.destroy(segments)
        merged = {node: r for results in by_process for node, r in results.items()}
        return [merged[node] for node in range(self.placement.nodes)]

    def _links(self) -> tuple[links.LinkSpec | None, list]:
        """Shared-memory rings between the workers, where the machine allows them (else gloo)."""
        if self.p == 1 or not links.available() or os.environ.get("PYSIM_TRANSPORT") == "gloo":
            return None, []
        try:
            return links.create(self.p, self.ctx)
        except OSError:   # no /dev/shm, or too small: the workers talk over gloo instead
            return None, []

    def _start(self, port: int, spec: links.LinkSpec | None) -> None:
        # workers start with SIGINT blocked (the mask is inherited): Ctrl-C reaches the
        # whole process group, and only the parent should act on it
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        main = sys.modules.get("__main__")
        hidden = main.__dict__.pop("__file__") if _unreadable_main() is not None else None
        try:
            for p in range(self.p):
                reader, writer = self.ctx.Pipe(duplex=False)
                proc = self.ctx.Process(target=_worker_main, name=f"pysim-worker-{p}", daemon=True,
                                        args=(p, self.placement, port, self.timeout_s, self.heartbeat_s, self.job,
                                              writer, dict(os.environ), spec, self.pin_cpus))
                self.procs.append(proc)
                self.conns.append(reader)
                proc.start()
                writer.close()  # the worker holds the only write end: its death closes the pipe
                threading.Thread(target=_read_reports, args=(p, self.placement.first(p), reader, self.events),
                                 daemon=True, name=f"pysim-reports-{p}").start()
        finally:
            if hidden is not None:
                main.__file__ = hidden
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _describe(self, p: int) -> str:
        return _describe_process(self.placement, p, self.procs[p].pid)

    def _watch(self) -> list[dict[int, Any]]:
        started = last_poll = time.monotonic()
        awake_since = started        # heartbeats missed while the parent itself was suspended do not count
        first_error_at: float | None = None
        while len(self.results) < self.p:
            try:
                p, msg = self.events.get(timeout=POLL_S)
                self._record(p, msg)
            except queue.Empty:
                pass
            now = time.monotonic()
            if now - last_poll > max(1.0, self.heartbeat_s / 2):
                awake_since = now
            last_poll = now
            # a process is silent-dead once its pipe is drained and closed with no report, or at once if
            # a signal ended it (a process that reports an error exits with code 1, never by a signal)
            silent = [p for p in range(self.p) if p not in self.results and p not in self.errors
                      and (p in self.closed or (self.procs[p].exitcode or 0) < 0)]
            if silent:
                p = silent[0]
                proc = self.procs[p]
                proc.join(1.0)
                node = self.placement.first(p)
                if proc.exitcode == UNGUARDED_MAIN_EXIT:
                    raise NodeError(node, describe_exit(proc.exitcode)) from None
                raise NodeError(node, f"{self._describe(p)} {describe_exit(proc.exitcode)} without a report "
                                      "(killed, out of memory, or crashed in native code)") from None
            if self.errors:
                first_error_at = first_error_at or now
                real = [p for p, (_, m, _) in self.errors.items() if not _PEER_GONE.search(m)]
                if now - first_error_at >= (BLAME_GRACE_S if real else PEER_GONE_GRACE_S):
                    node, message, tb = self.errors[(real or list(self.errors))[0]]
                    raise NodeError(node, message, tb) from None
                continue
            for p in range(self.p):
                if p in self.results:
                    continue
                if p not in self.last_beat:  # still importing: slow under load, so only a stopped one is named early
                    waited = now - max(started, awake_since)
                    state = _process_state(self.procs[p].pid) if waited > self.heartbeat_s else ""
                    if state.startswith("stopped") or waited > START_LIMIT_S:
                        raise NodeError(self.placement.first(p), f"no heartbeat within {waited:.1f} s of starting: "
                                        f"{self._describe(p)} is {state}") from None
                elif now - max(self.last_beat[p], awake_since) > self.heartbeat_s:
                    silent_s = now - self.last_beat[p]
                    raise NodeError(self.placement.first(p), f"no heartbeat for {silent_s:.1f} s: {self._describe(p)} "
                                    f"is {_process_state(self.procs[p].pid)} "
                                    f"(heartbeat_s={self.heartbeat_s:g})") from None
        return [self.results[p] for p in range(self.p)]

    def _record(self, p: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "alive":
            self.last_beat[p] = time.monotonic()
        elif kind == "ok":
            self.results[p] = msg[1]
        elif kind == "error":
            self.errors[p] = (msg[1], msg[2], msg[3])
        elif kind == "eof":
            self.closed.add(p)

    def _stop(self) -> int:
        """Stops every process still running (SIGTERM, SIGCONT for a stopped one, then SIGKILL); how many."""
        running = [p for p in self.procs if p.pid is not None and p.exitcode is None]
        for p in running:
            try:
                p.terminate()
                os.kill(p.pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for p in running:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        for p in self.procs:
            if p.pid is not None:
                p.join()
        for c in self.conns:
            c.close()
        return len(running)


def _process_state(pid: int | None) -> str:
    """"stopped (SIGSTOP)" or "hung" from /proc/PID/stat (Linux); "hung" where it cannot be read."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "hung"
    return "stopped (SIGSTOP or Ctrl-Z)" if state in ("T", "t") else "hung (alive but silent)"


def _run_under_torchrun(fn: Callable, n: int, args: tuple, timeout_s: float) -> list[Any] | None:
    import torch
    import torch.distributed as dist

    from pysim import _C
    from pysim.host import Host, NodeFailed
    from pysim.placement import Placement
    from pysim.transport import Transport

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if n < world:
        raise ValueError(f"{n} nodes cannot fill {world} torchrun ranks: each rank hosts at least one node; "
                         f"use at least {world} nodes or fewer ranks")
    check_gloo_interface()
    threads = torch.get_num_threads(), _C.get_num_threads()
    torch.set_num_threads(1)  # as spawned nodes: one thread, so thread CPU time is the node's whole compute
    _C.set_num_threads(1)
    if not dist.is_initialized():
        # one process group for every run of this process: a second init_process_group after a
        # destroy hangs in torchrun's rendezvous store; it is destroyed at exit (a group left
        # alive at exit aborts in gloo's threads)
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        atexit.register(_destroy_process_group)
    placement = Placement(n, world)
    try:
        try:
            transport = Transport(placement, rank)
            mine = Host(placement.hosted(rank), n, transport).run(fn, args)
        except NodeFailed as e:
            raise NodeError(e.node, e.message, e.node_traceback) from None
        transport.flush()
        gathered = gather_json({str(node): r for node, r in mine.items()}, rank, world)
        dist.barrier()
        if gathered is None:
            return None
        merged = {int(node): r for part in gathered for node, r in part.items()}
        return [merged[node] for node in range(n)]
    finally:
        torch.set_num_threads(threads[0])
        _C.set_num_threads(threads[1])


def check_gloo_interface() -> None:
    """Under torchrun across hosts: gloo listens on the address this host's name resolves to,
    unless ``GLOO_SOCKET_IFNAME`` names an interface. Where the name resolves to loopback (as
    /etc/hosts often has it) while the master is another host, no other host could connect
    ("connectFullMesh ... Connection refused" on every rank): one-line ValueError naming the
    interface to set instead."""
    master = os.environ.get("MASTER_ADDR", "")
    if os.environ.get("GLOO_SOCKET_IFNAME") or not master:
        return
    try:
        own = socket.gethostbyname(socket.gethostname())
        master_ip = socket.gethostbyname(master)
    except OSError:
        return
    if not own.startswith("127.") or master_ip.startswith("127.") or master_ip == "::1":
        return
    ifname = interface_towards(master_ip)
    hint = f"GLOO_SOCKET_IFNAME={ifname}" if ifname else "GLOO_SOCKET_IFNAME to the interface that reaches it"
    raise ValueError(f"torchrun across hosts: this host's name {socket.gethostname()!r} resolves to {own}, so gloo "
                     f"would listen on loopback and ranks on other hosts could not connect to it; set {hint} "
                     f"(the master is {master}) on every host")


def interface_towards(address: str) -> str | None:
    """The name of the local interface whose address the kernel routes ``address`` from, if found."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))   # no packet is sent: this only picks the route
            local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    except OSError:
        return None
    return None


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        import gc
        gc.collect()   # finished point-to-point Work objects go before the group they belong to
        dist.destroy_process_group()


def gather_json(value: Any, rank: int, world: int) -> list[Any] | None:
    """Every rank's ``value`` on rank 0, as JSON bytes in uint8 tensors (no pickle crosses the wire).

    Rank 0 gets the list by rank; the others get None. ``value`` must be JSON-able.
    """
    import torch
    import torch.distributed as dist

    try:
        data = json.dumps(value, allow_nan=True).encode()
    except TypeError as e:
        raise ValueError(f"under torchrun a node's result travels as JSON, and node {rank}'s is not JSON-able "
                         f"({e}); return dicts, lists, str, numbers, bool or None") from None
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    received = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)] if rank == 0 else None
    dist.gather(mine, received, dst=0)
    if rank != 0:
        return None
    return [json.loads(t[:int(s.item())].numpy().tobytes()) for t, s in zip(received, sizes, strict=True)]
