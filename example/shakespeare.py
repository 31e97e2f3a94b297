"""Train a character-level GPT on Tiny Shakespeare on N simulated nodes and compare strategies.

    python example/shakespeare.py                          # defaults: 4 nodes, 100 Mbit/s, 20 ms
    python example/shakespeare.py --strategies "SimpleReduce; DiLoCo(H=20)" --bandwidth 1Gbps
    python -m pysim sweep runs/shakespeare                 # where does each strategy win?

The same as ``python -m pysim compare --workload shakespeare --strategies "..." --seeds 1``.
The model is a nanoGPT-style decoder (4 layers, 4 heads, 128 wide, context 64: 0.8M
parameters) on the first 90% of the text; the metric is the validation loss in nats per
character (bits per character beside it) on the last 10%. The workload's study defaults:
4 nodes, 500 steps of 16 sequences per node, evaluations every 25 steps on 64 windows.
"""

import sys

from pysim.cli import main

STRATEGIES = "SimpleReduce; DiLoCo(H=20); SPARTA(p=0.005)"

if __name__ == "__main__":
    sys.exit(main(["compare", "--workload", "shakespeare", "--strategies", STRATEGIES, "--seeds", "1",
                   "--out", "runs/shakespeare", "--title", "Tiny Shakespeare", *sys.argv[1:]]))
