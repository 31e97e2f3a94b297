"""Checkpoints of a run in progress, so a killed run continues where it was.

Every ``checkpoint_every`` steps each node writes its whole state: model,
optimizer, learning-rate schedule, strategy (error-feedback residuals, outer
optimizer, PowerSGD's Q, collectives still in flight...), comm (the virtual
clock, the trace so far, byte counters), the position of its data sampler,
its records so far and the random number generators. They live beside the
run's results::

    OUT/<run>/checkpoint/
        config.json          the run's configuration and the code's fingerprint (a resume
                             must match both)
        step-000200/         one folder per checkpointed step
            node0.pt ...     each node's state (torch.save), written atomically

A step's checkpoint is complete when every node's file is there; a resume
takes the latest complete one, so a kill while nodes are writing falls back
to the step before. Older steps are deleted once a newer one is complete, and
the whole folder once the run's results are saved. A resumed run performs the
same arithmetic as an uninterrupted one: the same seed gives the same
accuracy and bytes and, with a compute profile (calibrated, saved or a
device), the same simulated time. That holds for the code that wrote the
checkpoint: the pickled state is that code's objects (a strategy of another
version may lack an attribute the new code reads mid-run), so a resume by
other code (another fingerprint of pysim's sources) is refused up front.

The files are pickles (``torch.load(weights_only=False)``): load checkpoints
only from runs you made.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pysim.atomic import atomic_write_bytes, atomic_write_text

CONFIG_FILE = "config.json"
_STEP_DIR = re.compile(r"step-(\d{6,})")


@dataclass(frozen=True)
class CheckpointPlan:
    """What the nodes of one run do about checkpoints: write one into ``folder`` every
    ``every`` steps (None: never) and, if ``resume_step`` > 0, start from that step's."""

    folder: str
    every: int | None
    resume_step: int = 0

    def due(self, steps_done: int, total: int) -> bool:
        """Whether a checkpoint is written after ``steps_done`` steps (not after the last)."""
        return bool(self.every) and steps_done % self.every == 0 and steps_done < total


def code_fingerprint() -> str:
    """A hash of pysim's Python code (every ``.py`` file of the package), 16 hex digits: what a
    checkpoint pickles is Python objects, so the compiled extension is left out (built for each
    host's CPU, its bytes differ between the hosts of one torchrun run). Files that are not
    regular files (an editor's lock link) are skipped."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def step_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:06d}"


def save_node_state(folder: str | Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Writes node ``rank``'s state after ``step`` steps, atomically."""
    d = step_dir(folder, step)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(d / f"node{rank}.pt", buf.getvalue())


def load_node_state(folder: str | Path, step: int, rank: int) -> dict[str, Any]:
    path = step_dir(folder, step) / f"node{rank}.pt"
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # a damaged pickle can raise almost anything
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete {folder} and "
                         "train again without --resume") from None


def complete_steps(folder: str | Path, nodes: int) -> list[int]:
    """Checkpointed steps whose every node file exists, ascending."""
    p = Path(folder)
    if not p.is_dir():
        return []
    steps = []
    for d in p.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and all((d / f"node{r}.pt").is_file() for r in range(nodes)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune(folder: str | Path, keep_step: int) -> None:
    """Removes the checkpoints of every step other than ``keep_step``."""
    p = Path(folder)
    for d in p.iterdir() if p.is_dir() else ():
        m = _STEP_DIR.fullmatch(d.name)
        if m and int(m.group(1)) != keep_step:
            shutil.rmtree(d, ignore_errors=True)


def prepare(folder: str | Path, config: dict, nodes: int, every: int | None, resume: bool) -> CheckpointPlan:
    """The plan of a run about to start. With ``resume``, the latest complete checkpoint of a run
    of the same configuration is taken (none: start at step 0); a checkpoint of another
    configuration, or written by other code, is a one-line ValueError. Without ``resume``, old
    checkpoints are cleared."""
    p = Path(folder)
    saved = p / CONFIG_FILE
    if resume and saved.is_file():
        code = code_fingerprint()
        try:
            written = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{saved} is unreadable ({e}); delete {p} and train without --resume") from None
        written_by = written.get("code") if isinstance(written, dict) else None
        if written_by != code:
            raise ValueError(f"the checkpoint in {p} was written by other pysim code (fingerprint {written_by}, "
                             f"this code {code}) whose saved state this code may not read; delete it and train "
                             "again without --resume")
        old = written.get("config")
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"the checkpoint in {p} is of another configuration (differs in {', '.join(diff)}); "
                             "resume with the same flags, or delete it and train without --resume")
        steps = complete_steps(p, nodes)
        return CheckpointPlan(str(p), every, steps[-1] if steps else 0)
    shutil.rmtree(p, ignore_errors=True)  # another run's (under torchrun every rank prepares)
    if every:
        p.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, json.dumps({"code": code_fingerprint(), "config": config}))
    return CheckpointPlan(str(p), every, 0)


def remove(folder: str | Path) -> None:
    """Deletes a run's checkpoints (its results are saved)."""
    shutil.rmtree(folder, ignore_errors=True)
