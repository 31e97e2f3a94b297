"""How fast the delay line (csrc/delayline, pysim/delayline.py) forwards, as root:

    python bench/delayline.py [--rate 1gbit] [--delay 1ms] [--mbytes 100] [--seconds 2]

1. TCP, one way: node 0 sends --mbytes to node 1; goodput vs the rate's 1448/1500.
2. TCP, both ways at once: each node sends --mbytes to the other.
3. UDP flood at an unlimited rate (1 Tbit/s): node 0 blasts 1472-byte datagrams for --seconds;
   the packets per second the program forwards, and its CPU time, say what one core does.

Each prints the program's statistics: packets/s written, lateness of writes (max, p99), drops
(queues, and the devices' own queues before the program), and its CPU use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.delayline import DelayLine, delayline_missing  # noqa: E402

RECEIVE = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); want, got, buf = int(sys.argv[3]), 0, bytearray(1 << 20)
while got < want:
    n = c.recv_into(buf)
    if not n: break
    got += n
c.sendall(b"k"); print(got)
"""

SEND = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); n = int(sys.argv[3]); chunk = bytes(1 << 20)
t = time.monotonic(); left = n
while left > 0:
    left -= c.send(chunk[:min(left, len(chunk))])
c.recv(1); print(time.monotonic() - t)
"""

FLOOD_RECEIVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
s.bind((sys.argv[1], 5001)); s.settimeout(2.0); print("listening", flush=True); n = 0
try:
    while True:
        s.recv(2048); n += 1
except TimeoutError:
    print(n)
"""

FLOOD_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d = bytes(1472); to = (sys.argv[1], 5001)
end = time.monotonic() + float(sys.argv[2]); n = 0
while time.monotonic() < end:
    for _ in range(100):
        try:
            s.sendto(d, to); n += 1
        except BlockingIOError:
            pass
print(n)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks of 10 ms


def listen(dl: DelayLine, node: int, script: str, args: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(dl.command(node, [sys.executable, "-c", script, *args]), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


def tcp(dl: DelayLine, pairs: list[tuple[int, int]], nbytes: int) -> list[float]:
    """Seconds each (sender, receiver) transfer of ``nbytes`` took, all at once, until the receiver's reply."""
    recvs = [listen(dl, b, RECEIVE, [dl.addr(b), str(6000 + k), str(nbytes)]) for k, (_, b) in enumerate(pairs)]
    sends = [subprocess.Popen(dl.command(a, [sys.executable, "-c", SEND, dl.addr(b), str(6000 + k), str(nbytes)]),
                              stdout=subprocess.PIPE, text=True) for k, (a, b) in enumerate(pairs)]
    took = [float(p.communicate(timeout=120)[0]) for p in sends]
    for p in recvs:
        p.wait(timeout=10)
    return took


def flood(dl: DelayLine, seconds: float) -> tuple[int, int]:
    recv = listen(dl, 1, FLOOD_RECEIVE, [dl.addr(1)])
    sent = int(subprocess.run(dl.command(0, [sys.executable, "-c", FLOOD_SEND, dl.addr(1), str(seconds)]),
                              capture_output=True, text=True, timeout=60).stdout)
    return sent, int(recv.communicate(timeout=30)[0])


def report(dl: DelayLine, cpu: float, traffic_s: float) -> None:
    s = dl.stats()
    written = sum(p["tx_packets"] for p in s["ports"])
    late = s["lateness_us"]
    kernel = [p.get("kernel_tx_dropped") for p in s["ports"]]
    print(f"  program: {written} packets written, {written / traffic_s:,.0f} packets/s over the {traffic_s:.2f} s "
          f"of traffic; CPU {cpu:.2f} s ({100 * cpu / traffic_s:.0f}% of one core, spinning included)")
    print(f"  writes late by: max {late['max']:.0f} us, p50 <= {late['p50']:.0f} us, p99 <= {late['p99']:.0f} us; "
          f"drops {s['drops']}; devices' own queues dropped {kernel}")


def run_case(title: str, rate: str, delay: str, work) -> None:
    """``work(dl)`` makes the traffic and returns how many seconds it flowed."""
    print(title)
    with DelayLine(rate=rate, delay=delay, congestion="reno", name="pysimbn") as dl:
        cpu0 = cpu_seconds(dl.pid)
        traffic_s = work(dl)
        cpu = cpu_seconds(dl.pid) - cpu0
    report(dl, cpu, traffic_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--delay", default="1ms")
    ap.add_argument("--mbytes", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    if (why := delayline_missing()) is not None:
        sys.exit(f"delay line unavailable: {why}")
    nbytes = int(args.mbytes * 1e6)
    dl = DelayLine(rate=args.rate)
    ideal = nbytes * 8 * (1500 / 1448) / dl.rate_bps

    def one_way(d: DelayLine) -> float:
        took = tcp(d, [(0, 1)], nbytes)[0]
        print(f"  {nbytes / 1e6:g} MB took {took:.3f} s: {8 * nbytes / took / 1e6:.0f} Mbit/s of data "
              f"(ideal {ideal:.3f} s, {8 * nbytes / ideal / 1e6:.0f} Mbit/s)")
        return took

    def both_ways(d: DelayLine) -> float:
        took = tcp(d, [(0, 1), (1, 0)], nbytes)
        print("  " + "; ".join(f"{a}->{b}: {took[k]:.3f} s, {8 * nbytes / took[k] / 1e6:.0f} Mbit/s"
                               for k, (a, b) in enumerate([(0, 1), (1, 0)])) + f" (ideal {ideal:.3f} s each)")
        return max(took)

    def udp(d: DelayLine) -> float:
        sent, got = flood(d, args.seconds)
        print(f"  UDP 1472-byte datagrams: {sent} sent, {got} received in {args.seconds:g} s: "
              f"{got / args.seconds:,.0f} packets/s ({got * 1500 * 8 / args.seconds / 1e9:.2f} Gbit/s of IP)")
        return args.seconds

    run_case(f"TCP one way, {args.rate}, {args.delay} one-way delay:", args.rate, args.delay, one_way)
    run_case(f"TCP both ways at once, {args.rate} each, {args.delay}:", args.rate, args.delay, both_ways)
    run_case("UDP flood, rate 1 Tbit/s (no shaping), 1 ms:", "1tbit", "1ms", udp)


if __name__ == "__main__":
    main()
