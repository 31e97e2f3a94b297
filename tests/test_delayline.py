"""The delay line (csrc/delayline, pysim/delayline.py): real TCP and UDP between network namespaces
against round trips, transfer times and drops computed by hand. Root only, like the shaped veth."""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pysim.delayline import DelayLine, build_delayline, delayline_missing

needs_delayline = pytest.mark.skipif(delayline_missing() is not None,
                                     reason=f"delay line unavailable: {delayline_missing()}")

# node 1 echoes what it receives over TCP; node 0 times round trips of 1 byte (ms)
ECHO = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 7000)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while d := c.recv(64):
    c.sendall(d)
"""
PING = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 7000)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[2])):
    t = time.monotonic(); c.sendall(b"x"); c.recv(1); rtts.append(1e3 * (time.monotonic() - t))
print(json.dumps(rtts))
"""
# node 1 receives N bytes and answers one; node 0 times from its first byte sent to that answer (s)
SINK = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 7001)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); want, got, buf = int(sys.argv[2]), 0, bytearray(1 << 20)
while got < want and (n := c.recv_into(buf)):
    got += n
c.sendall(b"k")
"""
SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 7001)); data = bytes(int(sys.argv[2]))
t = time.monotonic(); c.sendall(data); c.recv(1); print(time.monotonic() - t)
"""
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7002)); s.settimeout(10)
print("listening", flush=True)
for _ in range(int(sys.argv[2])):
    d, a = s.recvfrom(2048); s.sendto(d, a)
"""
UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
for _ in range(int(sys.argv[3])):
    s.sendto(bytes(int(sys.argv[4])), (sys.argv[1], int(sys.argv[2])))
    if sys.argv[5] == "wait":
        s.recvfrom(2048)
"""


def unique(tag: str) -> str:
    """A name of this process's own (pid in it): a second test run at the same time, on this
    shared machine, must not delete these namespaces as leftovers of its own."""
    return f"pdl{tag}{os.getpid()}_"  # "_": no other pid makes a name this one is the start of


def python_in(dl: DelayLine, node: int, script: str, *args: object) -> list[str]:
    return dl.command(node, [sys.executable, "-c", script, *map(str, args)])


