"""Compression kernels against PyTorch baselines of the same algorithmic class, measured in the same run.

    python bench/kernels.py --threads 2            # N = 1M and 10M; 4096x4096 and 8192x4096
    python bench/kernels.py --threads 2 --quick    # small sizes, a smoke run
    python bench/kernels.py --threads 1 --only "max pool" --repeats 50   # one kernel

Both libraries get the same thread count (``torch.set_num_threads`` and
``_C.set_num_threads``, printed in the first line). Times are the minimum over
repeats, ours and torch interleaved so that load on a shared machine hits both.

The primary figure is the percentage of memory bandwidth: the fp32 bytes a
kernel must touch (4 N for a whole-vector kernel, 4 k for the random-k gather,
4 n m per pass over a low-rank matrix) per second, over a plain copy's read
bandwidth at the same size (the faster of ``np.copyto`` and ``Tensor.clone``).
Speedups over torch stand beside it. Ours are the codecs' full ``pack`` and
``unpack`` (packet header and CRC-32C included); the torch baselines only
compute. pysim's and NumPy's large buffers are advised as transparent huge
pages; torch's allocator is asked to do the same (``THP_MEM_ALLOC_ENABLE=1``,
set below before torch is imported), so that page faults on a fresh 40 MB
output (about 45 ms at N = 10M with 4 KiB pages on a loaded machine) do not
decide the comparison.

Baselines:

- top-k: ``torch.topk(|x|, k, sorted=False)`` and a gather (ours: sampled
  threshold, filter, nth_element, then indices coded).
- random-k: a stratified O(k) draw (one uniform index per stratum of n/k, as
  ours) and a gather.
- low-rank: ``M @ Q``, ``torch.linalg.qr``, and the faster of ``M.T @ P`` and
  ``(P.T @ M).T`` measured in the same repeat.
- int8/int4: per-block absmax quantisation in torch ops (amax, divide, round,
  cast; int4 also packs two nibbles per byte), and its inverse.
- max pool 2x2: ``F.max_pool2d(x, 2)`` on the MNIST CNN's activations (batch 32
  as in training, 250 as in evaluation), input requiring grad as in training;
  ours is :func:`pysim.pooling.max_pool_2x2` (the same values and argmax).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch is imported: see above

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pysim import _C  # noqa: E402
from pysim.compress import QuantCodec, RandomKCodec, TopKCodec


@dataclass
class Case:
    kernel: str
    size: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    bytes_touched: int  # fp32 bytes the kernel must read or write once
    bits_per_index: float | None = None


def set_threads(n: int) -> None:
    """The same thread count for torch's intra-op pool and pysim's kernels."""
    torch.set_num_threads(n)
    _C.set_num_threads(n)


def torch_quantize(x: torch.Tensor, block: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation in torch ops; x.numel() must be a multiple of block."""
    b = x.view(-1, block)
    scale = (b.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-30)
    q = torch.round(b / scale).to(torch.int8)
    if qmax == 7:  # int4: two values per byte
        q = (q[:, 0::2] & 0x0F) | (q[:, 1::2] << 4)
    return q, scale.to(torch.bfloat16)


