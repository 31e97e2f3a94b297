"""The process-wide random number generators, saved and restored as the nodes of a process take turns.

torch's default generator, Python's ``random`` and NumPy's legacy global
``RandomState`` belong to the process, not to a node; :class:`pysim.host.Host`
saves them when a node passes the turn and restores them when it gets it back,
so each node draws what it would alone in a process. That happens once per node
per collective, so it must be cheap: torch's state is a 5 KB tensor (1 us each
way) and Python's a 625-tuple (about 10 us), but NumPy's ``get_state`` and
``set_state`` copy the Mersenne Twister's 624 words one by one (about 50 us
each way, most of a turn's cost).

NumPy's state is therefore compared before it is copied: its raw Mersenne
Twister words (2,500 bytes at the bit generator's ``ctypes.state_address``)
are read with one memcpy, and when they are what the node was given and no
Gaussian was cached, the node did not draw and its state is the one it was
given (a draw always moves the words; a cached Gaussian, the one part of the
legacy state outside them, is only ever made by a draw). Otherwise the exact
``get_state`` runs. Restoring writes the 2,500 bytes back where neither the
state restored nor the one it replaces (checked the same way) holds a cached
Gaussian, else runs ``set_state``. The one change this cannot
see is a node calling ``np.random.set_state`` with the very words it already
had but a cached Gaussian added; any other use of the generator is exact.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass

import numpy as np
import torch

_MT_BYTES = 624 * 4 + 4    # sizeof(mt19937_state): key[624] (uint32), pos (int)


@dataclass(frozen=True)
class _NumpyState:
    """NumPy's legacy global state: the exact ``get_state`` tuple, and its raw words when the
    generator is the usual MT19937 with no cached Gaussian (then ``words`` alone restore it)."""

    full: tuple
    generator: object | None      # the bit generator ``words`` belong to
    words: bytes | None


@dataclass(frozen=True)
class RNGState:
    """The three generators' states at one moment."""

    torch_state: torch.Tensor
    python: tuple
    numpy: _NumpyState


_READABLE: dict[int, bool] = {}    # id of a bit generator -> whether its raw state reads as its own state


def _mt19937() -> tuple[object, int] | None:
    """NumPy's global bit generator and the address of its state, if it is an MT19937 whose raw
    words read back as the state NumPy itself reports (checked once per generator; else None,
    and the exact calls are used)."""
    get = getattr(np.random, "get_bit_generator", None)    # NumPy >= 1.25
    if get is None:
        return None
    generator = get()
    if type(generator).__name__ != "MT19937":
        return None
    address = generator.ctypes.state_address
    readable = _READABLE.get(id(generator))
    if readable is None:
        state = generator.state["state"]
        expected = np.asarray(state["key"], dtype=np.uint32).tobytes() + np.int32(state["pos"]).tobytes()
        readable = _READABLE[id(generator)] = ctypes.string_at(address, _MT_BYTES) == expected
    return (generator, address) if readable else None


class GlobalRNG:
    """Saves and restores the process's generators (one per process: they are its globals)."""

    def __init__(self) -> None:
        self._numpy_now: _NumpyState | None = None    # what NumPy's global state is known to be

    def save(self) -> RNGState:
        return RNGState(torch.get_rng_state(), random.getstate(), self._save_numpy())

    def load(self, state: RNGState) -> None:
        torch.set_rng_state(state.torch_state)
        random.setstate(state.python)
        self._load_numpy(state.numpy)

    def _save_numpy(self) -> _NumpyState:
        mt = _mt19937()
        known = self._numpy_now
        if mt is not None and known is not None and known.generator is mt[0] and known.words is not None \
                and ctypes.string_at(mt[1], _MT_BYTES) == known.words:
            return known     # not drawn from since it was known: the same state
        full = np.random.get_state()
        words = ctypes.string_at(mt[1], _MT_BYTES) if mt is not None and full[3] == 0 else None
        self._numpy_now = _NumpyState(full, None if mt is None else mt[0], words)
        return self._numpy_now

    def _load_numpy(self, state: _NumpyState) -> None:
        mt = _mt19937()
        known = self._numpy_now
        if mt is not None and state.words is not None and state.generator is mt[0] and known is not None \
                and known.words is not None and known.generator is mt[0] \
                and ctypes.string_at(mt[1], _MT_BYTES) == known.words:
            # the global state is ``known`` (not drawn from since), and neither it nor ``state``
            # holds a cached Gaussian: the words are the whole difference
            if state.words != known.words:
                ctypes.memmove(mt[1], state.words, _MT_BYTES)
        else:
            np.random.set_state(state.full)
        self._numpy_now = state
