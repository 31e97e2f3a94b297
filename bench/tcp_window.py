"""TCP's window against the clock: gloo all-reduces over the delay line vs pysim's model (issue 22).

    sudo python bench/tcp_window.py [--rates 100mbit] [--rtts 10,40,100] [--ranks 2] \
        [--congestion reno,bbr] [--sizes 100000,1000000,4000000,10000000] [--rounds 5] [--idle-s 1.0]

For each rate, round trip, congestion control and number of ranks: N network namespaces
joined by the delay line (:class:`pysim.delayline.DelayLine`, one-way delay RTT/2, 14 bytes
charged per packet on top of its IP length, so a full segment costs 1514 bytes as pysim's
``tcp`` framing says), one gloo rank in each. Each rank times ``torch.distributed.all_reduce``
of float32 tensors of each size (after one warm-up of each): back to back, then after an idle
gap of ``--idle-s`` (longer than the retransmission timeout, so a Linux reno/cubic sender
restarts its window), sizes interleaved, ``--rounds`` rounds each; the slower rank's time,
fastest repetition per size. The ranks start each all-reduce as they leave a barrier
(``--start barrier``, the default: up to a one-way latency apart, and the rank that leaves
first waits that long inside the all-reduce), or together, at a wall-clock instant rank 0
sends them 2 RTT + 20 ms ahead (``--start clock``, as the model's clock starts a
collective's members; for 2 ranks: with more, the broadcast outlasts the lead and the
report counts the late starts).

The model replays the same sequence on pysim's clock (:class:`pysim.clock.Clock`): the
warm-up, then per size the gap and a blocking ring all-reduce, on ``Network.uniform(N, rate,
RTT/2, framing="tcp")`` without a TCP model and with one: the cell's congestion control
plus ``--tcp`` (default ``:rendezvous=on:segment=1MiB``, gloo's ready notices and its ring
in 1 MiB segments; ``:rendezvous=on`` for the phase model, ``:cap=...`` to try a window
cap), fastest repetition per size as measured. Prints model/real - 1 per cell and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.clock import Clock  # noqa: E402
from pysim.network import Network, parse_bandwidth  # noqa: E402
from pysim.tcp import parse_tcp  # noqa: E402
from pysim.trace import Collective  # noqa: E402

PORT = 29611


# ---------------------------------------------------------------- one rank (inside its namespace)


def worker(a: argparse.Namespace) -> None:
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(seconds=120))
    sizes = [int(s) for s in a.sizes.split(",")]
    tensors = [torch.ones(s // 4) for s in sizes]
    for x in tensors:
        dist.all_reduce(x)   # warm-up: connections up, buffers allocated
    out: dict[str, list[list[float]]] = {}
    lates = 0   # starts where a rank got the start time only after it (clock)
    for mode, idle in (("back_to_back", 0.0), ("after_idle", a.idle_s)):
        times: list[list[float]] = [[] for _ in sizes]
        for _ in range(a.rounds):
            for i, x in enumerate(tensors):
                if idle:
                    time.sleep(idle)
                t0, late = start(a)
                dist.all_reduce(x)
                t = torch.tensor([time.time() - t0, late], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times[i].append(float(t[0]))
                lates += int(t[1])
        out[mode] = times
    if a.rank == 0:
        Path(a.out).write_text(json.dumps({"sizes": sizes, "late_starts": lates, **out}))
    dist.destroy_process_group()


def start(a: argparse.Namespace) -> tuple[float, int]:
    """Where this rank's all-reduce starts (wall-clock seconds, the same clock in every
    namespace) and whether it started late. ``barrier``: as it leaves a barrier, which lets
    ranks go up to a one-way latency apart (the rank that leaves first waits that long in the
    all-reduce); ``clock``: rank 0 sends every rank a start time 2 RTT + 20 ms ahead and they
    all start at that instant, as the model's clock starts a collective's members together."""
    import torch
    import torch.distributed as dist

    if a.start == "barrier":
        dist.barrier()
        return time.time(), 0
    at = torch.tensor([time.time() + 2 * a.rtt_ms / 1e3 + 0.02], dtype=torch.float64)
    dist.broadcast(at, 0)
    t0 = float(at)
    if time.time() > t0:
        return time.time(), 1
    while (left := t0 - time.time()) > 0.002:
        time.sleep(left - 0.002)
    while time.time() < t0:
        pass
    return t0, 0


# ---------------------------------------------------------------- the model


def model_times(net: Network, sizes: list[int], rounds: int, idle_s: float) -> dict[str, list[float]]:
    """The worker's sequence on pysim's clock: fastest repetition per size, per mode (s)."""
    n = net.n
    clock = Clock(net, n)

    def allreduce(gap_s: float, nbytes: int) -> float:
        before = clock.t.max() + gap_s
        chunks = [nbytes // 4 * 4 // n] * n   # the tensor's bytes in n ring chunks
        clock.advance(np.full(n, gap_s), Collective("allreduce", "ring", tuple(chunks)))
        return float(clock.t.max() - before)

    for s in sizes:
        allreduce(0.0, s)
    out = {}
    for mode, idle in (("back_to_back", 0.0), ("after_idle", idle_s)):
        times: list[list[float]] = [[] for _ in sizes]
        for _ in range(rounds):
            for i, s in enumerate(sizes):
                times[i].append(allreduce(idle, s))
        out[mode] = [min(t) for t in times]
    return out


# ---------------------------------------------------------------- the rig


def measure(rate: str, rtt_ms: float, congestion: str, ranks: int, a: argparse.Namespace) -> dict:
    from pysim.delayline import DelayLine

    out = Path(a.tmp) / f"times_{rate}_{rtt_ms:g}_{congestion}_{ranks}.json"
    with DelayLine(ranks, rate, f"{rtt_ms / 2:g}ms", congestion=congestion, name="pysimtw",
                   overhead_bytes=14) as dl:
        base = [sys.executable, __file__, "worker", "--world", str(ranks), "--master", f"{dl.addr(0)}:{PORT}",
                "--sizes", a.sizes, "--rounds", str(a.rounds), "--idle-s", str(a.idle_s), "--out", str(out),
                "--start", a.start, "--rtt-ms", str(rtt_ms)]
        capture = None
        if a.capture:   # rank 0's packets, both directions, as its kernel sends and receives them
            pcap = f"{a.capture}_{rate}_{rtt_ms:g}_{congestion}_{ranks}.pcap"
            capture = subprocess.Popen(dl.command(0, ["tcpdump", "-i", dl.dev(0), "-s", "96", "-w", pcap, "tcp"]),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)   # tcpdump listening before the first packet
        procs = [subprocess.Popen(dl.command(r, base + ["--rank", str(r), "--ifname", dl.dev(r)]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
        errs = [p.communicate(timeout=1800)[1] for p in procs]
        if capture is not None:
            time.sleep(0.5)
            capture.terminate()
            capture.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a rank failed: {[e[-800:] for e in errs if e]}")
    stats = dl.stats()
    real = json.loads(out.read_text())
    return {"real": {m: [min(t) for t in real[m]] for m in ("back_to_back", "after_idle")},
            "every_rep": {m: real[m] for m in ("back_to_back", "after_idle")},
            "drops": stats["drops"], "lateness_us": stats["lateness_us"], "start": a.start,
            "late_starts": real["late_starts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "worker", "model"])
    ap.add_argument("--rates", default="100mbit")
    ap.add_argument("--rtts", default="10,40,100", help="round trips, ms")
    ap.add_argument("--ranks", default="2")
    ap.add_argument("--congestion", default="reno,bbr")
    ap.add_argument("--sizes", default="100000,1000000,4000000,10000000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle-s", type=float, default=1.0)
    ap.add_argument("--tcp", default=":rendezvous=on:segment=1MiB",
                    help="settings added to each cell's congestion control preset for the model (gloo waits for "
                         "the receiver's ready notice: rendezvous=on; its ring all-reduce runs in 1 MiB segments, "
                         "two in flight: segment=1MiB), e.g. ':rendezvous=on' for the phase model")
    ap.add_argument("--json", default="bench/tcp_window.json", help="results (bench), or results to re-model")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--start", default="barrier", choices=["barrier", "clock"],
                    help="how the ranks start each all-reduce: as they leave a barrier, up to a one-way latency "
                         "apart (barrier), or together at a time rank 0 sends 2 RTT + 20 ms ahead (clock; 2 ranks: "
                         "with 4 or 8 the broadcast takes longer and most starts are late, which the report counts)")
    ap.add_argument("--capture", help="write rank 0's packets of each cell to PREFIX_<cell>.pcap (tcpdump)")
    ap.add_argument("--rtt-ms", type=float, help=argparse.SUPPRESS)   # worker: how far ahead a start is set
    # worker only
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int)
    ap.add_argument("--master")
    ap.add_argument("--ifname")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.mode == "worker":
        return worker(a)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.mode == "bench":
        from pysim.delayline import delayline_missing
        if (why := delayline_missing()) is not None:
            sys.exit(f"tcp_window: the delay line {why}")
        cells = []
        for rate in a.rates.split(","):
            for ranks in map(int, a.ranks.split(",")):
                for rtt in map(float, a.rtts.split(",")):
                    for cc in a.congestion.split(","):
                        t0 = time.time()
                        cell = {"rate": rate, "rtt_ms": rtt, "congestion": cc, "ranks": ranks, "sizes": sizes,
                                "rounds": a.rounds, "idle_s": a.idle_s, **measure(rate, rtt, cc, ranks, a)}
                        cells.append(cell)
                        print(f"measured {rate} rtt {rtt:g} ms {cc} {ranks} ranks in {time.time() - t0:.0f} s",
                              flush=True)
                        Path(a.json).write_text(json.dumps(cells, indent=1))
    else:
        cells = json.loads(Path(a.json).read_text())
    report(cells, a.tcp)


def report(cells: list[dict], settings: str) -> list[dict]:
    """Prints model/real - 1 per cell and returns the rows."""
    print(f"model / real - 1 (fastest repetition per size); no TCP model | TCP model <congestion>{settings}")
    rows = []
    for c in cells:
        model = parse_tcp(c["congestion"] + settings)
        plain = Network.uniform(c["ranks"], parse_bandwidth(c["rate"]), c["rtt_ms"] / 2e3, framing="tcp")
        without = model_times(plain, c["sizes"], c["rounds"], c["idle_s"])
        with_tcp = model_times(plain.with_tcp(model), c["sizes"], c["rounds"], c["idle_s"])
        for mode in ("back_to_back", "after_idle"):
            cells_txt = []
            for i, s in enumerate(c["sizes"]):
                real = c["real"][mode][i]
                cells_txt.append(f"{s / 1e6:g} MB {real * 1e3:7.1f} ms: {100 * (without[mode][i] / real - 1):+5.1f}%"
                                 f" | {100 * (with_tcp[mode][i] / real - 1):+5.1f}%")
            print(f"{c['rate']:>8} rtt {c['rtt_ms']:>4g} ms {c['congestion']:>5} {c['ranks']} ranks "
                  f"{mode:>12}: " + "; ".join(cells_txt))
        if c.get("late_starts"):
            print(f"    {c['late_starts']} all-reduces started late (the start time arrived after it)")
            rows.append({"cell": {k: c[k] for k in ("rate", "rtt_ms", "congestion", "ranks")}, "mode": mode,
                         "real_s": c["real"][mode], "model_plain_s": without[mode], "model_tcp_s": with_tcp[mode]})
        if any(c["drops"].values()):
            print(f"    delay line drops: {c['drops']}")
    return rows


if __name__ == "__main__":
    main()