def torch_dequantize(q: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    if qmax == 7:
        lo = (q << 4) >> 4
        hi = q >> 4
        q = torch.stack([lo, hi], dim=2).view(q.shape[0], -1)
    return (q.float() * scale.float()).view(-1)


def torch_stratified_gather(x: torch.Tensor, k: int) -> torch.Tensor:
    n = x.numel()
    j = torch.arange(k + 1)
    bounds = j * n // k
    lo, width = bounds[:-1], bounds[1:] - bounds[:-1]
    idx = lo + (torch.rand(k) * width).long()
    return x[idx]


def vector_cases(n: int) -> list[Case]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    k = n // 100
    dst = np.empty_like(xn)
    topk, topk_raw = TopKCodec(k), TopKCodec(k, index_code="raw")
    randomk = RandomKCodec(0.01, seed=1)
    ef_bits = 8 * (topk.nbytes((n,)) - 36 - 4 * k) / k
    size = f"N={n / 1e6:g}M"

    def torch_topk():
        return x[torch.topk(x.abs(), k, sorted=False).indices]

    cases = [
        Case("copy (memory bandwidth)", size, lambda: np.copyto(dst, xn), lambda: x.clone(), 4 * n),
        Case("topk pack 1% (Elias-Fano)", size, lambda: topk.pack(x), torch_topk, 4 * n, ef_bits),
        Case("topk pack 1% (raw int32)", size, lambda: topk_raw.pack(x), torch_topk, 4 * n, 32.0),
        Case("randomk pack 1%", size, lambda: randomk.pack(x, step=3), lambda: torch_stratified_gather(x, k), 4 * k),
    ]
    for bits, block in ((8, 64), (4, 32)):
        codec, qmax = QuantCodec(bits, block), (127 if bits == 8 else 7)
        packet = codec.pack(x)
        q, s = torch_quantize(x, block, qmax)
        cases += [
            Case(f"int{bits} pack (block {block})", size, lambda c=codec: c.pack(x),
                 lambda b=block, m=qmax: torch_quantize(x, b, m), 4 * n),
            Case(f"int{bits} unpack (block {block})", size, lambda c=codec, p=packet: c.unpack(p),
                 lambda q=q, s=s, m=qmax: torch_dequantize(q, s, m), 4 * n),
        ]
    return cases


def lowrank_cases(n: int, m: int, rank: int = 4) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(n, m, generator=g)
    Q = torch.randn(m, rank, generator=g)
    Mn, Qn = M.numpy(), Q.numpy()
    P = torch.from_numpy(_C.orthonormalize(_C.lowrank_mq(Mn, Qn)))

    def ours_step():
        P = _C.lowrank_mq(Mn, Qn)
        _C.orthonormalize(P)
        return _C.lowrank_mtp(Mn, P)

    def torch_mtp(P: torch.Tensor) -> torch.Tensor:
        """The faster of torch's two ways to form M^T P (chosen once, below)."""
        return mtp_best[0](P)

    candidates = [lambda P: M.T @ P, lambda P: (P.T @ M).T]
    times = [min(_time(lambda f=f: f(P)) for _ in range(3)) for f in candidates]
    mtp_best = [candidates[times.index(min(times))]]

    def torch_step():
        P, _ = torch.linalg.qr(M @ Q)
        return torch_mtp(P)

    size = f"{n}x{m} r={rank}"
    dst = np.empty_like(Mn)
    return [
        Case("copy (memory bandwidth)", size, lambda: np.copyto(dst, Mn), lambda: M.clone(), 4 * n * m),
        Case("lowrank step (MQ, orth, MtP)", size, ours_step, torch_step, 2 * 4 * n * m),
        Case("lowrank P = M Q", size, lambda: _C.lowrank_mq(Mn, Qn), lambda: M @ Q, 4 * n * m),
        Case("lowrank Q = Mt P", size, lambda: _C.lowrank_mtp(Mn, P.numpy()), lambda: torch_mtp(P), 4 * n * m),
    ]


def pool_cases(batch: int) -> list[Case]:
    """The MNIST CNN's two 2x2 max poolings (pysim.pooling) on a batch of that many images, in the
    training path (input requiring grad: both sides also produce the argmax for the backward)."""
    from pysim.pooling import max_pool_2x2

    g = torch.Generator().manual_seed(0)
    cases = []
    for c, hw in ((16, 24), (32, 8)):
        x = torch.relu(torch.randn(batch, c, hw, hw, generator=g)).requires_grad_()
        out = batch * c * (hw // 2) ** 2
        size = f"{batch}x{c}x{hw}x{hw}"
        dst, xn = np.empty(x.numel(), np.float32), x.detach().numpy().reshape(-1)
        cases += [
            Case("copy (memory bandwidth)", size, lambda d=dst, v=xn: np.copyto(d, v), lambda v=x: v.detach().clone(),
                 4 * x.numel()),
            # bytes: the input read, the values and the int64 argmax written
            Case("max pool 2x2 (values, argmax)", size, lambda v=x: max_pool_2x2(v), lambda v=x: F.max_pool2d(v, 2),
                 4 * x.numel() + 12 * out),
        ]
    return cases


def all_cases(quick: bool) -> list[Case]:
    if quick:
        return vector_cases(128_000) + lowrank_cases(256, 256) + pool_cases(32)
    return (vector_cases(1_000_000) + vector_cases(10_000_000) + lowrank_cases(4096, 4096) + lowrank_cases(8192, 4096)
            + pool_cases(32) + pool_cases(250))


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(case: Case, repeats: int) -> tuple[float, float]:
    case.ours()
    case.torch()
    ours = torch_t = math.inf
    for _ in range(repeats):  # interleave so that machine noise hits both
        ours = min(ours, _time(case.ours))
        torch_t = min(torch_t, _time(case.torch))
    return ours, torch_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                    help="threads for both torch and pysim (default: min(8, cores))")
    ap.add_argument("--only", default="", help="only the kernels whose name holds this (and their copy rows)")
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"pysim threads {_C.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    header = f"| {'kernel':29} | {'size':13} | {'% copy':>6} | {'torch % copy':>12} | {'ours ms':>8} | " \
             f"{'torch ms':>8} | {'speedup':>7} | {'bits/idx':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    copy_gbps: dict[str, float] = {}
    cases = all_cases(args.quick)
    sizes = {c.size for c in cases if args.only in c.kernel}
    for case in (c for c in cases if c.size in sizes and (args.only in c.kernel or c.kernel.startswith("copy"))):
        ours, base = measure(case, args.repeats)
        if case.kernel.startswith("copy"):
            copy_gbps[case.size] = case.bytes_touched / min(ours, base) / 1e9
        ref = copy_gbps.get(case.size)

        def pct(t: float, c: Case = case, r: float | None = ref) -> str:
            return f"{100 * c.bytes_touched / t / 1e9 / r:5.0f}%" if r else "-"

        bits = f"{case.bits_per_index:8.2f}" if case.bits_per_index else f"{'-':>8}"
        print(f"| {case.kernel:29} | {case.size:13} | {pct(ours):>6} | {pct(base):>12} | {ours * 1e3:8.3f} | "
              f"{base * 1e3:8.3f} | {base / ours:6.1f}x | {bits} |", flush=True)


if __name__ == "__main__":
    main()
