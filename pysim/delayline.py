"""A link with a real round-trip time: N network namespaces joined by a userspace delay line.

:class:`DelayLine` puts node i in network namespace ``{name}{i}`` with a TUN device
``{name}{i}`` at 10.78.0.(i+1)/24 (MTU 1500). The devices belong to one process,
``csrc/delayline/delayline.cpp`` (built with g++ on first use), which forwards each IPv4
packet through pysim's link model (:mod:`pysim.network`): the sender's uplink at ``rate``,
the one-way ``delay``, the receiver's downlink at ``rate``, each link a drop-tail FIFO of
``queue_bytes`` (default: one second of traffic). Needs root, ``/dev/net/tun``, iproute2
and g++; traffic never leaves the namespaces.

Why a program of its own: this kernel has no netem (and no fq), so a delay cannot be had
from tc; :class:`pysim.calibrate.ShapedVeth` shapes a veth pair's rate only.

What is charged: each packet's IP length (headers included, no link header) plus
``overhead_bytes`` (default 0), so a full TCP segment (1448 bytes of data with timestamps)
costs 1500 bytes. Ethernet would add 14 bytes a packet (its header: what tbf charges on
ShapedVeth's veth), 18 with the FCS, 38 on a real wire with preamble and inter-frame gap.

How the devices get into the namespaces: the program creates them in the root namespace and
prints "ready"; the rig moves each with ``ip link set dev X netns NS``. A TUN device keeps
working after the move while the program holds its descriptor, and vanishes when the program
exits, however it exits (the devices are not persistent; a dying parent sends it SIGTERM).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pysim.calibrate import check_congestion, set_tcp_congestion
from pysim.network import parse_bandwidth, parse_latency

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "delayline" / "delayline.cpp"
CXXFLAGS = ("-O2", "-std=c++17", "-Wall", "-Wextra")
SUBNET = "10.78.0."  # node i is SUBNET + str(i + 1)
MAX_NODES = 254
MTU = 1500
# The devices' own queue in front of the program. A TUN device never pushes back on the
# sender (it orphans each packet, so TCP's small-queue limit sees it gone): a burst beyond this
# queue while the program is busy or descheduled is dropped before the emulated link. Tun's
# default, 500, is 6 ms at 1 Gbit/s, and 1000 still dropped hundreds of packets a second of a
# 1 Gbit/s TCP transfer on a 2-core machine; 10000 packets (120 ms at 1 Gbit/s) absorbs the
# bursts, and packets wait in it only while the program lags, not in the steady state.
TXQUEUELEN = 10_000
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _cache_root() -> Path:
    return Path(os.environ.get("PYSIM_CACHE_DIR") or Path.home() / ".cache" / "pysim")


def delayline_program() -> Path:
    """Where the compiled delay line lives: ``$PYSIM_CACHE_DIR`` (default ~/.cache/pysim) /
    ``delayline-<hash of the source and flags>/delayline``, so an edited source builds anew."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXXFLAGS).encode()).hexdigest()[:12]
    return _cache_root() / f"delayline-{digest}" / "delayline"


