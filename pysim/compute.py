"""Compute time of a node: measured, calibrated once and shared, or modelled on a device profile.

Three modes (``TrainConfig.compute``):

- ``measured``: the per-thread CPU time (``time.thread_time``) of every block,
  raw, step by step. Node processes run torch and the kernels with one thread,
  so nodes sharing cores do not inflate each other, but timings still move
  with the machine and its load.
- a :class:`ComputeProfile` (``"calibrated"``: made on this machine before the
  run; ``"profile:FILE"``: a saved one; or a device name, ``cpu``, ``t4``,
  ``a100``, ``h100``): the same work always costs the same simulated time.
  Each block's work is *counted* (:class:`Work`: FLOPs of matmuls and
  convolutions, bytes read and written by every kernel, number of kernels)
  and costed as

      seconds = flops / flops_per_s + bytes / bytes_per_s + kernels * kernel_s

  A calibrated profile also holds the *measured* forward+backward time of each
  (model, batch) it was calibrated on (the fastest of many steps after warm-up),
  used in place of the counted cost for that block. Strategy-side work
  (optimizer steps, outer steps, codec packing in C++, PowerSGD products) is
  counted and costed the same way in every strategy, so a comparison charges
  the same model work the same time everywhere, and a saved profile makes it
  repeatable on another day or machine.

Device profiles are stated, not measured: peak FP32/TF32 throughput times a
utilisation, memory bandwidth, and a per-kernel floor (launch and
synchronisation, so a tiny model does not step in microseconds on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pysim.atomic import atomic_write_text
from pysim.global_rng import seed_torch
from pysim.kernel_count import open_counters
from pysim.sharding import ShardSampler
from pysim.workload import Batches, Workload

PROFILE_VERSION = 1


class Work(NamedTuple):
    """Counted work of a block of code."""

    flops: float = 0.0      # matmul / convolution FLOPs (forward and backward)
    bytes: float = 0.0      # bytes read and written by the kernels
    kernels: int = 0        # kernels launched

    def __add__(self, other: Work) -> Work:  # type: ignore[override]
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels)


@dataclass
class ComputeProfile:
    """Rates that turn counted work into seconds, and measured step times by key.

    ``flops_per_s``: effective FLOP/s; ``bytes_per_s``: memory bandwidth (bytes/s);
    ``kernel_s``: fixed cost per kernel (s); ``steps``: forward+backward seconds per
    step key (see :func:`step_key`); ``machine``: where it was calibrated;
    ``calibrated_at`` and ``steps_calibrated_at``: when the rates and each step were
    measured (UTC, ISO 8601; empty for stated profiles).
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    kernel_s: float
    steps: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    version: int = PROFILE_VERSION
    calibrated_at: str = ""
    steps_calibrated_at: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("flops_per_s", "bytes_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:   # inf: that work is free
                raise ValueError(f"compute profile {self.name!r}: {name} = {v!r} must be a positive rate")
        if isinstance(self.kernel_s, bool) or not isinstance(self.kernel_s, (int, float)) \
                or not math.isfinite(self.kernel_s) or self.kernel_s < 0:
            raise ValueError(f"compute profile {self.name!r}: kernel_s = {self.kernel_s!r} must be finite seconds >= 0")
        if not isinstance(self.steps, dict):
            raise ValueError(f"compute profile {self.name!r}: steps must map step keys to seconds")
        for key, v in self.steps.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"compute profile {self.name!r}: step {key!r} takes {v!r} s; a step time must be "
                                 "positive and finite (recalibrate with --compute calibrated)")

    def step_calibrated_at(self, key: str) -> str:
        """When step ``key`` was measured; the rates' time for profiles kept before steps had one."""
        return self.steps_calibrated_at.get(key) or self.calibrated_at

    def seconds(self, work: Work, key: str | None = None) -> float:
        """Simulated seconds of ``work``; a measured step time if ``key`` is one of the profile's."""
        if key is not None and key in self.steps:
            return self.steps[key]
        return work.flops / self.flops_per_s + work.bytes / self.bytes_per_s + work.kernels * self.kernel_s

    def save(self, path: str | Path) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ComputeProfile:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no compute profile {p}; make one with --compute calibrated (it is saved with the "
                             "results) or name a device profile (cpu, t4, a100, h100)")
        try:
            d = json.loads(p.read_text())
            if d.get("version") != PROFILE_VERSION:
                raise ValueError(f"format version {d.get('version')!r}")
            return cls(**d)
        except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{p} is not a pysim compute profile ({e}); recalibrate with --compute calibrated") \
                from None


