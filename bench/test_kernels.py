"""pytest-benchmark view of bench/kernels.py: each kernel beside its torch baseline.

    python -m pytest bench/test_kernels.py --benchmark-group-by=param:case

Torch and pysim both run with PYSIM_BENCH_THREADS threads (default: min(8, cores)).
"""

import os

import pytest
from kernels import all_cases, set_threads

set_threads(int(os.environ.get("PYSIM_BENCH_THREADS", min(8, os.cpu_count() or 1))))
CASES = {f"{c.kernel} {c.size}": c for c in all_cases(quick=False)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_kernel(benchmark, case, impl):
    c = CASES[case]
    benchmark.pedantic(c.ours if impl == "ours" else c.torch, rounds=10, warmup_rounds=1)
