"""Gradient averaging before the local step: SimpleReduce (DDP, optionally with bucketed overlap),
TopK with error feedback, PowerSGD."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pysim.comm import Pending
from pysim.compress import Codec, TopKCodec
from pysim.strategies.base import FLOAT32_MAX, CommStep, OwnUpdate, Strategy, real_in, split_like
from pysim.strategies.reducers import AllGather, AllReduce, PowerSGDReduce, Reducer, local_error_feedback, make_reducer

MB = 1e6  # bytes in a megabyte, as DDP's bucket_cap_mb counts them here


class AverageGradients(CommStep):
    """Before the local step, replace every gradient by its mean over nodes through ``reducer``.
    ``flat``: all gradients travel as one vector (one packet) instead of one tensor each."""

    def __init__(self, reducer: Reducer, flat: bool = False, label: str | None = None) -> None:
        self.reducer, self.flat = reducer, flat
        self.label = label if label is not None else "" if reducer.label == "dense" else reducer.label

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.reducer.setup(strategy.comm, strategy.run_seed)

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        copy = not self.reducer.owned_result   # a result the reducer keeps must not become a gradient
        if self.flat:
            s.set_grads(self.reducer.mean({"grads": s.flat_grads()}, step)["grads"], copy=copy)
            return
        avg = self.reducer.mean(dict(zip(s.names, s.grads(), strict=True)), step)
        for p, g in zip(s.params, avg.values(), strict=True):
            p.grad = g.clone() if copy else g


def buckets_by_size(params: list[torch.Tensor], cap_bytes: float) -> list[list[int]]:
    """DDP-style gradient buckets: parameter indices in reverse order (the last layers'
    gradients are ready first in backward), cut so that a bucket holds at most ``cap_bytes``
    of gradient; a single tensor larger than the cap is a bucket of its own."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in reversed(range(len(params))):
        nbytes = params[i].numel() * params[i].element_size()
        if current and size + nbytes > cap_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def forward_flops_per_parameter(model: nn.Module, args: tuple, kwargs: dict) -> list[float]:
    """Forward FLOPs (matmuls, convolutions) attributed to each parameter of ``model``, in
    ``model.parameters()`` order, for one forward on ``args``/``kwargs``: a module's own FLOPs
    (its count less its submodules') go to the parameters it owns directly, split by element
    count. FLOPs of modules that own no parameters are attributed to none."""
    probe = copy.deepcopy(model)  # no side effects on the real one (batch-norm statistics, RNG draws)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(*args, **kwargs)
    inclusive = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    flops: dict[int, float] = {}
    for name, module in probe.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        key = f"{root}.{name}" if name else root
        exclusive = inclusive.get(key, 0.0) - sum(
            inclusive.get(f"{key}.{child}", 0.0) for child, _ in module.named_children())
        numel = sum(p.numel() for p in own)
        for p in own:
            flops[id(p)] = flops.get(id(p), 0.0) + max(exclusive, 0.0) * p.numel() / numel
    return [flops.get(id(p), 0.0) for p in probe.parameters()]