# Peak dense FP32/TF32-class FLOP/s, the utilisation a small model reaches, memory
# bandwidth (bytes/s), and a per-kernel floor (s). Stated, not measured.
DEVICE_PROFILES: dict[str, ComputeProfile] = {
    "cpu": ComputeProfile("cpu", 1.0e11 * 0.5, 20e9, 1e-6, machine="stated: a few desktop cores, AVX2"),
    "t4": ComputeProfile("t4", 8.1e12 * 0.4, 320e9, 5e-6, machine="stated: NVIDIA T4"),
    "a100": ComputeProfile("a100", 156e12 * 0.4, 1.555e12, 4e-6, machine="stated: NVIDIA A100 40GB, TF32"),
    "h100": ComputeProfile("h100", 495e12 * 0.4, 3.35e12, 3e-6, machine="stated: NVIDIA H100 SXM, TF32"),
}


def resolve_compute(mode: str) -> ComputeProfile | None:
    """The profile a compute mode names (None for ``measured``); one-line errors for unknown modes."""
    if mode == "measured":
        return None
    if mode in DEVICE_PROFILES:
        return DEVICE_PROFILES[mode]
    if mode.startswith("profile:"):
        return ComputeProfile.load(mode[len("profile:"):])
    raise ValueError(f"unknown compute mode {mode!r}; use 'measured', 'calibrated', 'profile:FILE' or a device "
                     f"profile ({', '.join(DEVICE_PROFILES)})")


class _KernelCounter(TorchDispatchMode):
    """Counts the kernels torch runs and the bytes of their tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.bytes = 0
        self.native_flops = 0.0   # FLOPs of pysim's C++ kernels (record_native_kernel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._count_kernel(func, args, kwargs, out)
        return out

    def _count_kernel(self, func, args, kwargs, out) -> None:
        if func.__name__.split(".")[0] not in _VIEWS:
            self.kernels += 1
            self.bytes += _tensor_bytes(args) + _tensor_bytes(kwargs) + _tensor_bytes(out)


_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "detach",
          "alias", "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "_to_copy_noop",
          "lift_fresh"}  # lift_fresh: torch.from_numpy wrapping an existing buffer


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_tensor_bytes(v) for v in x.values())
    return 0


class _WorkCounter(_KernelCounter):
    """Counts what :class:`_KernelCounter` counts and the FLOPs torch's ``FlopCounterMode``
    would count, in one mode: the same numbers (tested against the two modes together) for a
    fraction of the Python per kernel (no module tracking; an operator's decomposition looked
    up once). Each kernel's FLOPs come from torch's formulas (matmuls, convolutions,
    attention); an operator without a formula but with a composite decomposition runs that
    decomposition, whose parts add their FLOPs but not kernels or bytes, as the two modes
    did."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.flops = 0            # torch's kernels' (an int, as FlopCounterMode sums them)
        self._decomposing = 0     # > 0 inside a decomposition: FLOPs only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = NotImplemented
        if func not in self.registry and func not in _NOT_DECOMPOSED and _decomposes(func):
            self._decomposing += 1
            try:
                with self:
                    out = func.decompose(*args, **kwargs)
            finally:
                self._decomposing -= 1
        if out is NotImplemented:
            out = func(*args, **kwargs)
            formula = self.registry.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
        if not self._decomposing:
            self._count_kernel(func, args, kwargs, out)
        return out


_DECOMPOSES: dict = {}   # operator -> whether it has a C++ composite kernel (OpOverload.decompose's test)

