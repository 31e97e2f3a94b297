"""Saving and loading results: nothing half-written, nothing mismatched.

A run is saved as a *run directory* ``OUT/<name>/``::

    result.json     the result (config, per-step rows, evaluations, final numbers, run id)
    trace.json      the trace (what the nodes did; replayed under other networks)
    steps.csv       per-step rows and evaluations, for spreadsheets
    manifest.json   format version, run id, config, and the SHA-256 and size (bytes) of each file above

Every file is written atomically (:func:`atomic_write_bytes`: a temporary file in
the same folder, fsync, then ``os.replace``), so a reader sees either the old
complete file or the new complete one, never a truncated one. The manifest is
removed before the files are replaced and written last, so a manifest that is
present always describes the files beside it: :func:`load_result` checks every
hash and refuses a run that is incomplete, stale or mixed with another run's
files, with a one-line ValueError that says what to do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pysim.trace import Trace
from pysim.workload import Target

RESULT_VERSION = 2   # 2: result.json lives in a run directory with a manifest and carries a run id
RUN_FORMAT = "pysim-run"
RUN_FORMAT_VERSION = 1
RESULT_FILE, TRACE_FILE, STEPS_FILE, MANIFEST_FILE = "result.json", "trace.json", "steps.csv", "manifest.json"
RUN_FILES = (RESULT_FILE, TRACE_FILE, STEPS_FILE, MANIFEST_FILE)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_current_umask()  # what open(path, "w") would give a new file


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk
    (fsync), and the temporary file is renamed over ``path`` (``os.replace``,
    atomic on POSIX); the folder is then fsynced so the rename survives a crash.
    An existing file keeps its permissions; a new one gets the usual umask ones.
    """
    path = Path(path)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    mode = path.stat().st_mode & 0o7777 if path.is_file() else _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded (UTF-8 by default)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs a str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out_dir(path: str | Path) -> Path:
    """Creates the output folder if needed and proves it writable (a probe file is written and
    removed), so a bad ``--out`` fails before any training, not after. One-line ValueError if not."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output folder {p} is an existing file, not a folder; give a folder path (--out)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".pysim-write-probe-")
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write results to {p}: {e.strerror or e}; give a writable folder (--out)") from None
    return p


def run_dir_name(name: str) -> str:
    """The folder name of a run called ``name`` (a strategy or a label): unsafe characters become '_'."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(name)).strip()
    if safe in ("", ".", ".."):
        raise ValueError(f"run name {name!r} cannot name a folder; give the run a label")
    return safe


def run_path(out_dir: str | Path, name: str) -> Path:
    """Where the run called ``name`` is saved under ``out_dir``."""
    return Path(out_dir) / run_dir_name(name)


def steps_csv(result: dict) -> str:
    """Per-step rows, with every evaluation metric (``eval_<name>``) on the steps that have one."""
    ev = {e["step"]: e["metrics"] for e in result["evals"]}
    metrics = list(dict.fromkeys(k for m in ev.values() for k in m))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*result["steps"][0], *(f"eval_{m}" for m in metrics)], lineterminator="\n")
    w.writeheader()
    for row in result["steps"]:
        e = ev.get(row["step"], {})
        w.writerow({**row, **{f"eval_{m}": e.get(m, "") for m in metrics}})
    return buf.getvalue()


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def save_result(result: dict, trace: Trace, out_dir: str | Path) -> Path:
    """Saves a run as ``out_dir/<name>/`` (see the module docstring); returns that run directory.

    A new run id is given to the saved result (``result.json``'s ``run_id``).
    Saving again into the same directory replaces the run as a whole; if it is
    interrupted, :func:`load_result` refuses the directory instead of mixing runs.
    """
    folder = run_path(out_dir, result["name"])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a save that was killed
        if any(stale.name.startswith(f".{f}.") for f in RUN_FILES):
            stale.unlink(missing_ok=True)
    run_id = uuid.uuid4().hex
    body = {k: v for k, v in result.items() if k != "trace"}
    body["run_id"] = run_id
    files = {RESULT_FILE: json.dumps(body, indent=1).encode(),
             TRACE_FILE: json.dumps(trace.to_json()).encode(),
             STEPS_FILE: steps_csv(result).encode()}
    manifest = folder / MANIFEST_FILE
    if manifest.exists():  # from here until the new manifest is written, the folder reads as incomplete
        manifest.unlink()
        _fsync_dir(folder)
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    atomic_write_text(manifest, json.dumps({
        "format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "result_version": RESULT_VERSION,
        "run_id": run_id, "name": result["name"], "saved_at": datetime.now(timezone.utc).isoformat(),
        "config": result.get("config"), "files": {name: _digest(data) for name, data in files.items()},
    }, indent=1))
    return folder


