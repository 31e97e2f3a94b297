"""Write your own strategy: gradients averaged as 8-bit integer codes.

A strategy is a local optimizer step plus a list of communication steps. This one
adds one step before the local step: every node scales its gradient by a scale
shared by all nodes (the largest node's max|g| / 127), rounds it to integers in
[-127, 127] and all-reduces the codes. The codes travel as fp16, which holds them
(and their sums over up to 16 nodes) exactly, so 2 bytes per value cross the wire.
Subclassing Strategy registers it: ``make_strategy("Int8")`` and ``--strategies Int8`` work.
A step's ``check`` refuses, in one line before any node starts, what it cannot run: here, more
than 16 nodes.

    python example/custom_strategy.py            # SimpleReduce vs Int8 on MNIST: 2 nodes, 1 seed, 200 steps
    python -m pysim compare --import example/custom_strategy.py --strategies "SimpleReduce; Int8"
    python -m pysim sweep runs/custom_strategy   # where does Int8 win?
"""

import sys

import torch

from pysim.cli import main
from pysim.compress import DenseCodec
from pysim.strategies import CommStep, Strategy

FP32, FP16 = DenseCodec("fp32"), DenseCodec("fp16")


class AverageInt8Gradients(CommStep):
    label = "codes as fp16"

    def check(self, nodes: int, model, optimizer) -> None:
        """Refuses, before any node starts, a run whose sums fp16 could not hold exactly."""
        if nodes > 16:   # |a sum of codes| <= 127 * nodes; fp16 holds every integer up to 2048
            raise ValueError(f"Int8's codes travel as fp16, whose integers are exact up to 2048: at most 16 nodes "
                             f"(127 x 16 = 2032), got {nodes}")

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        flat = s.flat_grads()
        with s.compute():
            my_scale = flat.abs().max().clamp_min(1e-12).reshape(1) / 127
        scales = s.comm.allgather(FP32.pack(my_scale))  # every node's scale, one small packet each
        with s.compute():
            scale = max(float(FP32.unpack(p)) for p in scales)
            codes = torch.round(flat / scale)
        s.set_grads(s.comm.allreduce_mean(codes, FP16) * scale)


class Int8(Strategy):
    """Gradients averaged as int8 codes on a shared scale, then the inner optimizer steps."""

    def __init__(self) -> None:
        self.comm_steps = (AverageInt8Gradients(),)


if __name__ == "__main__":
    sys.exit(main(["compare", "--workload", "mnist", "--strategies", "SimpleReduce; Int8", "--seeds", "1",
                   "--steps", "200", "--out", "runs/custom_strategy", "--title", "Int8 gradients", *sys.argv[1:]]))
