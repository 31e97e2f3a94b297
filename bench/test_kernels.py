"""pytest-benchmark view of bench/kernels.py: each kernel beside its torch baseline.

    python -m pytest bench/test_kernels.py --benchmark-group-by=param:case
"""

import pytest
from kernels import all_cases

CASES = {f"{c.kernel} {c.size}": c for c in all_cases(quick=False)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_kernel(benchmark, case, impl):
    c = CASES[case]
    benchmark.pedantic(c.ours if impl == "ours" else c.torch, rounds=10, warmup_rounds=1)
