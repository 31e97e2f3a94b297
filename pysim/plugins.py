"""A user's own code, loaded by name: ``--import MODULE`` and ``--workload package.module:function``.

A module is a dotted name on ``sys.path`` (``mystrategies``) or the path of a
Python file (``example/custom_strategy.py``, imported under its file name with
its folder put on ``sys.path``). Importing it registers what it defines:
:class:`pysim.strategies.Strategy` subclasses (``--strategies``) and
workloads given to :func:`pysim.workload.register_workload` (``--workload``).

Every module loaded here is recorded (:func:`loaded`), and node processes
import the same modules before they read their job (:func:`import_all`), so a
strategy or workload defined in it exists there too.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

from pysim.workload import WORKLOADS, Workload, get_workload

#: (module name, folder put on sys.path or None) of every module loaded by :func:`load_module`.
_LOADED: list[tuple[str, str | None]] = []


def load_module(spec: str) -> ModuleType:
    """Imports a module given by dotted name or ``.py`` file path; one-line ValueError if it
    cannot be imported (not found, or its code raised)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--import takes a module name or a .py file, got {spec!r}")
    spec = spec.strip()
    folder = None
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"cannot import {spec}: no such file")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", path.stem):
            raise ValueError(f"cannot import {spec}: {path.stem!r} is not a module name; rename the file")
        folder, name = str(path.resolve().parent), path.stem
    else:
        name = spec
    module = _import(name, folder, spec)
    if (name, folder) not in _LOADED:
        _LOADED.append((name, folder))
    return module


def _import(name: str, folder: str | None, spec: str) -> ModuleType:
    if folder is not None and folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ValueError(f"cannot import {spec}: no module named {e.name!r} (is it on PYTHONPATH, or give "
                             "its .py file)") from None
        raise ValueError(f"cannot import {spec}: it needs {e.name!r}, which is not installed") from None
    except Exception as e:   # the user's module raised while it was imported
        raise ValueError(f"importing {spec} failed: {type(e).__name__}: {e}") from None


def loaded() -> tuple[tuple[str, str | None], ...]:
    """The modules loaded so far, for node processes to import (:func:`import_all`)."""
    return tuple(_LOADED)


def import_all(modules: tuple[tuple[str, str | None], ...]) -> None:
    """Imports what :func:`loaded` listed in another process (a node's)."""
    for name, folder in modules:
        _import(name, folder, name)
        if (name, folder) not in _LOADED:
            _LOADED.append((name, folder))


def resolve_workload(spec: str, data_dir: str | None = None, lr: float | None = None) -> Workload:
    """The workload a ``--workload`` names: a built-in (``mnist``, ``idx:DIR``,
    ``shakespeare[:DIR]``; ``data_dir`` and ``lr`` go to it), a registered name, or
    ``package.module:function`` (a module-level function of no arguments returning a
    :class:`Workload`, or a Workload object)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--workload is empty; give mnist, shakespeare, idx:DIR or package.module:function")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind in ("mnist", "idx", "shakespeare"):
        if data_dir is not None and not arg:
            spec = "idx:" + data_dir if kind == "mnist" else f"{kind}:{data_dir}"
        return get_workload(spec, **({} if lr is None else {"lr": lr}))
    if lr is not None or data_dir is not None:
        raise ValueError(f"--lr and --data-dir configure the built-in workloads; {spec!r} sets its own")
    if spec in WORKLOADS:
        return _as_workload(WORKLOADS[spec], spec)
    if arg and re.fullmatch(r"[A-Za-z_][\w.]*", kind) and re.fullmatch(r"[A-Za-z_]\w*", arg):
        module = load_module(kind)
        if not hasattr(module, arg):
            raise ValueError(f"--workload {spec}: module {kind} has no {arg!r}")
        return _as_workload(getattr(module, arg), spec)
    return get_workload(spec)   # its error names every known workload


def _as_workload(obj: object, spec: str) -> Workload:
    if isinstance(obj, Workload):
        return obj
    if not callable(obj):
        raise ValueError(f"--workload {spec}: expected a Workload or a function returning one, got "
                         f"{type(obj).__name__}")
    try:
        wl = obj()
    except Exception as e:
        raise ValueError(f"--workload {spec}: calling it raised {type(e).__name__}: {e}") from None
    if not isinstance(wl, Workload):
        raise ValueError(f"--workload {spec}: the function returned {type(wl).__name__}, not a pysim.Workload")
    return wl
