"""The process-wide random number generators, saved and restored as the nodes of a process take turns.

torch's default generator, Python's ``random`` and NumPy's legacy global
``RandomState`` belong to the process, not to a node; :class:`pysim.host.Host`
saves them when a node passes the turn and restores them when it gets it back,
so each node draws what it would alone in a process. That happens once per node
per collective, so it must be cheap: torch's state is a 5 KB tensor (1 us each
way), but Python's ``getstate`` builds a 625-tuple (about 9 us) and NumPy's
``get_state`` and ``set_state`` copy the Mersenne Twister's 624 words one by one
(about 50 us each way).

NumPy's legacy state is the Mersenne Twister's words and position (2,500 bytes
at the bit generator's ``ctypes.state_address``) and a cached Gaussian (a flag
and a value in the ``RandomState`` object). Both are read directly, one memcpy
and one int: when the words are those the node was given and no Gaussian is
cached, its state is exactly the one it was given, and nothing is copied;
restoring such a state writes the words back with one memcpy where no Gaussian
is cached now. Every other case runs the exact ``get_state`` / ``set_state``.
Where the flag is read from is found once per process by probing a scratch
``RandomState`` (set a cached Gaussian, see which bytes change) and the words
are checked once per generator against the state NumPy reports; if either
check fails (another NumPy, another bit generator), the exact calls are used
throughout.

Python's ``random`` is a Mersenne Twister too: its 624 words and position lie in
the C object behind the module's functions (bound to ``random._inst`` at import) and its cached
Gaussian in the instance (``gauss_next``). Where the 2,500 bytes are is found
once per process on scratch instances (two states whose words and positions
differ, both read back, one written into the other and checked with
``getstate``); a save is then one memcpy and the attribute, and a restore writes
the bytes back only where they differ. If the probe fails (another Python),
``getstate`` and ``setstate`` are used.
"""

from __future__ import annotations

import ctypes
import random
import struct
from dataclasses import dataclass

import numpy as np
import torch

_MT_BYTES = 624 * 4 + 4    # sizeof(mt19937_state): key[624] (uint32), pos (int)


def seed_torch(seed: int) -> torch.Generator:
    """``torch.manual_seed(seed)``: the same draws on the CPU, over a hundred times cheaper in a
    process without an accelerator. There, ``torch.manual_seed`` still queues a lazy seed for
    each device type it knows (CUDA, XPU, MTIA), each with a formatted stack (0.3 ms a call 40
    frames deep, 0.6-0.9 ms from a node's thread, once per node and run), for devices that can
    never start; this seeds the CPU generator alone (3 us). With an accelerator it is
    ``torch.manual_seed``."""
    if torch.accelerator.is_available():
        return torch.manual_seed(seed)
    return torch.default_generator.manual_seed(int(seed))


@dataclass(frozen=True)
class _NumpyState:
    """NumPy's legacy global state: the exact ``get_state`` tuple, and its raw words when the
    generator is the usual MT19937 with no cached Gaussian (then ``words`` alone restore it)."""

    full: tuple
    generator: object | None      # the bit generator ``words`` belong to
    words: bytes | None


@dataclass(frozen=True)
class _PythonState:
    """Python's ``random`` state: the raw words and position with the cached Gaussian, or (where
    the raw bytes cannot be read) the exact ``getstate`` tuple."""

    raw: bytes | None
    gauss: float | None
    full: tuple | None


@dataclass(frozen=True)
class RNGState:
    """The three generators' states at one moment."""

    torch_state: torch.Tensor
    python: _PythonState
    numpy: _NumpyState


def _find_gauss_flag() -> int | None:
    """Byte offset of a ``RandomState``'s cached-Gaussian flag (a C int) in the object, found on a
    scratch instance: the one int that reads 1 with a Gaussian cached and 0 without, next to the
    cached value. None if no single such int is found."""
    try:
        probe = np.random.RandomState(0)
        size = type(probe).__basicsize__
        key = probe.get_state()

        def image(flag: int, value: float) -> bytes:
            probe.set_state(key[:3] + (flag, value))
            return ctypes.string_at(id(probe), size)

        first, none, second = image(1, 1.2345678901234), image(0, 0.0), image(1, -9.87654321)
        value_at = first.find(struct.pack("d", 1.2345678901234))
        if value_at < 0 or second.find(struct.pack("d", -9.87654321)) != value_at:
            return None
        flags = [i for i in range(0, size - 3, 4) if not value_at <= i < value_at + 8
                 and first[i:i + 4] == second[i:i + 4] == struct.pack("i", 1) and none[i:i + 4] == bytes(4)]
        return flags[0] if len(flags) == 1 else None
    except Exception:  # noqa: BLE001 (any surprise: the exact calls are used)
        return None


def _find_python_words() -> int | None:
    """Byte offset, in a ``random.Random``, of the 2,500 bytes holding its Mersenne Twister's
    position (a C int) and 624 words, found and checked on scratch instances; None if the
    layout is not that one."""
    try:
        size = random.Random.__basicsize__
        a, b = random.Random(1), random.Random(2)
        a.random()                                   # a position other than the seed's
        words = a.getstate()[1]
        image = ctypes.string_at(id(a), size)
        at = image.find(struct.pack("624I", *words[:624]))
        if at < 0:
            return None
        start = at - 4                               # CPython: int index; uint32_t state[624]
        if image[start:at] != struct.pack("i", words[624]):
            return None
        ctypes.memmove(id(b) + start, id(a) + start, _MT_BYTES)
        b.gauss_next = a.gauss_next
        if b.getstate() != a.getstate() or b.random() != a.random():
            return None
        return start
    except Exception:  # noqa: BLE001 (any surprise: the exact calls are used)
        return None


