"""Calibration: fit a link's latency, bandwidth and framing to real gloo all-reduces.

Two processes, one at each end of the link (``python -m pysim calibrate
--rank R --master ADDR:PORT``, rank 0's address first), time
``torch.distributed.all_reduce`` (gloo) of float32 tensors of several sizes S
(the slower rank's time; per size the fastest repetition, or ``--stat
median``, of at least 9, repeated until 10 s have passed, the sizes
interleaved). The model is pysim's 2-member ring all-reduce: two phases, each
a message of c = S/2 bytes in each direction at once,

    T(S) = 2 * (alpha + 8 * (wire(S/2) + acks(S/2)) / beta)

(wire, acks: :class:`pysim.network.Framing`; both directions are busy at once, so each
carries its data and the ACKs of the other's)

which is linear in alpha and 1/beta. Least squares over the sizes fits

- alpha and beta with the framing fixed (default ``tcp``: 66 bytes per
  1448-byte segment, what a Linux qdisc such as tbf counts), or
- alpha and the framing's bytes per segment when the raw rate is known
  (``--bandwidth``, e.g. the shaper's rate).

A constant number of bytes per message cannot be told apart from latency by
timing alone, so it is absorbed into alpha. Rank 0 prints model vs real per
size and writes a network file for :func:`pysim.network.load_network_file`
(``--network FILE``).

:class:`ShapedVeth` builds the test link used by the tests and
``bench/calibrate.py``: two network namespaces joined by a veth pair with
addresses in a private /30, each end shaped with ``tc qdisc ... tbf`` (needs
root and iproute2; traffic never leaves the two namespaces), optionally with
its own TCP congestion control.

TCP's window (:mod:`pysim.tcp`) is not fitted here: the repetitions run back to back, so
after the warm-up every window covers the path and neither the initial window nor a
buffer cap changes a timing (at the sub-millisecond round trips of a tbf link they could
not anyway). Its parameters are Linux's (initial window 10, RTO 200 ms + the smoothed
RTT), checked against gloo over a delay line with ``bench/tcp_window.py`` (and Linux's own
windows with ``bench/tcp_state.py``); its ``model`` mode re-models saved timings under other
settings (``--tcp ':rendezvous=on:segment=1MiB:cap=2MiB'``). For a link that gloo will run
on, compare with ``--tcp reno:rendezvous=on:segment=1MiB`` (or the link's congestion
control), which adds gloo's ready notices and its ring's 1 MiB segments.

The congestion control matters. With a loss-based one (reno) both ranks keep
the shaper's queue full and a 2-rank all-reduce takes what the link's rate,
framing and ACKs say. BBR (the default on some hosts) paces from its own
estimate of the bottleneck, which the ACKs queued behind the other rank's data
disturb: on a 100 Mbit/s tbf link a 10 MB all-reduce took 0.8-3.2% more than
with reno (its fastest of 9, six runs of ``bench/calibrate.py``), single
repetitions up to 20% more. The command prints the congestion control each
end's sockets send with and writes it into the network file.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from pysim.atomic import atomic_write_text
from pysim.network import (
    FRAMINGS,
    Framing,
    Network,
    format_bandwidth,
    network_to_json,
    parse_bandwidth,
    parse_framing,
)
from pysim.tcp import TCP_MODELS

DEFAULT_SIZES = (262_144, 1_048_576, 4_194_304, 10_485_760)


# ---------------------------------------------------------------- measuring


STATISTICS = {"min": min, "median": statistics.median}


def time_allreduces(sizes: list[int], reps: int, pysim_too: bool = False,
                    every_rep: dict[str, list[list[float]]] | None = None, stat: str = "min",
                    min_seconds: float = 0.0) -> dict[str, list[float]]:
    """In an initialised 2-process gloo group: per size (bytes, float32), the fastest (``stat``
    "min": on a shared machine noise only adds time) or the median over the repetitions of the
    slower rank's real seconds for torch.distributed.all_reduce (and, with ``pysim_too``, for
    pysim's ring ``Comm.allreduce_mean``). Both ranks call this. ``every_rep``, if given,
    receives every repetition's time per kind and size.

    Repetition r of every size and kind runs before repetition r + 1 of any, so a slow spell
    of the host (seconds, on a shared machine) costs each size one repetition, not all of one
    size's: timed size after size, one run's fastest 10 MB all-reduce at 1 Gbit/s came out
    43% slower than the run before it, and pysim's transport in the same seconds as well.
    Rounds go on until there are ``reps`` of them and ``min_seconds`` have passed (rank 0's
    clock decides), so a fast link gets as much measuring as a slow one."""
    import torch
    import torch.distributed as dist

    from pysim.comm import Comm

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Comm(rank, world, Network.uniform(world, "1Gbps")) if pysim_too else None
    kinds = {"torch": lambda x: dist.all_reduce(x)}
    if comm is not None:
        kinds["pysim"] = comm.allreduce_mean
    tensors = [torch.ones(max(nbytes // 4, 1)) for nbytes in sizes]
    for x in tensors:
        for fn in kinds.values():
            fn(x)  # warm-up: connections, buffers
    times: dict[str, list[list[float]]] = {k: [[] for _ in sizes] for k in kinds}
    start, rounds = time.perf_counter(), 0
    while True:
        for i, x in enumerate(tensors):
            for name, fn in kinds.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn(x)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times[name][i].append(float(t))
        rounds += 1
        more = torch.tensor([rounds < reps or time.perf_counter() - start < min_seconds], dtype=torch.uint8)
        dist.broadcast(more, 0)
        if not more.item():
            break
    if every_rep is not None:
        every_rep.update(times)
    return {name: [STATISTICS[stat](per_size) for per_size in per_kind] for name, per_kind in times.items()}


# ---------------------------------------------------------------- fitting


@dataclass
class Fit:
    """A calibrated link: latency (s), bandwidth (bits/s), framing; real and model seconds per
    size; ``head_start_s``: seconds by which the fit's fixed cost per all-reduce fell below
    zero (0 when it did not; see :func:`fit_link`)."""

    latency_s: float
    bandwidth_bps: float
    framing: Framing
    sizes: list[int]
    real_s: list[float]
    model_s: list[float]
    head_start_s: float = 0.0

    def network(self) -> Network:
        return Network.uniform(2, self.bandwidth_bps, self.latency_s, self.framing)

    def table(self) -> str:
        lines = [f"link: {format_bandwidth(self.bandwidth_bps)}, latency {self.latency_s * 1e6:.0f} us, framing "
                 f"{self.framing.per_message},{self.framing.mss},{self.framing.per_segment} "
                 "(per message, MSS, per segment bytes)"]
        if self.head_start_s > 0:
            lines.append(f"fixed cost per all-reduce fitted {-self.head_start_s * 1e6:.0f} us: the link sends its "
                         "first bytes faster than its rate (a shaper's burst?); latency set to 0")
        lines.append("size (bytes)   real (s)   model (s)   model/real - 1")
        for s, r, m in zip(self.sizes, self.real_s, self.model_s, strict=True):
            lines.append(f"{s:12d} {r:10.4f} {m:11.4f} {100 * (m / r - 1):+14.1f}%")
        return "\n".join(lines)


def model_allreduce_s(net: Network, nbytes: int) -> float:
    """pysim's time for a 2-member ring all-reduce of ``nbytes`` (two chunk packets)."""
    from pysim.network import collective_s

    half = nbytes // 2
    return collective_s(net.with_nodes(2), "allreduce", "ring", (half, nbytes - half))


