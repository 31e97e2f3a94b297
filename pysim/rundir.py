"""Run directories: results saved and loaded whole, nothing half-written, nothing mismatched.

A run is saved as a *run directory* ``OUT/<name>/``::

    result.json     the result (config, per-step rows, evaluations, final numbers, run id)
    trace.json      the trace (what the nodes did; replayed under other networks)
    steps.csv       per-step rows and evaluations, for spreadsheets
    manifest.json   format version, run id, config, and the SHA-256 and size (bytes) of each file above

Every file is written atomically (:func:`pysim.atomic.atomic_write_bytes`: a temporary file in
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
import os
import re
import tempfile
import uuid
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from pysim.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from pysim.result import READS_RESULT_VERSIONS, RESULT_VERSION, Result
from pysim.trace import Trace

RUN_FORMAT = "pysim-run"
RUN_FORMAT_VERSION = 1
RESULT_FILE, TRACE_FILE, STEPS_FILE, MANIFEST_FILE = "result.json", "trace.json", "steps.csv", "manifest.json"
RUN_FILES = (RESULT_FILE, TRACE_FILE, STEPS_FILE, MANIFEST_FILE)


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Creates the output folder if needed and proves it writable (a probe file is written and
    removed), so a bad ``--out`` (or ``flag``) fails before any training, not after. One-line
    ValueError if not."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output folder {p} is an existing file, not a folder; give a folder path ({flag})")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".pysim-write-probe-")
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write results to {p}: {e.strerror or e}; give a writable folder ({flag})") from None
    return p


MAX_NAME = 200   # characters of a run's folder name (file systems take 255 bytes, and a seed suffix)


def unique_run_dirs(paths) -> list[Path]:
    """The run directories at every path of ``paths`` (see :func:`run_dirs`), each once."""
    dirs: dict[Path, Path] = {}   # resolved -> as found
    for p in paths:
        for d in run_dirs(p):
            dirs.setdefault(d.resolve(), d)
    return list(dirs.values())


def run_dir_name(name: str) -> str:
    """The folder name of a run called ``name`` (a strategy or a label): unsafe characters become '_'."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(name)).strip()
    if safe in ("", ".", ".."):
        raise ValueError(f"run name {name!r} cannot name a folder; give the run a label")
    if len(safe) > MAX_NAME:
        raise ValueError(f"run name {safe[:40]}... is {len(safe)} characters; a folder's name takes at most "
                         f"{MAX_NAME}: give the run a shorter label")
    return safe


def run_path(out_dir: str | Path, name: str) -> Path:
    """Where the run called ``name`` is saved under ``out_dir``."""
    return Path(out_dir) / run_dir_name(name)


def steps_csv(result: Result) -> str:
    """Per-step rows, with every evaluation metric (``eval_<name>``) on the steps that have one."""
    ev = {e.step: e.metrics for e in result.evals}
    metrics = list(dict.fromkeys(k for m in ev.values() for k in m))
    rows = [asdict(r) for r in result.steps]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*rows[0], *(f"eval_{m}" for m in metrics)], lineterminator="\n")
    w.writeheader()
    for row in rows:
        e = ev.get(row["step"], {})
        w.writerow({**row, **{f"eval_{m}": e.get(m, "") for m in metrics}})
    return buf.getvalue()


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def save_result(result: Result, out_dir: str | Path) -> Result:
    """Saves a run (its trace too) as ``out_dir/<name>/`` (see the module docstring); returns the
    result as saved, with its new run id.

    Saving again into the same directory replaces the run as a whole; if it is
    interrupted, :func:`load_result` refuses the directory instead of mixing runs.
    """
    if result.trace is None:
        raise ValueError(f"result {result.name!r} has no trace to save")
    folder = run_path(out_dir, result.name)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a save that was killed
        if any(stale.name.startswith(f".{f}.") for f in RUN_FILES):
            stale.unlink(missing_ok=True)
    saved = replace(result, run_id=uuid.uuid4().hex)
    files = {RESULT_FILE: json.dumps(saved.to_json(), indent=1).encode(),
             TRACE_FILE: json.dumps(result.trace.to_json()).encode(),
             STEPS_FILE: steps_csv(result).encode()}
    manifest = folder / MANIFEST_FILE
    if manifest.exists():  # from here until the new manifest is written, the folder reads as incomplete
        manifest.unlink()
        fsync_dir(folder)
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    atomic_write_text(manifest, json.dumps({
        "format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "result_version": RESULT_VERSION,
        "run_id": saved.run_id, "name": result.name, "saved_at": datetime.now(timezone.utc).isoformat(),
        "config": result.config, "files": {name: _digest(data) for name, data in files.items()},
    }, indent=1))
    return saved


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


def load_result(path: str | Path) -> Result:
    """A saved run, with its trace, after checking both against the run's manifest.

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
    if manifest.get("version") != RUN_FORMAT_VERSION or manifest.get("result_version") not in READS_RESULT_VERSIONS:
        raise ValueError(f"{folder} has run format {manifest.get('version')!r} / results format version "
                         f"{manifest.get('result_version')!r}; this pysim reads {RUN_FORMAT_VERSION} / "
                         f"{', '.join(map(str, READS_RESULT_VERSIONS))}. Re-run the training with this version")
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
        body = json.loads(data[RESULT_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / RESULT_FILE} is not valid JSON ({e}); re-run the training") from None
    if not isinstance(body, dict) or body.get("version") != manifest.get("result_version") \
            or body.get("run_id") != manifest.get("run_id"):
        raise ValueError(f"{folder / RESULT_FILE} is not the result its manifest describes; re-run the training")
    try:
        trace = Trace.from_json(json.loads(data[TRACE_FILE]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / TRACE_FILE} is not valid JSON ({e}); re-run the training") from None
    try:
        return Result.from_json(body, trace)
    except ValueError as e:
        raise ValueError(f"{folder / RESULT_FILE}: {e}") from None