# what FlopCounterMode runs as they are (it leaves them to other modes): metadata queries, which
# nested and other non-standard tensors dispatch, and prim.device
_NOT_DECOMPOSED = frozenset(
    getattr(op, overload) for op, overload in (
        (torch.ops.aten.sym_is_contiguous, "default"), (torch.ops.aten.is_contiguous, "default"),
        (torch.ops.aten.is_contiguous, "memory_format"), (torch.ops.aten.is_strides_like_format, "default"),
        (torch.ops.aten.is_non_overlapping_and_dense, "default"), (torch.ops.aten.size, "default"),
        (torch.ops.aten.sym_size, "default"), (torch.ops.aten.stride, "default"),
        (torch.ops.aten.sym_stride, "default"), (torch.ops.aten.storage_offset, "default"),
        (torch.ops.aten.sym_storage_offset, "default"), (torch.ops.aten.numel, "default"),
        (torch.ops.aten.sym_numel, "default"), (torch.ops.aten.dim, "default"), (torch.ops.prim.layout, "default"),
        (torch.ops.prim.device, "default"))
    if hasattr(op, overload))


def _decomposes(func) -> bool:
    """Whether ``func.decompose`` would run a decomposition: a Python composite kernel (looked up
    every time: they may be registered later) or a C++ one (looked up once per operator)."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    if key in func.py_kernels:
        return True
    known = _DECOMPOSES.get(func)
    if known is None:
        try:
            known = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)
        except RuntimeError:   # an operator the dispatcher does not know by name: nothing to decompose
            known = False
        _DECOMPOSES[func] = known
    return known


@contextmanager
def counting():
    """Counts the work of the body (torch's kernels and pysim's C++ ones); yields a list that
    holds its :class:`Work` afterwards."""
    box: list[Work] = []
    counter = _WorkCounter()
    open_counters().append(counter)
    try:
        with counter:
            yield box
    finally:
        open_counters().pop()
    box.append(Work(float(counter.flops) + counter.native_flops, float(counter.bytes), counter.kernels))


def count_work(fn: Callable[[], object]) -> Work:
    """The counted work of ``fn()``."""
    with counting() as box:
        fn()
    return box[0]


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch executes in ``fn()`` (matmuls and convolutions, forward and backward)."""
    return count_work(fn).flops


