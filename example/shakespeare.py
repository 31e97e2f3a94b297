"""Train a character-level GPT on Tiny Shakespeare on N simulated nodes and compare strategies.

    python example/shakespeare.py                          # defaults: 4 nodes, 100 Mbit/s, 20 ms
    python example/shakespeare.py --strategies "SimpleReduce; DiLoCo(H=20)" --bandwidth 1Gbps
    python -m pysim sweep runs/shakespeare                 # where does each strategy win?

The model is a nanoGPT-style decoder (4 layers, 4 heads, 128 wide, context
64: 0.8M parameters) on the first 90% of the text; the metric is the
validation loss in nats per character (bits per character beside it) on the
last 10%. Prints the same table as example/mnist.py and writes results,
traces and a plot to --out.
"""

from __future__ import annotations

import argparse
import sys

from pysim.compare import main
from pysim.workload import shakespeare_workload

STRATEGIES = "SimpleReduce; DiLoCo(H=20); SPARTA(p=0.005)"


def build(a: argparse.Namespace):
    return shakespeare_workload(a.data_dir, **({} if a.lr is None else {"lr": a.lr}))


if __name__ == "__main__":
    sys.exit(main(None, __doc__, build, "Tiny Shakespeare", strategies=STRATEGIES, steps=500, batch_size=16,
                  eval_every=25, eval_subset=64, seeds=1, out="runs/shakespeare", nodes=4))
