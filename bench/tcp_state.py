"""Linux's own view of gloo's connections over the delay line: window, RTO and smoothed RTT (issue 22).

    sudo python3 bench/tcp_state.py 100     # round trip in ms; 2 ranks, 100 Mbit/s, reno

The sequence of bench/tcp_window.py (0.1, 1, 4 and 10 MB all-reduces, two rounds back to
back, then two rounds each after 1 s idle), with ``ss -tin`` read on rank 0 before the
barrier that precedes each all-reduce, after it (the barrier's first send is where Linux
restarts an idle window) and after the all-reduce. What pysim.tcp's window, RTO and SRTT
rules were checked against (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PORT = 29633
SIZES = [100_000, 1_000_000, 4_000_000, 10_000_000]
FIELDS = ("cwnd", "rto", "rtt", "ssthresh", "bytes_sent")


def connections() -> list[dict[str, str]]:
    """This namespace's established TCP connections that sent more than 100 kB: ss's fields."""
    out = subprocess.run(["ss", "-tin", "state", "established"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        fields = dict(tok.split(":", 1) for tok in line.split() if tok.split(":", 1)[0] in FIELDS and ":" in tok)
        if int(fields.get("bytes_sent", "0") or 0) > 100_000:
            rows.append(fields)
    return rows


def worker(rank: int, master: str, ifname: str, out: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    tensors = [torch.ones(s // 4) for s in SIZES]
    for x in tensors:
        dist.all_reduce(x)
    log = []
    for mode, idle in (("back_to_back", 0.0), ("after_idle", 1.0)):
        for _ in range(2):
            for size, x in zip(SIZES, tensors, strict=True):
                time.sleep(idle)
                before = connections()
                dist.barrier()
                restarted = connections()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                took = time.perf_counter() - t0
                log.append({"mode": mode, "size": size, "took_s": took, "before": before, "after_barrier": restarted,
                            "after": connections()})
                dist.all_reduce(torch.tensor([took], dtype=torch.float64), op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps(log, indent=1))
    dist.destroy_process_group()


def show(rows: list[dict[str, str]]) -> str:
    return " ".join(f"[cwnd {r.get('cwnd')} rto {r.get('rto')} srtt/var {r.get('rtt')} ssthresh "
                    f"{r.get('ssthresh', '-')}]" for r in rows)


def main(rtt_ms: float) -> None:
    from pysim.delayline import DelayLine

    out = f"/tmp/pysim_tcp_state_{rtt_ms:g}.json"
    with DelayLine(2, "100mbit", f"{rtt_ms / 2:g}ms", congestion="reno", name="pysimss", overhead_bytes=14) as dl:
        argv = [sys.executable, __file__, "worker", f"{dl.addr(0)}:{PORT}", out]
        procs = [subprocess.Popen(dl.command(r, argv + [str(r), dl.dev(r)]), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)]
        errors = [p.communicate(timeout=600)[1] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit(f"tcp_state: a rank failed: {[e[-800:] for e in errors if e]}")
    for e in json.loads(Path(out).read_text()):
        print(f"{e['mode']:>12} {e['size'] / 1e6:g} MB {e['took_s'] * 1e3:7.1f} ms | before {show(e['before'])} | "
              f"after the barrier {show(e['after_barrier'])} | after {show(e['after'])}")


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[4]), sys.argv[2], sys.argv[5], sys.argv[3])
    else:
        main(float(sys.argv[1]))