class BucketedAverageGradients(CommStep):
    """DDP-style overlapped gradient averaging: each bucket (see :func:`buckets_by_size`) is
    all-reduced without blocking as soon as backward has produced it; all are waited for
    before the local step.

    Compute model. The node charges forward + backward as one block of T seconds (measured
    thread time or a profile's cost). Backward of a layer costs ~2x its forward FLOPs, so the
    forward is T/3 and bucket b's backward is (2T/3) * F_b / F, where F_b is the forward FLOPs
    of the modules owning the bucket's parameters and F the sum over buckets (counted once per
    model, on the first batch, by :func:`forward_flops_per_parameter`; by element count when
    no FLOPs are attributed). The block is held back on the compute meter and released so that
    the Start of bucket b is issued after forward + backward of buckets 0..b; the Waits follow
    the last Start. The mean gradient is that of one flat all-reduce (bit for bit with dense
    fp32 on 2 nodes; with more nodes a ring sums an element in an order set by its chunk, so
    bucketing may change the last bit); each bucket is one packet (24-byte header + 4 bytes per
    dimension + payload per ring chunk). Lossy codecs get local error feedback per bucket.
    """

    def __init__(self, codec: Codec, bucket_mb: float, codec_label: str = "") -> None:
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb (megabytes of gradient per bucket) must be > 0, got {bucket_mb!r}")
        self.codec, self.bucket_mb = codec, float(bucket_mb)
        self.label = " ".join(x for x in (codec_label, f"overlap {bucket_mb:g}MB buckets") if x)
        self.shares: list[float] | None = None      # fraction of the forward+backward block per bucket
        self.residuals: list[torch.Tensor | None] = []

    def setup(self, strategy) -> None:
        super().setup(strategy)
        self.buckets = buckets_by_size(strategy.params, self.bucket_mb * MB)
        self.residuals = [None] * len(self.buckets)
        self._first_input: tuple[tuple, dict] | None = None

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # references only (a copy here would add to the step's counted work)
            self._first_input = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
            self._hook.remove()

        self._hook = strategy.model.register_forward_pre_hook(capture, with_kwargs=True)

    def block_shares(self) -> list[float]:
        """Fraction of the forward+backward block charged before each bucket's Start: the
        forward third goes with bucket 0 (see the class docstring). Sums to 1."""
        if self._first_input is None:
            raise RuntimeError("bucketed overlap needs the model's forward to have run once after setup")
        per_param = forward_flops_per_parameter(self.strategy.model, *self._first_input)
        if sum(per_param) <= 0:
            per_param = [float(p.numel()) for p in self.strategy.params]
        total = sum(per_param)
        backward = [2 / 3 * sum(per_param[i] for i in bucket) / total for bucket in self.buckets]
        return [1 / 3 + backward[0]] + backward[1:]

    def before_local_step(self, step: int, last: bool) -> None:
        s, meter = self.strategy, self.strategy.comm.meter
        if self.shares is None:
            self.shares = self.block_shares()   # once per model; uncharged bookkeeping
        block_s, block_flops = meter.hold()     # forward + backward of this step
        grads = s.grads()
        pending: list[Pending[torch.Tensor]] = []
        for b, bucket in enumerate(self.buckets):
            if b == len(self.buckets) - 1:
                meter.release()
            else:
                meter.release(min(block_s * self.shares[b], meter.held_seconds),
                              min(block_flops * self.shares[b], meter.held_flops))
            flat = torch.cat([grads[i].reshape(-1) for i in bucket])
            if self.codec.lossy:
                with meter.measure():
                    flat, self.residuals[b] = local_error_feedback(self.codec, flat, self.residuals[b])
            pending.append(s.comm.allreduce_mean_async(flat, self.codec))
        for bucket, p in zip(self.buckets, pending, strict=True):
            mean = p.wait()
            for i, g in zip(bucket, split_like(mean, [s.params[i] for i in bucket]), strict=True):
                s.params[i].grad = g.clone()


class SimpleReduce(Strategy):
    """All-reduce (average) the gradients every step, as DDP does. Nodes stay identical.
    ``codec``: a dense one ("dense", "dense:fp16", ...); a lossy one gets local error feedback.

    ``overlap=False`` (default, as before): one blocking all-reduce of all gradients after
    backward. ``overlap=True``: DDP-style buckets of at most ``bucket_mb`` MB (1 MB = 1e6
    bytes; default 25, DDP's) all-reduced while backward goes on (see
    :class:`BucketedAverageGradients`): same mean gradient, a shorter simulated step when
    communication can hide behind backward. Small models fit one 25 MB bucket, whose
    all-reduce starts when backward ends: try ``bucket_mb=0.05`` to see the overlap."""

    def __init__(self, codec: str = "dense", overlap: bool = False, bucket_mb: float | None = None) -> None:
        reducer = make_reducer(codec)
        if not isinstance(reducer, AllReduce):
            raise ValueError(f"SimpleReduce averages dense gradients; got codec {codec!r} (use TopK or PowerSGD)")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if not overlap:
            if bucket_mb is not None:
                raise ValueError("bucket_mb sets the buckets of overlap=True; give SimpleReduce(overlap=True, "
                                 f"bucket_mb={bucket_mb!r})")
            self.comm_steps = (AverageGradients(reducer, flat=True),)
            return
        codec_label = "" if reducer.label == "dense" else reducer.label
        self.comm_steps = (BucketedAverageGradients(reducer.codec, 25.0 if bucket_mb is None else bucket_mb,
                                                    codec_label),)