def serve(dl: DelayLine, node: int, script: str, *args: object) -> subprocess.Popen:
    """``script`` started in ``node``'s namespace; returns once it prints 'listening'."""
    proc = subprocess.Popen(python_in(dl, node, script, *args), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def run_in(dl: DelayLine, node: int, script: str, *args: object) -> str:
    return subprocess.run(python_in(dl, node, script, *args), capture_output=True, text=True, check=True,
                          timeout=60).stdout


def leftovers(name: str) -> list[str]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.split("\n")
    mine = re.compile(re.escape(name) + r"[0-9]+\b")
    return [line for line in namespaces + links if mine.search(line)]


@needs_delayline
def test_a_round_trip_takes_twice_the_one_way_delay():
    with DelayLine(nodes=2, rate="100mbit", delay="20ms", name=unique("r")) as dl:
        echo = serve(dl, 1, ECHO, dl.addr(1))
        rtts = json.loads(run_in(dl, 0, PING, dl.addr(1), 5))
        echo.wait(timeout=10)
    # 2 x 20 ms, plus a 53-byte packet (1 byte of data, 52 of IP and TCP headers) serialized on
    # 4 links at 100 Mbit/s: 4 x 4.24 us; the rest is waking processes up
    assert min(rtts) >= 40.0 and statistics.median(rtts) < 43.0, rtts
    s = dl.stats()
    assert s["drops"] == {"not_ipv4": 0, "no_route": 0, "uplink_queue": 0, "downlink_queue": 0, "write_errors": 0}
    assert s["ports"][0]["max_uplink_queue_bytes"] <= 2 * 1500


@needs_delayline
def test_a_transfer_takes_what_the_rate_says():
    nbytes = 4_000_000
    with DelayLine(nodes=2, rate="100mbit", delay="1ms", congestion="reno", name=unique("t")) as dl:
        assert run_in(dl, 0, "print(open('/proc/sys/net/ipv4/tcp_congestion_control').read())").strip() == "reno"
        sink = serve(dl, 1, SINK, dl.addr(1), nbytes)
        took = float(run_in(dl, 0, SOURCE, dl.addr(1), nbytes))
        sink.wait(timeout=10)
    # full segments carry 1448 bytes of data in 1500 of IP (20 IP + 32 TCP with timestamps): the
    # uplink alone needs 8 * 4e6 * 1500/1448 / 1e8 = 0.3315 s; then 1 ms, and 1 ms for the answer
    ideal = 8 * nbytes * (1500 / 1448) / 100e6
    assert ideal <= took <= 1.10 * ideal, (took, ideal)
    s = dl.stats()
    segments = -(-nbytes // 1448)
    assert s["ports"][1]["tx_bytes"] >= nbytes + 52 * segments  # all of it crossed the line, headers included
    assert s["drops"]["uplink_queue"] == s["drops"]["downlink_queue"] == 0  # a 1 s queue (12.5 MB) never fills


@needs_delayline
def test_three_nodes_route_by_address_and_count_strays():
    name = unique("n")
    with DelayLine(nodes=3, rate="100mbit", delay="1ms", name=name) as dl:
        assert [dl.addr(i) for i in range(3)] == ["10.78.0.1", "10.78.0.2", "10.78.0.3"]
        echo = serve(dl, 2, UDP_ECHO, dl.addr(2), 3)
        run_in(dl, 0, UDP_SEND, dl.addr(2), 7002, 3, 100, "wait")   # 3 echoed datagrams, 0 <-> 2
        run_in(dl, 0, UDP_SEND, "10.78.0.200", 7002, 5, 100, "no")  # 5 to nobody: in the subnet, no node
        echo.wait(timeout=10)
        pid = dl.pid
    s = dl.stats()
    p0, p1, p2 = s["ports"]
    assert (p0["rx_packets"], p2["tx_packets"], p2["rx_packets"], p0["tx_packets"]) == (8, 3, 3, 3)
    assert p2["tx_bytes"] == 3 * 128  # 100 bytes of data + 8 UDP + 20 IP
    assert p0["drops_no_route"] == s["drops"]["no_route"] == 5
    assert p1["rx_packets"] == p1["tx_packets"] == 0  # node 1 saw nothing
    # after the block: no namespace, no device, no program
    assert leftovers(name) == []
    assert not Path(f"/proc/{pid}").exists()


@needs_delayline
def test_a_full_queue_drops_the_arriving_packet():
    # 1 Mbit/s and a 3000-byte queue: 1028-byte datagrams (1000 + 28) sent back to back; the
    # uplink takes two (1028, then 2056 waiting) and drops the third (3084 > 3000) unless 0.7 ms
    # (84 bytes) have drained by then; a whole packet's room frees 8.2 ms (1028 bytes at 1 Mbit/s)
    # after the first: far more than 20 sendto calls take
    with DelayLine(nodes=2, rate="1mbit", delay="1ms", queue_bytes=3000, name=unique("q")) as dl:
        run_in(dl, 0, UDP_SEND, dl.addr(1), 7003, 20, 1000, "no")
        time.sleep(0.1)  # the few taken are written within 5 x 8.2 ms + 1 ms
    p0, p1 = dl.stats()["ports"]
    assert p0["rx_packets"] == 20 and p0["drops_uplink_queue"] + p1["tx_packets"] == 20
    assert p0["drops_uplink_queue"] >= 15 and p0["max_uplink_queue_bytes"] <= 3000
    assert p1["drops_downlink_queue"] == 0  # the downlink never holds more than one at this rate


@needs_delayline
def test_nothing_is_left_after_an_exception():
    name = unique("x")
    with pytest.raises(RuntimeError, match="inside"):
        with DelayLine(name=name) as dl:
            pid = dl.pid
            raise RuntimeError("inside the block")
    assert leftovers(name) == [] and not Path(f"/proc/{pid}").exists()
    assert dl.stats()["seconds"] > 0  # it stopped cleanly, with its statistics


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": "100"}, "give a unit"),
    ({"rate": "100kbps", "nodes": 2, "delay": "20"}, "give a unit"),
    ({"rate": "1bit"}, "1 kbit/s to 1 Tbit/s"),
    ({"nodes": 1}, "2 to 254"),
    ({"name": "averyveryverylongname"}, "15"),
    ({"queue_bytes": 0}, "queue_bytes"),
    ({"congestion": "reno; reboot"}, "congestion"),
])
def test_bad_arguments_raise_one_line(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        DelayLine(**kwargs)
    assert "\n" not in str(err.value)


def test_the_program_refuses_bad_arguments_in_one_line():
    try:
        program = build_delayline()
    except RuntimeError as e:
        pytest.skip(str(e))
    done = subprocess.run([str(program), "--tun", "a,b", "--rate-bps", "100", "--delay-us", "1"],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--rate-bps" in done.stderr