class ComputeMeter:
    """Accumulates a node's compute seconds and FLOPs until taken.

    Measured mode times each block's thread CPU time; profile mode counts the
    block's work (or takes the ``work`` given, for blocks counted once) and
    costs it with the profile. C++ kernels are invisible to torch's counters:
    the code that calls one reports its work with :func:`record_native_kernel`.
    :meth:`hold` and :meth:`release` split an accumulated block into parts charged to
    successive segments. ``shared``: a dict of counted work that meters of nodes training the
    same model share (one process's nodes), so a block measured with ``reuse`` is counted once
    for all of them rather than once per node.
    """

    def __init__(self, profile: ComputeProfile | str | None = None, shared: dict | None = None) -> None:
        self.profile = resolve_compute(profile) if isinstance(profile, str) else profile
        self.seconds = 0.0
        self.flops = 0.0
        self.held_seconds = 0.0     # compute held back from take() (see hold)
        self.held_flops = 0.0
        self._depth = 0
        # counted work of blocks measured with ``reuse``: (name, "first" | "later") -> Work
        self._reused: dict[tuple[str, str], Work] = {} if shared is None else shared
        self._counted_once: set[str] = set()   # the reuse names this meter has run once

    @contextmanager
    def measure(self, flops: float = 0.0, work: Work | None = None, key: str | None = None,
                reuse: str | None = None, native: bool = False):
        """Charges the body as compute. ``work`` (with ``flops``) is its pre-counted work and
        ``key`` its step key for a calibrated profile; without them the body is counted.
        ``reuse``: a name for a block that does the same work every time it runs (an
        optimizer step over fixed shapes): its first run (which may differ: optimizer state is
        created) and a later run are counted once each, and reused after (counting runs every
        kernel through Python and costs more real time than the work).
        ``native``: the body's work is pysim's C++ kernels only (:func:`record_native_kernel`), so
        torch's kernels need not be counted (torch's own small ops in it, such as taking a view,
        are not charged)."""
        if native and work is None and self.profile is not None and self._depth == 0:
            counter = _KernelCounter()
            open_counters().append(counter)
            try:
                yield
            finally:
                open_counters().pop()
            counted = Work(counter.native_flops, float(counter.bytes), counter.kernels)
            self.seconds += self.profile.seconds(counted, key)
            self.flops += counted.flops
            return
        occurrence = "later" if reuse in self._counted_once else "first"
        if reuse is not None:
            self._counted_once.add(reuse)
        if work is None and reuse is not None and self.profile is not None:
            work = self._reused.get((reuse, occurrence))  # None until counted (below)
        if work is not None:
            flops = work.flops
        self._depth += 1
        try:
            if self.profile is None or self._depth > 1:  # nested blocks are charged by the outer one
                t0 = time.thread_time()
                try:
                    yield
                finally:
                    if self.profile is None and self._depth == 1:
                        self.seconds += time.thread_time() - t0
            elif work is not None:
                yield
                self.seconds += self.profile.seconds(work, key)
            else:
                with counting() as box:
                    yield
                flops = box[0].flops
                self.seconds += self.profile.seconds(box[0], key)
                if reuse is not None:
                    self._reused[(reuse, occurrence)] = box[0]
        finally:
            self._depth -= 1
        self.flops += flops

    def take(self) -> tuple[float, float]:
        """(seconds, flops) since the last take (held compute excluded)."""
        seconds, flops = self.seconds, self.flops
        self.seconds = self.flops = 0.0
        return seconds, flops

    def hold(self) -> tuple[float, float]:
        """Holds back all compute accumulated so far: :meth:`take` no longer sees it until it is
        given back piece by piece with :meth:`release`. Returns the (seconds, flops) now held.
        A strategy uses it to hand one measured block (forward + backward) to the clock in parts,
        e.g. a backward that produces gradient buckets one after another."""
        self.held_seconds += self.seconds
        self.held_flops += self.flops
        self.seconds = self.flops = 0.0
        return self.held_seconds, self.held_flops

    def release(self, seconds: float | None = None, flops: float | None = None) -> None:
        """Gives back ``seconds`` and ``flops`` of held compute (default: all that is held), to be
        taken with the next segment. Releasing more than is held is a ValueError."""
        seconds = self.held_seconds if seconds is None else seconds
        flops = self.held_flops if flops is None else flops
        if not 0 <= seconds <= self.held_seconds or not 0 <= flops <= self.held_flops:
            raise ValueError(f"release of ({seconds}, {flops}) s/FLOPs; only ({self.held_seconds}, "
                             f"{self.held_flops}) are held")
        self.held_seconds -= seconds
        self.held_flops -= flops
        self.seconds += seconds
        self.flops += flops


def step_key(workload_name: str, model: torch.nn.Module, batch_size: int) -> str:
    """The key of a (model, batch) step in a calibrated profile: the workload's name, the
    model's parameter count and the batch size per node."""
    return f"{workload_name}|{sum(p.numel() for p in model.parameters())}|{batch_size}"


def _min_thread_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """The fastest thread time of ``repeats`` calls after ``warmup``. Noise on a shared machine
    (other processes, frequency changes, cache pollution) only adds time, so the minimum is
    the stable figure: on this 2-core VM under load, the median of 30 MNIST steps moved
    9.9-13.5 ms between calibrations and the minimum of 100 8.85-8.91 ms. Where the host's
    speed itself drifts from minute to minute, a longer window finds its fast moments more
    surely: six windows in a row, minimum of 100 steps 9.31-11.05 ms, of 300 9.31-9.75 ms."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def this_machine() -> str:
    """Where a calibrated profile was made: CPU model and cores, host name, torch version, one thread."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}, {platform.node()}, torch {torch.__version__}, 1 thread"


def machine_cache_path() -> Path:
    """The compute profile of this machine kept between comparisons, so that comparisons made
    minutes or days apart charge the same compute: ``$PYSIM_CACHE_DIR`` (default ~/.cache/pysim)
    / ``compute-<hash of this_machine()>.json``."""
    root = Path(os.environ.get("PYSIM_CACHE_DIR") or Path.home() / ".cache" / "pysim")
    return root / f"compute-{hashlib.sha256(this_machine().encode()).hexdigest()[:12]}.json"


