"""Compute time of a node: measured CPU time, or FLOPs on a device profile.

Measured: per-thread CPU time (``time.thread_time``) of the work inside
:meth:`ComputeMeter.measure`. Node processes run torch with one intra-op
thread, so the calling thread does all the arithmetic and several node
processes sharing two cores do not inflate each other's time (a wall clock
would count the time a node waits for a core).

Modelled: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` for
forward + backward, divided by a device's peak rate times a utilisation.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

# Peak dense FP32/TF32-class throughput (FLOP/s) used for training, and the
# fraction of it a small model reaches. Stated, not measured.
DEVICE_PROFILES: dict[str, tuple[float, float]] = {
    "cpu": (1.0e11, 0.5),      # a few desktop cores, AVX2/AVX-512
    "t4": (8.1e12, 0.4),
    "a100": (156e12, 0.4),     # TF32 tensor cores
    "h100": (495e12, 0.4),     # TF32 tensor cores (SXM)
}


def device_flops_per_s(device: str) -> float:
    """Effective FLOP/s of a profile: peak times utilisation."""
    if device not in DEVICE_PROFILES:
        raise ValueError(f"unknown device profile {device!r}; use one of {', '.join(DEVICE_PROFILES)} "
                         "or 'measured'")
    peak, util = DEVICE_PROFILES[device]
    return peak * util


class ComputeMeter:
    """Accumulates compute seconds (thread CPU time) and FLOPs until taken."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.flops_per_s = device_flops_per_s(device) if device else None
        self.seconds = 0.0
        self.flops = 0.0

    @contextmanager
    def measure(self, flops: float = 0.0):
        """Times the body on this thread's CPU clock; ``flops`` is its counted work."""
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.seconds += time.thread_time() - t0
            self.flops += flops

    def take(self) -> tuple[float, float]:
        """(seconds, flops) since the last take; seconds follow the device profile if set."""
        seconds, flops = self.seconds, self.flops
        self.seconds = self.flops = 0.0
        if self.flops_per_s is not None:
            seconds = flops / self.flops_per_s
        return seconds, flops


def count_flops(fn) -> float:
    """FLOPs torch executes in ``fn()`` (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
