"""Compression kernels against their PyTorch baselines, measured in the same run.

    python bench/kernels.py            # full sizes (N = 1M, 10M; 4096x4096, 8192x4096)
    python bench/kernels.py --quick    # small sizes, a smoke run

Prints one table: kernel, size, ours (ms), torch (ms), speedup, GB/s of input
read by our kernel, that as % of a plain copy's read bandwidth at the same
size, and bits per index for top-k. Times are the minimum over repeats, ours
and torch interleaved so that load on this shared machine hits both.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pysim import _C
from pysim.compress import RandomKCodec, TopKCodec


@dataclass
class Case:
    kernel: str
    size: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    bytes_read: int
    bits_per_index: float | None = None


def vector_cases(n: int) -> list[Case]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    k = n // 100
    dst = np.empty_like(xn)
    topk, topk_raw = TopKCodec(k), TopKCodec(k, index_code="raw")
    randomk = RandomKCodec(0.01, seed=1)
    ef_bits = 8 * (topk.nbytes((n,)) - 36 - 4 * k) / k
    size = f"N={n / 1e6:g}M"
    return [
        Case("copy (memory bandwidth)", size, lambda: np.copyto(dst, xn), lambda: x.clone(), 4 * n),
        Case("topk pack 1% (Elias-Fano)", size, lambda: topk.pack(x),
             lambda: x[torch.topk(x.abs(), k).indices], 4 * n, ef_bits),
        Case("topk pack 1% (raw int32)", size, lambda: topk_raw.pack(x),
             lambda: x[torch.topk(x.abs(), k).indices], 4 * n, 32.0),
        Case("randomk pack 1%", size, lambda: randomk.pack(x, step=3),
             lambda: x[torch.rand(n) < 0.01], 4 * k),
    ]


def lowrank_cases(n: int, m: int, rank: int = 4) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(n, m, generator=g)
    Q = torch.randn(m, rank, generator=g)
    Mn, Qn = M.numpy(), Q.numpy()

    def ours_step():
        P = _C.lowrank_mq(Mn, Qn)
        _C.orthonormalize(P)
        return _C.lowrank_mtp(Mn, P)

    def torch_step():
        P, _ = torch.linalg.qr(M @ Q)
        return M.T @ P

    P = torch.from_numpy(_C.orthonormalize(_C.lowrank_mq(Mn, Qn)))
    size = f"{n}x{m} r={rank}"
    return [
        Case("lowrank step (MQ, orth, MtP)", size, ours_step, torch_step, 2 * 4 * n * m),
        Case("lowrank P = M Q", size, lambda: _C.lowrank_mq(Mn, Qn), lambda: M @ Q, 4 * n * m),
        Case("lowrank Q = Mt P", size, lambda: _C.lowrank_mtp(Mn, P.numpy()), lambda: M.T @ P, 4 * n * m),
    ]


def all_cases(quick: bool) -> list[Case]:
    if quick:
        return vector_cases(100_000) + lowrank_cases(256, 256)
    return vector_cases(1_000_000) + vector_cases(10_000_000) + lowrank_cases(4096, 4096) + lowrank_cases(8192, 4096)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(case: Case, repeats: int) -> tuple[float, float]:
    case.ours()
    case.torch()
    ours = torch_t = math.inf
    for _ in range(repeats):  # interleave so that machine noise hits both
        ours = min(ours, best_of(case.ours, 1))
        torch_t = min(torch_t, best_of(case.torch, 1))
    return ours, torch_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, pysim threads {_C.get_num_threads()}")
    header = f"| {'kernel':30} | {'size':15} | {'ours ms':>8} | {'torch ms':>8} | {'speedup':>7} | " \
             f"{'GB/s':>6} | {'% copy':>6} | {'bits/idx':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    copy_gbps: dict[str, float] = {}
    for case in all_cases(args.quick):
        ours, base = measure(case, args.repeats)
        gbps = case.bytes_read / ours / 1e9
        if case.kernel.startswith("copy"):
            copy_gbps[case.size] = gbps
        ref = copy_gbps.get(case.size)
        pct = f"{100 * gbps / ref:5.0f}%" if ref else "     -"
        bits = f"{case.bits_per_index:8.2f}" if case.bits_per_index else f"{'-':>8}"
        print(f"| {case.kernel:30} | {case.size:15} | {ours * 1e3:8.3f} | {base * 1e3:8.3f} | "
              f"{base / ours:6.1f}x | {gbps:6.1f} | {pct:>6} | {bits} |", flush=True)


if __name__ == "__main__":
    main()
