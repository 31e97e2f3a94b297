"""Simulated vs real time of gloo all-reduces over a tbf-shaped veth link (issue 10).

    sudo python bench/calibrate.py            # needs root and iproute2 (ip, tc)

For each TCP congestion control (reno, then the host's default) and rate
(100 Mbit/s, 1 Gbit/s): build two network namespaces joined by a veth pair
shaped with tbf (:class:`pysim.calibrate.ShapedVeth`; traffic stays inside
them; tbf burst 16 KiB), calibrate the link with ``python -m pysim
calibrate`` on one set of sizes (256 KiB, 512 KiB, 2 MiB, 6 MiB, 8 MiB), then
time 2-rank all-reduces of 1, 4 and 10 MB (held out from the fit) with
torch.distributed.all_reduce (gloo) and with pysim's own ring all-reduce
(fastest of at least 9 repetitions, repeated until 20 s have passed: 9 at
100 Mbit/s, 50-67 at 1 Gbit/s; every size's repetitions spread over the run),
and compare with the calibrated model.
Targets: model within +-2% of gloo; pysim's transport within 10% of gloo at 10 MB.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pysim.calibrate import ShapedVeth, model_allreduce_s, veth_missing
from pysim.network import format_bandwidth, load_network_file

FIT_SIZES = "262144,524288,2097152,6291456,8388608"
TEST_SIZES = (1_000_000, 4_000_000, 10_000_000)


def bench_rate(rate: str, reps: int, seconds: float, tmp: Path, burst: str | None = None, stat: str = "min",
               congestion: str | None = None) -> list[str]:
    net_file, timings = tmp / f"{rate}.json", tmp / f"{rate}_times.json"
    timing = ["--reps", str(reps), "--seconds", str(seconds), "--stat", stat]
    with ShapedVeth(rate, name="pysimbench", burst=burst, congestion=congestion) as link:
        fit = link.calibrate(["--sizes", FIT_SIZES, *timing, "--out", str(net_file)])
        if fit.returncode != 0:
            raise RuntimeError(fit.stderr[-2000:])
        run = link.calibrate(["--sizes", ",".join(map(str, TEST_SIZES)), *timing, "--pysim",
                              "--out", str(tmp / "unused.json"), "--json", str(timings)], port=29578)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
    net = load_network_file(net_file)
    t = json.loads(timings.read_text())
    lk = net.links[0]
    cc = json.loads(net_file.read_text())["calibration"]["tcp_congestion_control"]
    rows = [f"tcp {cc}{'' if congestion else ' (host default)'}, tbf {rate} burst {link.burst}: "
            f"calibrated {format_bandwidth(lk.up_bps)}, "
            f"latency {lk.latency_s * 1e6:.0f} us, framing {net.framing_name()}; held-out sizes: {stat} of {t['reps']}"]
    for size, real, own in zip(t["sizes"], t["torch"], t["pysim"], strict=True):
        model = model_allreduce_s(net, size)
        err = 100 * (model / real - 1)
        rows.append(f"  {size / 1e6:5.0f} MB  gloo {real:8.4f} s  model {model:8.4f} s ({err:+5.1f}%)"
                    f"  pysim transport {own:8.4f} s ({100 * (own / real - 1):+5.1f}% vs gloo)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100mbit,1gbit", help="tbf rates (tc syntax)")
    ap.add_argument("--reps", type=int, default=9, help="repetitions per size, at least")
    ap.add_argument("--seconds", type=float, default=20.0, help="and repeat until this many seconds have passed")
    ap.add_argument("--stat", choices=("min", "median"), default="min", help="per size: fastest or median repetition")
    ap.add_argument("--burst", default=None, help="tbf burst (tc syntax, e.g. 4kb; default: 16 KiB)")
    ap.add_argument("--congestion", default="reno,host",
                    help="TCP congestion controls to run with, in turn (host: the host's default)")
    a = ap.parse_args()
    why = veth_missing()
    if why:
        print(f"cannot build the shaped link: {why}", file=sys.stderr)
        return 2
    controls = [c.strip() for c in a.congestion.split(",") if c.strip()]
    rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        for cc in controls:
            for rate in rates:
                try:
                    rows = bench_rate(rate, a.reps, a.seconds, Path(tmp), a.burst, a.stat, None if cc == "host" else cc)
                except ValueError as e:   # a bad rate, an unknown or unavailable congestion control
                    print(f"bench/calibrate.py: {e}", file=sys.stderr)
                    return 2
                print("\n".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