class TopK(Strategy):
    """Top-k sparsification with error feedback: each node sends the ``k`` largest entries (a
    fraction, or a count) of gradient + residual as one packet; nodes all-gather and average
    the packets. (Not DGC: no momentum correction, clipping, masking or warm-up; see DGC.)"""

    def __init__(self, k: float = 0.01, index_code: str = "ef") -> None:
        codec = TopKCodec(k, index_code=index_code)
        self.comm_steps = (AverageGradients(AllGather(codec, f"k={k}+EF"), flat=True),)


class PowerSGD(OwnUpdate):
    """PowerSGD (Vogels et al. 2019) on the gradients, rank ``rank``, error feedback and warm
    start; two all-reduces per step (see :class:`pysim.strategies.reducers.PowerSGDReduce`).

    The update is the paper's Algorithm 2 (error-feedback SGD with momentum), as its code runs
    it: on the decompressed mean D (plus ``weight_decay`` x w), m = ``momentum`` x m + D, then
    w -= lr_t (D + m) (Nesterov), with PowerSGD's own ``lr`` times the run's warm-up/cosine
    schedule factor (the run's ``--lr`` moves only the workload's optimizer; ``momentum=0``
    steps 2 lr D, as the paper's code does). ``optimizer="inner"``: the workload's optimizer
    (AdamW in the built-in workloads) steps on D instead, a labelled variant. ``lr`` 0.05: on
    the MNIST defaults (2 nodes, 600 steps, one seed) 0.03, 0.05 and 0.1 reach 98% and 0.15
    collapses to chance (11% accuracy; bench/RESULTS.md)."""

    revision = 1   # 1: the paper's momentum SGD (the workload's optimizer before)

    def __init__(self, rank: int = 4, seed: int | None = None, optimizer: str = "sgd", lr: float = 0.05,
                 momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        self.choose_optimizer(optimizer, own=("lr", "momentum", "weight_decay"))
        real_in(lr, "PowerSGD lr", 0, FLOAT32_MAX, high_closed=True)
        real_in(momentum, "PowerSGD momentum", 0, 1, low_closed=True)
        real_in(weight_decay, "PowerSGD weight_decay", 0, FLOAT32_MAX, low_closed=True, high_closed=True)
        label = f"rank={rank}+EF"
        if optimizer == "inner":
            label += " +inner optimizer"
        else:
            label += "".join(f" {k}={v:g}" for k, v, default in (("lr", lr, 0.05), ("momentum", momentum, 0.9),
                                                                 ("wd", weight_decay, 0.0)) if v != default)
        self.comm_steps = (AverageGradients(PowerSGDReduce(rank, seed), label=label),)
        self.sgd_lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momenta: list[torch.Tensor] | None = None

    def own_update(self, factor: float) -> None:
        """Algorithm 2's momentum step on the averaged gradient D."""
        if self.momenta is None:
            self.momenta = [torch.zeros_like(p) for p in self.params]
        for p, m in zip(self.params, self.momenta, strict=True):
            d = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            m.mul_(self.momentum).add_(d)
            p.sub_(d + m, alpha=self.sgd_lr * factor)