def _latency_and_slope(x: np.ndarray, target: np.ndarray, real_s: np.ndarray) -> tuple[float, float]:
    """Least squares of ``target = 2 alpha + slope * x``, weighing every size's relative error
    alike (rows divided by its real time). alpha may come out negative (see :func:`fit_link`)."""
    a = np.column_stack([np.full(len(x), 2.0), x]) / real_s[:, None]
    (alpha, slope), *_ = np.linalg.lstsq(a, target / real_s, rcond=None)
    return float(alpha), float(slope)


def fit_link(sizes: list[int], real_s: list[float], framing: str | Framing = "tcp",
             bandwidth: str | float | None = None) -> Fit:
    """Least-squares fit of the 2-member ring all-reduce model to measured times (see the
    module docstring). Needs at least two distinct sizes.

    The slope (seconds per byte) is fitted freely. A fixed cost below zero, which a link
    shows when it sends its first bytes faster than its rate (a token-bucket shaper's burst),
    cannot be a latency: latency is then 0 and the amount is kept in ``Fit.head_start_s``.
    Forcing the line through zero instead would tilt the slope and put the error on the
    largest transfers: on a 100 Mbit/s tbf link with a 16 KiB burst that fit found 102 Mbit/s
    and missed 10 MB all-reduces by -1.3%."""
    if len(set(sizes)) < 2 or len(sizes) != len(real_s):
        raise ValueError("calibration needs times for at least two different sizes")
    y = np.asarray(real_s, dtype=np.float64)
    base = parse_framing(framing)
    if bandwidth is None:
        # T = 2 alpha + (16 / beta) (wire(S/2) + acks(S/2))
        wire = np.array([base.wire_bytes(s // 2) + base.acks(s // 2) for s in sizes], dtype=np.float64)
        alpha, inv_beta = _latency_and_slope(16.0 * wire, y, y)
        if inv_beta <= 0:
            raise ValueError("calibration: time does not grow with size; use larger sizes")
        fitted, bps = base, 1.0 / inv_beta
    else:
        # known raw rate: T = 2 alpha + 16 (c + p * segments(c) + acks(c)) / beta, fit alpha and p
        bps = parse_bandwidth(bandwidth)
        mss = base.mss or FRAMINGS["tcp"].mss
        base = Framing(base.per_message, mss, base.per_segment, base.ack_bytes, base.segments_per_ack)
        c = np.array([s // 2 + base.per_message + base.acks(s // 2) for s in sizes], dtype=np.float64)
        segments = np.array([base.segments(s // 2) for s in sizes], dtype=np.float64)
        alpha, per_segment = _latency_and_slope(16.0 * segments / bps, y - 16.0 * c / bps, y)
        fitted = Framing(base.per_message, mss, max(int(round(per_segment)), 0), base.ack_bytes, base.segments_per_ack)
    fit = Fit(max(alpha, 0.0), float(bps), fitted, list(sizes), list(map(float, y)), [],
              head_start_s=max(-2.0 * alpha, 0.0))
    fit.model_s = [model_allreduce_s(fit.network(), s) for s in sizes]
    return fit


def tcp_congestion_control() -> str:
    """The TCP congestion control new sockets of this network namespace use (gloo's do not
    choose one), or "unknown" where the kernel does not say."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def write_network_file(fit: Fit, path: str | Path, congestion: str = "unknown") -> None:
    d = network_to_json(fit.network())
    d["calibration"] = {"sizes_bytes": fit.sizes, "real_s": fit.real_s, "model_s": fit.model_s,
                        "head_start_s": fit.head_start_s, "tcp_congestion_control": congestion,
                        "model": "2-member ring all-reduce: T(S) = 2 (alpha + 8 wire(S/2) / beta)"}
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")


# ---------------------------------------------------------------- command line


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rank", type=int, default=None, help="0 (fits and writes the file) or 1 (required)")
    ap.add_argument("--master", default=None, help="ADDR:PORT of rank 0 on the link to calibrate (required)")
    ap.add_argument("--ifname", help="network interface gloo uses on this end (GLOO_SOCKET_IFNAME)")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="all-reduce sizes in bytes")
    ap.add_argument("--reps", type=int, default=9, help="repetitions per size, at least")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="and repeat until this many seconds of timing have passed (a fast link gets more repetitions)")
    ap.add_argument("--stat", choices=sorted(STATISTICS), default="min",
                    help="per size, the fastest repetition (default: noise only adds time) or the median")
    ap.add_argument("--framing", default="tcp", help="ideal | tcp | tcp-ethernet | PER_MESSAGE,MSS,PER_SEGMENT")
    ap.add_argument("--bandwidth", help="the link's known raw rate: fit the framing's bytes per segment")
    ap.add_argument("--pysim", action="store_true", help="also time pysim's own ring all-reduce")
    ap.add_argument("--out", default="network.json", help="network file rank 0 writes")
    ap.add_argument("--json", help="where rank 0 saves the raw timings, before fitting (default: beside --out, "
                                   "NAME.timings.json)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other rank")


def run_cli(a: argparse.Namespace) -> int:
    """``python -m pysim calibrate``: checks every argument, meets the other rank, times, saves the
    timings (``--json``, else beside ``--out``), then fits and writes the network file."""
    sizes, timings_path = check_arguments(a)
    if a.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    every_rep: dict[str, list[list[float]]] = {}
    times, ends = measure(a, sizes, every_rep)
    if a.rank != 0:
        return 0
    congestion = ends[0] if ends[0] == ends[1] else f"{ends[0]} (rank 0), {ends[1]} (rank 1)"
    atomic_write_text(timings_path, json.dumps({"sizes": sizes, **times, "every_rep": every_rep,
                                                "reps": len(every_rep["torch"][0]),
                                                "tcp_congestion_control": congestion}) + "\n")
    print(f"timings saved to {timings_path}")
    fit = fit_link(sizes, times["torch"], a.framing, a.bandwidth)
    print(f"TCP congestion control: {congestion}; {a.stat} of {len(every_rep['torch'][0])} repetitions per size")
    print("TCP window: not fitted (the repetitions run back to back, every window open); assumed Linux's: "
          "initial window 10, restart after 200 ms + smoothed RTT idle. For gloo on this link add "
          f"--tcp {ends[0] if ends[0] == ends[1] and ends[0] in TCP_MODELS else 'reno'}:rendezvous=on:segment=1MiB "
          "to compare or sweep")
    print(fit.table())
    write_network_file(fit, a.out, congestion)
    if "pysim" in times:
        for s, t, p in zip(sizes, times["torch"], times["pysim"], strict=True):
            print(f"pysim all-reduce {s} bytes: {p:.4f} s real vs torch {t:.4f} s ({100 * (p / t - 1):+.1f}%)")
    print(f"wrote {a.out}")
    return 0


def check_arguments(a: argparse.Namespace) -> tuple[list[int], Path]:
    """Every argument, before waiting for the other rank: the sizes, and where the timings go."""
    if a.rank not in (0, 1):
        raise ValueError(f"--rank must be 0 or 1, got {a.rank}" if a.rank is not None else
                         "--rank is required: 0 on the end that fits and writes the file, 1 on the other")
    if not a.master:
        raise ValueError("--master ADDR:PORT is required: rank 0's address on the link to calibrate")
    check_master(a.master, a.rank)
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        raise ValueError(f"bad --sizes {a.sizes!r}: a comma-separated list of byte counts") from None
    if a.reps < 1 or not 0 <= a.seconds < math.inf or any(s < 8 for s in sizes):
        raise ValueError("--reps must be >= 1, --seconds >= 0 and every size >= 8 bytes")
    if len(set(sizes)) < 2:
        raise ValueError(f"bad --sizes {a.sizes!r}: the fit needs at least two different sizes")
    if not 0 < a.timeout < math.inf:
        raise ValueError(f"--timeout must be a positive number of seconds, got {a.timeout}")
    parse_framing(a.framing)
    if a.bandwidth is not None:
        a.bandwidth = parse_bandwidth(a.bandwidth)
    if a.ifname:
        try:
            socket.if_nametoindex(a.ifname)
        except OSError:
            raise ValueError(f"--ifname {a.ifname!r}: no such network interface here (see `ip link`)") from None
    timings = Path(a.json) if a.json else Path(a.out).with_suffix(".timings.json")
    if a.rank == 0:
        for path in (Path(a.out), timings):
            check_writable(path)
    return sizes, timings


def check_master(master: str, rank: int) -> None:
    """``ADDR:PORT`` with a port in 1..65535 and an address this machine can resolve; for rank 0, an
    address of this machine and a free port."""
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad --master {master!r}: give ADDR:PORT, e.g. 10.0.0.1:29500")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"bad --master {master!r}: cannot resolve {host!r} ({e.strerror})") from None
    if rank != 0:
        return
    with socket.socket(family, kind) as probe:   # rank 0 serves the rendezvous at ADDR:PORT
        try:
            probe.bind(address)
        except OSError as e:
            why = f"port {port} is in use" if e.errno == errno.EADDRINUSE else \
                f"{host} is not an address of this machine" if e.errno == errno.EADDRNOTAVAIL else e.strerror
            raise ValueError(f"bad --master {master!r} for rank 0: {why}; give rank 0's own address on the link "
                             "and a free port") from None


def check_writable(path: Path) -> None:
    """A one-line ValueError now, not after the measurement, if ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied")


def measure(a: argparse.Namespace, sizes: list[int], every_rep: dict) -> tuple[dict[str, list[float]], list]:
    """Meets the other rank and times the all-reduces; rendezvous and peer failures in one line."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        with native_stderr_held():   # torch's C++ logs each retry with its stack frames
            dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=2,
                                    timeout=timedelta(seconds=a.timeout))
    except (RuntimeError, OSError, TimeoutError) as e:  # torch's DistNetworkError, DistStoreError, ...
        waited = "no other rank joined rank 0 at" if a.rank == 0 else "could not reach rank 0 at"
        raise ValueError(f"calibrate: {waited} {a.master} within {a.timeout:g} s ({_first_line(e)}); start both "
                         "ends with the same --master (rank 0's address on the link) and check that the port is "
                         "open between them") from None
    try:
        times = time_allreduces(sizes, a.reps, a.pysim, every_rep, a.stat, a.seconds)
        ends: list[str | None] = [None, None]
        dist.all_gather_object(ends, tcp_congestion_control())   # each end's sockets send with its own
    except (RuntimeError, OSError, TimeoutError) as e:
        raise ValueError(f"calibrate: the other rank stopped during the measurement ({_first_line(e)})") from None
    finally:
        dist.destroy_process_group()
    return times, ends


@contextmanager
def native_stderr_held():
    """Holds what native code writes to file descriptor 2 while the block runs, and writes it out
    only if the block fails with something other than the errors :func:`measure` turns into one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except (RuntimeError, OSError, TimeoutError):
            raise
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.buffer.write(held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip()[:200] if lines else type(e).__name__


# ---------------------------------------------------------------- a shaped test link


def veth_missing() -> str | None:
    """Why a shaped veth link cannot be built here, or None if it can."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs '{tool}' (apt-get install iproute2)"
    return None


def check_congestion(congestion: str | None) -> str | None:
    """``congestion`` if it can name a TCP congestion control (e.g. "reno", "bbr"), else ValueError;
    None (the host's default: a new namespace inherits it) passes."""
    if congestion is not None and not re.fullmatch(r"[a-z0-9_]+", congestion):
        raise ValueError(f"bad TCP congestion control name {congestion!r}: e.g. reno, cubic, bbr")
    return congestion


def set_tcp_congestion(ns: str, congestion: str) -> None:
    """Sets the TCP congestion control of network namespace ``ns`` (needs root); ValueError naming
    the allowed ones if the kernel refuses it."""
    check_congestion(congestion)
    # written through /proc by sh (always there; sysctl may not be), the name passed as an argument
    done = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", 'printf %s "$1" > "$2"', "sh", congestion,
                           "/proc/sys/net/ipv4/tcp_congestion_control"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        names = allowed.read_text().split() if allowed.exists() else []
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise ValueError(f"TCP congestion control {congestion!r} cannot be set here ({why}); allowed: "
                         f"{' '.join(names) or 'unknown'} (net.ipv4.tcp_allowed_congestion_control)")


class ShapedVeth:
    """Two network namespaces ``{name}a`` / ``{name}b`` joined by a veth pair, addresses
    10.77.0.1/30 and 10.77.0.2/30 inside them only, each direction shaped by tbf to
    ``rate`` (tc syntax, e.g. "100mbit"), with TCP congestion control ``congestion`` in both
    (e.g. "reno"; None keeps the host's default). A context manager: removes everything on
    exit, also after a failure."""

    ADDRS = ("10.77.0.1", "10.77.0.2")

    def __init__(self, rate: str, name: str = "pysimcal", burst: str | None = None, queue: str = "1s",
                 congestion: str | None = None) -> None:
        self.rate, self.name, self.queue = rate, name, queue
        self.congestion = check_congestion(congestion)
        # the bucket's credit lets a transfer start faster than the rate: 16 KiB (1.3 ms at 100 Mbit/s,
        # 0.13 ms at 1 Gbit/s) is small beside the transfers calibrated; 1 ms of traffic (125 kB at
        # 1 Gbit/s) made 256 KiB all-reduces nearly free and the fit find 1.16 Gbit/s on a 1 Gbit/s link
        self.burst = burst or "16384b"
        parse_bandwidth(rate)  # a bad rate fails here, not in tc
        self.ns = (f"{name}a", f"{name}b")
        self.dev = (f"{name}0", f"{name}1")

    def _ip(self, *args: str, check: bool = True) -> None:
        subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)

    def __enter__(self) -> ShapedVeth:
        self.close()  # a leftover from a killed run
        try:
            for ns in self.ns:
                self._ip("ip", "netns", "add", ns)
            self._ip("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name",
                     self.dev[1], "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.ADDRS, strict=True):
                self._ip("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                self._ip("ip", "-n", ns, "link", "set", dev, "up")
                self._ip("ip", "-n", ns, "link", "set", "lo", "up")
                self._ip("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                         self.rate, "burst", self.burst, "latency", self.queue)
                if self.congestion is not None:
                    self._set_congestion(ns)
        except BaseException:
            self.close()
            raise
        return self

    def _set_congestion(self, ns: str) -> None:
        set_tcp_congestion(ns, self.congestion)

    def close(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it, and its peer
            self._ip("ip", "netns", "del", ns, check=False)

    def __exit__(self, *exc) -> None:
        self.close()

    def command(self, end: int, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``end`` (0 or 1)."""
        return ["ip", "netns", "exec", self.ns[end], *argv]

    def calibrate(self, extra: list[str], port: int = 29577, timeout_s: float = 300.0
                  ) -> subprocess.CompletedProcess:
        """Runs ``python -m pysim calibrate`` with rank 0 in the first namespace and rank 1 in
        the second; returns rank 0's completed process (rank 1's failure raises)."""
        base = [sys.executable, "-m", "pysim", "calibrate", "--master", f"{self.ADDRS[0]}:{port}"]
        procs = [subprocess.Popen(self.command(r, base + ["--rank", str(r), "--ifname", self.dev[r], *extra]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        try:
            outs = [p.communicate(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if procs[1].returncode != 0:
            raise RuntimeError(f"calibrate rank 1 failed: {outs[1][1][-2000:]}")
        return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, outs[0][0], outs[0][1])
