"""What counting a block's work costs: pysim's one dispatch mode against torch's FlopCounterMode.

    python bench/counting.py [--repeats 20]

A compute profile charges strategy-side work by counting it (FLOPs, bytes,
kernels; :func:`pysim.compute.count_work`). The baseline is how pysim counted
before, and what one would write with torch alone: ``FlopCounterMode`` for the
FLOPs with a kernel counter (bytes and kernels) inside it. Both count the same
(``tests/test_compute.py``); printed per block: the block run bare, and under
each way of counting (median milliseconds over ``repeats`` runs after one
untimed run, one thread), so the counting's own cost is the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysim.compress import TopKCodec, get_codec  # noqa: E402
from pysim.compute import _KernelCounter, count_work  # noqa: E402
from pysim.strategies.demo import ChunkedDCT, keep_topk_per_chunk  # noqa: E402
from pysim.workload import Batches, get_workload  # noqa: E402


def torch_counting(fn) -> None:
    with FlopCounterMode(display=False), _KernelCounter():
        fn()


def blocks():
    wl = get_workload("mnist")
    x, y = Batches(wl.data()[0]).batch(torch.arange(32))
    torch.manual_seed(0)
    model = wl.model()
    opt = wl.optimizer(model.parameters())
    wl.loss(model(x), y).backward()
    opt.step()
    yield "MNIST CNN forward + backward (batch 32)", lambda: wl.loss(model(x), y).backward()
    yield "AdamW step of the CNN", opt.step

    g = torch.Generator().manual_seed(0)
    params = [p.detach().clone() for p in model.parameters()]
    dcts = [ChunkedDCT(p.shape, 64) for p in params]

    def demo() -> None:
        kept = [keep_topk_per_chunk(d.encode(p), 32) for p, d in zip(params, dcts, strict=True)]
        for p, d, k in zip(params, dcts, kept, strict=True):
            p.sub_(d.decode(k))
        TopKCodec(1500).pack(torch.cat([k.reshape(-1) for k in kept]), key="demo", step=0)
    yield "DeMo's compression of the CNN", demo

    outer_params = [torch.nn.Parameter(p.clone()) for p in params]
    outer = torch.optim.SGD(outer_params, lr=0.7, momentum=0.9, nesterov=True)

    def outer_step() -> None:
        for p in outer_params:
            p.grad = torch.ones_like(p)
        outer.step()
    yield "DiLoCo's outer Nesterov step", outer_step

    flat = torch.randn(sum(p.numel() for p in params), generator=g)
    for spec in ("topk:0.01", "int8"):
        codec = get_codec(spec)
        yield f"pack + unpack {spec}, {flat.numel()} values", \
            lambda c=codec: c.unpack(c.pack(flat, key="k", step=0), expect_shape=flat.shape)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| block | bare | FlopCounterMode + kernel counter | pysim's one mode | counting's cost, torch / pysim |")
    print("|---|---|---|---|---|")
    for name, fn in blocks():
        bare = median_ms(fn, a.repeats)
        two = median_ms(lambda f=fn: torch_counting(f), a.repeats)
        one = median_ms(lambda f=fn: count_work(f), a.repeats)
        print(f"| {name} | {bare:.3f} ms | {two:.3f} ms | {one:.3f} ms | {(two - bare) / max(one - bare, 1e-9):.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