def find_run_dir(path: str | Path) -> Path:
    """The run directory ``path`` names: the directory itself, or the one holding one of its files."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.name in RUN_FILES and p.parent.is_dir():
        return p.parent
    if not p.exists():
        raise ValueError(f"no run at {p}: give a run folder (OUT/<name>/ with manifest.json)")
    raise ValueError(f"{p} is not a pysim run: runs are folders OUT/<name>/ with manifest.json "
                     "(results saved by an older pysim must be re-run)")


def run_dirs(path: str | Path) -> list[Path]:
    """The run directories at ``path``: the run itself, or the runs one level below a folder.

    A sub-folder that holds run files but no manifest is an interrupted save:
    it is refused (ValueError), not skipped. Other files (e.g. a sweep's own
    outputs) are ignored.
    """
    p = Path(path)
    if not p.is_dir() or (p / MANIFEST_FILE).is_file() or any((p / f).exists() for f in RUN_FILES):
        return [find_run_dir(p)]
    found = []
    for sub in sorted(q for q in p.iterdir() if q.is_dir()):
        if (sub / MANIFEST_FILE).is_file():
            found.append(sub)
        elif any((sub / f).exists() for f in RUN_FILES):
            raise ValueError(f"{sub} is an incomplete run (no {MANIFEST_FILE}: saving was interrupted); "
                             "delete it or re-run that training")
    if not found:
        raise ValueError(f"no pysim runs in {p}: a run is a folder with {MANIFEST_FILE} "
                         "(results saved by an older pysim must be re-run)")
    return found


def load_result(path: str | Path) -> tuple[dict, Trace]:
    """A saved run's (result, trace), after checking both against the run's manifest.

    ``path`` is a run directory or one of its files. One-line ValueError when
    the manifest is missing or of another format version, or a file is missing
    or does not match its recorded SHA-256 (stale, truncated, or another run's).
    """
    folder = find_run_dir(path)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        raise ValueError(f"{folder} has no {MANIFEST_FILE}: not a complete pysim run (saving was interrupted, "
                         "or it was saved by an older pysim); re-run the training")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); re-run the training") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise ValueError(f"{mpath} is not a pysim run manifest; re-run the training")
    if manifest.get("version") != RUN_FORMAT_VERSION or manifest.get("result_version") != RESULT_VERSION:
        raise ValueError(f"{folder} has run format {manifest.get('version')!r} / results format version "
                         f"{manifest.get('result_version')!r}; this pysim reads {RUN_FORMAT_VERSION} / "
                         f"{RESULT_VERSION}. Re-run the training with this version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {RESULT_FILE, TRACE_FILE} <= files.keys():
        raise ValueError(f"{mpath} does not list {RESULT_FILE} and {TRACE_FILE}; re-run the training")
    data = {}
    for name, expected in files.items():
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{folder}: {name} is missing; the run is incomplete, re-run the training")
        data[name] = f.read_bytes()
        if _digest(data[name]) != expected:
            raise ValueError(f"{folder}: {name} does not match {MANIFEST_FILE} (stale, truncated or from another "
                             "run); re-run the training into this folder")
    try:
        result = json.loads(data[RESULT_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / RESULT_FILE} is not valid JSON ({e}); re-run the training") from None
    if not isinstance(result, dict) or result.get("version") != RESULT_VERSION \
            or result.get("run_id") != manifest.get("run_id"):
        raise ValueError(f"{folder / RESULT_FILE} is not the result its manifest describes; re-run the training")
    try:
        trace = Trace.from_json(json.loads(data[TRACE_FILE]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / TRACE_FILE} is not valid JSON ({e}); re-run the training") from None
    return result, trace


def crossing_step(evals: list[tuple[int, float]], target: Target) -> tuple[float, int, int] | None:
    """Where the metric first reaches ``target``: (step, step of the evaluation before, step of the
    first evaluation at or past it), None if never. Evaluations one step apart (the node
    bisects to that resolution) give the first step that reached it, exactly; wider brackets
    are linearly interpolated in the metric between the two evaluations; before the first
    evaluation there is nothing to interpolate from (the bracket then starts at step 0 and the
    crossing is put at its end)."""
    prev = None
    for step, value in evals:
        if target.reached(value):
            if prev is None:
                return float(step), 0, step
            s0, v0 = prev
            if step - s0 <= 1:
                return float(step), s0, step
            frac = (target.value - v0) / (value - v0) if value != v0 else 1.0
            return s0 + (step - s0) * frac, s0, step
        prev = (step, value)
    return None


def time_at_step(step_end_s: np.ndarray, step: float) -> np.ndarray:
    """Simulated time at a fractional step, linear between step ends (``step_end_s[k]`` ends step
    k+1; step 0 is time 0). Works on (steps,) and (steps, networks) arrays."""
    k = min(int(math.floor(step)), len(step_end_s))
    t0 = step_end_s[k - 1] if k >= 1 else np.zeros_like(step_end_s[0])
    if step == k:
        return np.asarray(t0, dtype=np.float64)
    return t0 + (step - k) * (step_end_s[k] - t0)


def metric_series(result: dict, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` at every evaluation of a run."""
    return [(e["step"], e["metrics"][metric]) for e in result["evals"] if metric in e["metrics"]]


def time_to_target(result: dict, target: Target, step_end_s: np.ndarray | None = None
                   ) -> tuple[float, float, float] | None:
    """(time, lower, upper) in simulated seconds at which a run reached ``target``: interpolated
    between evaluations, bracketed by the evaluations around the crossing; None if never.
    ``step_end_s``: the run's step end times (default: as recorded); a replay's re-times it."""
    crossing = crossing_step(metric_series(result, target.metric), target)
    if crossing is None:
        return None
    ends = np.array([r["sim_time_s"] for r in result["steps"]]) if step_end_s is None else step_end_s
    return tuple(float(time_at_step(ends, s)) for s in crossing)  # type: ignore[return-value]


