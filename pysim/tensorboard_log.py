"""A finished run as TensorBoard scalars (``--tensorboard DIR``), through ``torch.utils.tensorboard``.

Each run writes to ``DIR/<run folder name>/`` when it finishes (the figures are the
result's: the simulated times are the replay's, equal to the live clock):

- ``train/loss``: the mean training loss of the nodes that trained the step;
- ``train/bytes_sent_per_node``, ``train/bytes_received_per_node``: packet bytes so far;
- ``train/sim_time_s``: the simulated wall-clock at the end of the step;
- ``train/compute_s``, ``train/comm_s``: simulated compute and communication so far;
- ``eval/<metric>``: every evaluation of the deployed model (subset), and
  ``final/<metric>`` on the whole evaluation set at the last step.

The x axis is the training step; every event's wall time is the simulated time
at that step, so TensorBoard's "Relative" horizontal axis plots against
simulated seconds. Needs the ``tensorboard`` package (``pip install -e
".[tensorboard]"``; the README's install command adds it).
"""

from __future__ import annotations

import math
from pathlib import Path

from pysim.result import Result
from pysim.rundir import run_path

STEP_SCALARS = ("bytes_sent_per_node", "bytes_received_per_node", "sim_time_s", "compute_s", "comm_s")


def check_available() -> None:
    """A one-line ValueError now (before training) if ``torch.utils.tensorboard`` cannot write."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard (or run the "
                         "README's install command)") from None


def write_run(result: Result, root: str | Path) -> Path:
    """Writes ``result``'s scalars (see the module docstring) to an event file under
    ``root/<run name>`` (replacing that run's earlier ones); returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run_path(root, result.name)   # the name of its results folder
    for old in folder.glob("events.out.tfevents.*"):   # a run written again replaces its curves
        old.unlink()
    with SummaryWriter(str(folder)) as w:
        for row in result.steps:
            at = {"global_step": row.step, "walltime": row.sim_time_s}
            if math.isfinite(row.loss):
                w.add_scalar("train/loss", row.loss, **at)
            for name in STEP_SCALARS:
                w.add_scalar(f"train/{name}", getattr(row, name), **at)
        for e in result.evals:
            for name, value in e.metrics.items():
                w.add_scalar(f"eval/{name}", value, global_step=e.step, walltime=e.sim_time_s)
        last = result.steps[-1]
        for name, value in result.final.metrics.items():
            w.add_scalar(f"final/{name}", value, global_step=last.step, walltime=last.sim_time_s)
    return folder
