"""The shipped MNIST, decoded once in the fork server that worker processes are forked from.

:func:`pysim.launch.node_context` names this module among the fork server's
preloads. Importing it decodes ``data/mnist`` into :mod:`pysim.datasets`'s
per-process table of decoded sets, so a worker forked from the server finds it
there: the worker still reads and checks the four files (their SHA-256, 15 ms)
but does not decode them again (0.3-0.5 s per worker per run), and the workers
of a run share the set's pages (55 MB) instead of holding a copy each. Any
problem here is left to the worker's own load, which reports it: the fork
server survives only ImportError from a preload, so nothing may escape.
"""

from __future__ import annotations

from pysim import datasets

try:
    if datasets.MNIST_DIR.is_dir():
        datasets.load_image_set()
except Exception:  # noqa: BLE001 (see the module docstring)
    pass
