"""Work that torch's dispatcher cannot see, reported for counting.

pysim's C++ kernels (codecs, ring pieces, the CNN's pooling) run on buffers
outside torch. Each reports the bytes it read and wrote and its FLOPs with
:func:`record_native_kernel`, which adds them to the innermost counting block
this thread has open (:func:`pysim.compute.counting` and the compute meter),
so compute profiles charge that work like torch's own kernels.
"""

from __future__ import annotations

import threading
from typing import Any

_counting = threading.local()   # .open: this thread's open counters, innermost last


def open_counters() -> list[Any]:
    """This thread's open counters (objects with ``kernels``, ``bytes`` and ``native_flops``), innermost last."""
    if not hasattr(_counting, "open"):
        _counting.open = []
    return _counting.open


def record_native_kernel(bytes_moved: float, flops: float = 0.0) -> None:
    """Adds one kernel that torch cannot see to the innermost open counter of this thread, if
    any: the bytes it read and wrote and its FLOPs."""
    counters = open_counters()
    if counters:
        counter = counters[-1]
        counter.kernels += 1
        counter.bytes += bytes_moved
        counter.native_flops += flops