def calibrate_machine(repeats: int = 50) -> ComputeProfile:
    """This machine's single-thread rates: FLOP/s of a 256x256 matmul, bytes/s of a 32 MB copy,
    and the cost of a tiny kernel. The fastest of ``repeats`` each (see :func:`_min_thread_time`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        mm_s = _min_thread_time(lambda: a @ b, repeats, 3)
        src = torch.randn(8 << 20)
        dst = torch.empty_like(src)
        copy_s = _min_thread_time(lambda: dst.copy_(src), repeats, 2)
        tiny = torch.randn(16)
        tiny_s = _min_thread_time(lambda: [tiny.add(1.0) for _ in range(100)], repeats, 2) / 100
    finally:
        torch.set_num_threads(threads)
    return ComputeProfile("calibrated", 2 * 256 ** 3 / mm_s, 2 * src.numel() * 4 / copy_s, tiny_s,
                          machine=this_machine(), calibrated_at=_utc_now())


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def calibrate_step(profile: ComputeProfile, key: str, step: Callable[[], object], repeats: int = 300,
                   warmup: int = 20) -> float:
    """Measures one training step (forward + backward) as the fastest thread time of ``repeats``
    after ``warmup``, with one thread, and stores it in ``profile.steps[key]``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile.steps[key] = _min_thread_time(step, repeats, warmup)
    finally:
        torch.set_num_threads(threads)
    profile.steps_calibrated_at[key] = _utc_now()
    return profile.steps[key]


# ---------------------------------------------------------------- this machine's profile, kept


def workload_step_key(workload: Workload, batch_size: int, model: torch.nn.Module | None = None) -> str:
    """The compute-profile key of ``workload``'s training step at ``batch_size`` per node."""
    return step_key(workload.name, model if model is not None else workload.model(), batch_size)


def calibrate_workload(workload: Workload, batch_size: int, seed: int = 0,
                       profile: ComputeProfile | None = None) -> ComputeProfile:
    """A compute profile of this machine holding the measured forward+backward step of
    ``workload`` at ``batch_size`` (added to ``profile`` if given, else to newly measured
    machine rates). Runs in the calling process, before any node starts."""
    profile = profile or calibrate_machine()
    train_set, _ = workload.data()
    data = Batches(train_set)
    seed_torch(seed)
    model = workload.model()
    sampler = ShardSampler(data, torch.arange(len(data)), batch_size, seed)

    def step() -> None:
        x, y = sampler.next()
        model.zero_grad()
        workload.loss(model(x), y).backward()

    calibrate_step(profile, workload_step_key(workload, batch_size, model), step)
    return profile


def machine_profile(workload: Workload, batch_size: int, seed: int = 0,
                    recalibrate: bool = False) -> tuple[ComputeProfile, str]:
    """This machine's compute profile holding ``workload``'s step, and a phrase saying where it
    came from. The profile kept in :func:`machine_cache_path` is reused when it has the step:
    this host's speed drifts by tens of percent from one minute to the next, so two
    comparisons that each calibrated would charge the same model work differently. Otherwise
    (no cache, another machine's, unreadable, or ``recalibrate``) it is calibrated here, with the
    cached machine rates if only the step is new, and written to the cache."""
    path = machine_cache_path()
    cached = None
    if not recalibrate and path.is_file():
        try:
            cached = ComputeProfile.load(path)
        except ValueError:
            cached = None   # unreadable: calibrate again and replace it
        if cached is not None and cached.machine != this_machine():
            cached = None
    key = workload_step_key(workload, batch_size)
    if cached is not None and key in cached.steps:
        return cached, (f"calibrated on this machine at {cached.step_calibrated_at(key) or 'an unknown time'}, kept "
                        f"in {path} (--recalibrate measures it again)")
    t0 = time.perf_counter()
    profile = calibrate_workload(workload, batch_size, seed, cached)
    took = f"calibrated now ({time.perf_counter() - t0:.1f} s)"
    try:
        profile.save(path)
    except OSError as e:   # a read-only home: this comparison still has its profile, later ones recalibrate
        return profile, f"{took}, not kept ({path}: {e.strerror or e}; set PYSIM_CACHE_DIR to a writable folder)"
    return profile, f"{took}, kept in {path} for later comparisons"