_PYTHON_WORDS: list[int | None] = []         # [offset], found on first use


def _python_generator() -> random.Random | None:
    """The generator behind Python's ``random`` functions (bound to it at import: not
    ``random._inst`` if that was replaced since), where it is a plain ``random.Random``; else None."""
    inst = getattr(random.random, "__self__", None)
    return inst if type(inst) is random.Random else None


def _python_mt() -> tuple[random.Random, int] | None:
    """The generator behind Python's ``random`` functions and the address of its 2,500 state
    bytes, where they can be read (else None, and the exact calls are used)."""
    if not _PYTHON_WORDS:
        _PYTHON_WORDS.append(_find_python_words())
    inst = _python_generator()
    if _PYTHON_WORDS[0] is None or inst is None:
        return None
    return inst, id(inst) + _PYTHON_WORDS[0]


_GAUSS_FLAG: list[int | None] = []           # [offset], found on first use
_READABLE: dict[int, bool] = {}              # id of a bit generator -> whether its raw words read as its state


def _gauss_flag_address() -> int | None:
    """Address of the cached-Gaussian flag (a C int) in NumPy's global RandomState; None if it
    cannot be read."""
    if not _GAUSS_FLAG:
        _GAUSS_FLAG.append(_find_gauss_flag())
    legacy = getattr(np.random.mtrand, "_rand", None)
    if _GAUSS_FLAG[0] is None or type(legacy) is not np.random.RandomState:
        return None
    return id(legacy) + _GAUSS_FLAG[0]


def _gauss_cached() -> bool | None:
    """Whether NumPy's global RandomState holds a cached Gaussian; None if that cannot be read."""
    address = _gauss_flag_address()
    return None if address is None else ctypes.c_int.from_address(address).value != 0


def _mt19937() -> tuple[object, int] | None:
    """NumPy's global bit generator and the address of its words, where both they and the cached
    Gaussian's flag can be read (else None, and the exact calls are used)."""
    get = getattr(np.random, "get_bit_generator", None)    # NumPy >= 1.25
    if get is None or _gauss_flag_address() is None:
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


def _words(raw: bytes) -> tuple:
    """The ``getstate`` words tuple (624 words, then the position) of raw state bytes."""
    position, *words = struct.unpack("i624I", raw)
    return (*words, position)


class GlobalRNG:
    """Saves and restores the process's generators (one per process: they are its globals)."""

    def __init__(self) -> None:
        self._numpy_now: _NumpyState | None = None    # the NumPy state last saved or loaded
        self._python_now: _PythonState | None = None  # the Python state last saved or loaded

    def save(self) -> RNGState:
        return RNGState(torch.get_rng_state(), self._save_python(), self._save_numpy())

    def load(self, state: RNGState) -> None:
        torch.set_rng_state(state.torch_state)
        self._load_python(state.python)
        self._load_numpy(state.numpy)

    def _save_python(self) -> _PythonState:
        mt = _python_mt()
        if mt is None:
            return _PythonState(None, None, random.getstate())
        raw, gauss, known = ctypes.string_at(mt[1], _MT_BYTES), mt[0].gauss_next, self._python_now
        if known is not None and known.raw == raw and known.gauss is gauss:
            return known
        self._python_now = _PythonState(raw, gauss, None)
        return self._python_now

    def _load_python(self, state: _PythonState) -> None:
        mt = _python_mt()
        if mt is None or state.raw is None:
            random.setstate(state.full if state.raw is None else (3, _words(state.raw), state.gauss))
            return
        inst, address = mt
        if ctypes.string_at(address, _MT_BYTES) != state.raw:
            ctypes.memmove(address, state.raw, _MT_BYTES)
        inst.gauss_next = state.gauss
        self._python_now = state

    def _save_numpy(self) -> _NumpyState:
        mt = _mt19937()
        known = self._numpy_now
        if mt is not None and known is not None and known.generator is mt[0] and known.words is not None \
                and not _gauss_cached() and ctypes.string_at(mt[1], _MT_BYTES) == known.words:
            return known     # the same words and no cached Gaussian: the same state
        full = np.random.get_state()
        words = ctypes.string_at(mt[1], _MT_BYTES) if mt is not None and full[3] == 0 else None
        self._numpy_now = _NumpyState(full, None if mt is None else mt[0], words)
        return self._numpy_now

    def _load_numpy(self, state: _NumpyState) -> None:
        mt = _mt19937()
        if mt is not None and state.words is not None and state.generator is mt[0] and not _gauss_cached():
            # neither the state now nor ``state`` holds a cached Gaussian: the words are the difference
            if ctypes.string_at(mt[1], _MT_BYTES) != state.words:
                ctypes.memmove(mt[1], state.words, _MT_BYTES)
        else:
            np.random.set_state(state.full)
        self._numpy_now = state