def build_delayline() -> Path:
    """The delay line program, compiled with g++ on first use (a few seconds); RuntimeError in
    one line if g++ is missing or the build fails."""
    program = delayline_program()
    if program.is_file():
        return program
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError(f"the delay line needs g++ to build {SOURCE} (apt-get install g++)")
    program.parent.mkdir(parents=True, exist_ok=True)
    tmp = program.with_name(f".delayline.{os.getpid()}.tmp")
    done = subprocess.run([cxx, *CXXFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        raise RuntimeError(f"building the delay line failed: {errors[0]}")
    os.replace(tmp, program)  # concurrent builds each rename a complete program
    return program


def delayline_missing() -> str | None:
    """Why a :class:`DelayLine` cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "needs Linux network namespaces and TUN devices"
    if os.geteuid() != 0:
        return "needs root (ip netns, TUN devices)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return f"needs /dev/net/tun ({e.strerror}; modprobe tun)"
    if shutil.which("ip") is None:
        return "needs 'ip' (apt-get install iproute2)"
    if not SOURCE.is_file():
        return f"needs its source {SOURCE} (run from a source checkout)"
    if shutil.which("g++") is None and not delayline_program().is_file():
        return "needs g++ to build the delay line (apt-get install g++)"
    return None


def _run(argv: list[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed: {why}")
    return done


def _whole_bytes(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"bad {what} {value!r}: a whole number of bytes from {low} to {high}")
    return value


class DelayLine:
    """``nodes`` network namespaces ``{name}0`` .. joined by the delay line (see the module's
    docstring): each node's uplink and downlink at ``rate`` (a string with its unit, e.g.
    "100mbit", "1Gbps"; see :func:`pysim.network.parse_bandwidth`), a one-way ``delay`` between
    them (e.g. "20ms"; :func:`pysim.network.parse_latency`), drop-tail queues of ``queue_bytes``
    bytes per link (None: one second of traffic at the rate), ``overhead_bytes`` charged per
    packet on top of its IP length, TCP congestion control ``congestion`` in every namespace
    (e.g. "reno"; None keeps the host's default). A context manager: on exit, also after an
    exception, the program stops (its statistics are then in :meth:`stats`) and the namespaces
    are deleted."""

    def __init__(self, nodes: int = 2, rate: str = "100mbit", delay: str = "20ms", queue_bytes: int | None = None,
                 congestion: str | None = None, name: str = "pysimdl", overhead_bytes: int = 0) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 2 <= nodes <= MAX_NODES:
            raise ValueError(f"bad nodes {nodes!r}: a whole number from 2 to {MAX_NODES}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or len(name) + len(str(nodes - 1)) > 15:
            raise ValueError(f"bad name {name!r}: lower-case letters, digits and _, at most "
                             f"{15 - len(str(nodes - 1))} characters (device names have 15)")
        self.rate_bps = parse_bandwidth(rate)
        if not 1e3 <= self.rate_bps <= 1e12:
            raise ValueError(f"bad rate {rate!r}: the delay line takes 1 kbit/s to 1 Tbit/s")
        self.delay_s = parse_latency(delay)
        if self.delay_s > 60:
            raise ValueError(f"bad delay {delay!r}: the delay line takes at most 60 s")
        self.queue_bytes = None if queue_bytes is None else _whole_bytes("queue_bytes", queue_bytes, 1, 1 << 40)
        self.overhead_bytes = _whole_bytes("overhead_bytes", overhead_bytes, 0, 1000)
        self.congestion = check_congestion(congestion)
        self.nodes, self.name = nodes, name
        self.ns = tuple(f"{name}{i}" for i in range(nodes))
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._stats: dict[str, Any] | None = None
        self._error: str | None = None

    # ------------------------------------------------------------ where things are

    def addr(self, i: int) -> str:
        """Node ``i``'s IPv4 address (10.78.0.(i+1))."""
        return SUBNET + str(self._node(i) + 1)

    def dev(self, i: int) -> str:
        """Node ``i``'s TUN device, inside its namespace."""
        return f"{self.name}{self._node(i)}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.ns[self._node(i)], *argv]

    @property
    def pid(self) -> int | None:
        """The delay line program's process id while it runs (or after, for checks), else None."""
        return self._proc.pid if self._proc is not None else None

    def stats(self) -> dict[str, Any]:
        """What the program counted, after the ``with`` block: ``ports`` (per node: ``rx_packets``
        / ``rx_bytes`` read from its device, ``tx_*`` written to it, IP bytes; drops by reason;
        ``max_uplink_queue_bytes``, ``max_downlink_queue_bytes``; ``kernel_tx_dropped``: packets
        the device's own queue dropped before the program read them), ``drops`` (totals:
        ``not_ipv4``, ``no_route``, ``uplink_queue``, ``downlink_queue``, ``write_errors``) and
        ``lateness_us`` (writes vs their due time, microseconds: ``max``, ``p50``, ``p99`` as 1 us
        bucket edges, -1 beyond 100 ms)."""
        if self._stats is None:
            raise RuntimeError(self._error or "no statistics yet: they come when the with block exits")
        return self._stats

    def _node(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.nodes:
            raise IndexError(f"node {i!r} out of range: this delay line has nodes 0..{self.nodes - 1}")
        return i

    # ------------------------------------------------------------ starting

    def __enter__(self) -> DelayLine:
        if self._proc is not None:
            raise RuntimeError("this DelayLine was already entered; make a new one")
        program = build_delayline()
        self._remove_namespaces()  # a leftover from a killed run
        try:
            self._start(program)
            self._make_namespaces()
        except BaseException:
            self.close()
            raise
        return self

    def _argv(self, program: Path) -> list[str]:
        argv = [str(program), "--tun", ",".join(self.dev(i) for i in range(self.nodes)),
                "--rate-bps", str(round(self.rate_bps)), "--delay-us", str(round(self.delay_s * 1e6)),
                "--overhead-bytes", str(self.overhead_bytes), "--stats", str(self._dir / "stats.json")]
        return argv + (["--queue-bytes", str(self.queue_bytes)] if self.queue_bytes is not None else [])

    def _start(self, program: Path) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pysim-delayline-"))
        with open(self._dir / "stderr.txt", "wb") as err:
            # a session of its own: a terminal's Ctrl-C reaches the rig, which stops it with its statistics
            self._proc = subprocess.Popen(self._argv(program), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=err, start_new_session=True)
        with selectors.DefaultSelector() as sel:  # "ready" once every device exists
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            line = self._proc.stdout.readline() if sel.select(START_TIMEOUT_S) else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"the delay line did not start: {self._stderr_line() or 'no answer'}")

    def _make_namespaces(self) -> None:
        for ns in self.ns:
            _run(["ip", "netns", "add", ns])
        _run(["ip", "-batch", "-"], stdin="".join(f"link set dev {self.dev(i)} netns {self.ns[i]}\n"
                                                  for i in range(self.nodes)))
        for i, ns in enumerate(self.ns):
            # IPv6 off on the device: no router solicitations or MLD reports crossing the line
            _run(["ip", "netns", "exec", ns, "sh", "-c", 'printf 1 > "/proc/sys/net/ipv6/conf/$1/disable_ipv6"',
                  "sh", self.dev(i)], check=False)
            _run(["ip", "-n", ns, "-batch", "-"],
                 stdin=f"link set dev {self.dev(i)} mtu {MTU} txqueuelen {TXQUEUELEN}\n"
                       f"addr add {self.addr(i)}/24 dev {self.dev(i)}\n"
                       f"link set dev {self.dev(i)} up\nlink set dev lo up\n")
            if self.congestion is not None:
                set_tcp_congestion(ns, self.congestion)

    # ------------------------------------------------------------ stopping

    def close(self) -> None:
        """Stops the program (keeping its statistics) and deletes the namespaces."""
        kernel_drops = self._kernel_drops() if self._proc is not None and self._proc.poll() is None else None
        self._stop()
        if self._stats is not None and kernel_drops is not None:
            for port, dropped in zip(self._stats["ports"], kernel_drops, strict=True):
                port["kernel_tx_dropped"] = dropped
        self._remove_namespaces()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kernel_drops(self) -> list[int | None]:
        """Per node, what its device's queue dropped before the program read it (None: unknown)."""
        out: list[int | None] = []
        for i, ns in enumerate(self.ns):
            done = _run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", self.dev(i)], check=False)
            try:
                out.append(int(json.loads(done.stdout)[0]["stats64"]["tx"]["dropped"]))
            except (ValueError, KeyError, IndexError, TypeError):
                out.append(None)
        return out

    def _stop(self) -> None:
        proc = self._proc
        if proc is None or self._dir is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        try:
            self._stats = json.loads((self._dir / "stats.json").read_text())
        except (OSError, ValueError):
            self._error = f"the delay line wrote no statistics (exit {proc.returncode}): {self._stderr_line()}"

    def _stderr_line(self) -> str:
        try:
            lines = (self._dir / "stderr.txt").read_text(errors="replace").strip().splitlines()
        except (OSError, TypeError):
            return ""
        return lines[-1] if lines else ""

    def _remove_namespaces(self) -> None:
        listed = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
        mine = re.compile(re.escape(self.name) + r"[0-9]+")
        for ns in {line.split()[0] for line in listed if line.strip()}:
            if mine.fullmatch(ns):
                _run(["ip", "netns", "del", ns], check=False)
