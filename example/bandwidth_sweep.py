"""Where does each strategy win? Re-times the MNIST runs over a grid of links.

    python example/bandwidth_sweep.py                  # trains runs/mnist first if it is missing
    python example/bandwidth_sweep.py --bandwidths 1Mbit:10Gbit:30 --latencies 1ms,20ms,100ms

Replay needs no retraining: each run's trace is re-timed under every grid
point in well under a second. Outputs (table, crossover bandwidths, CSV,
JSON, plots) go to --out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pysim.cli import main as pysim_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/mnist", help="folder of recorded runs (trained if empty)")
    ap.add_argument("--bandwidths", default="10Mbit:100Gbit:20")
    ap.add_argument("--latencies", default="0.1ms:200ms:10")
    ap.add_argument("--target", default=None, help="default: the runs' own (accuracy>=0.98 for MNIST)")
    ap.add_argument("--out", default="runs/sweep_out")
    a = ap.parse_args()
    runs = Path(a.runs)
    if not any(runs.glob("*/manifest.json")):
        print(f"no recorded runs in {runs}: training the example/mnist.py defaults first")
        mnist = Path(__file__).with_name("mnist.py")
        if subprocess.run([sys.executable, str(mnist), "--out", str(runs)]).returncode:
            return 1
    target = [] if a.target is None else ["--target", a.target]
    return pysim_main(["sweep", str(runs), "--bandwidths", a.bandwidths, "--latencies", a.latencies, *target,
                       "--out", a.out])


if __name__ == "__main__":
    sys.exit(main())
