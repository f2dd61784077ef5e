"""pytest-benchmark entry points: the cases and implementations of ``qwen-kernels bench``.

    pytest bench/ --benchmark-only                          # every case at full size
    QK_BENCH_QUICK=1 pytest bench/ --benchmark-only -k window_attn

Each round synchronises the GPU, so these are wall-clock times per call; the CUDA-event medians of
``qwen-kernels bench`` (with its floors and speedups) are the numbers the project records.
Skipped without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.harness import cycler, impls_for, input_sets, l2_bytes
from bench.shapes import FULL, QUICK
from bench.suites import SUITES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCALE = QUICK if os.environ.get("QK_BENCH_QUICK") else FULL
PARAMS = [
    pytest.param(case, impl, id=f"{case.op}-{case.name}-{impl.name}".replace(" ", "_"))
    for suite in SUITES
    for case in suite.cases(SCALE)
    for impl in impls_for(case, suite, "cuda")
]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_benchmark(benchmark, case, impl):
    if impl.missing:
        pytest.skip(impl.missing)
    call = cycler(impl, input_sets(case, "cuda", l2_bytes()))

    def synchronised() -> None:
        call()
        torch.cuda.synchronize()

    synchronised()  # compiles and autotunes outside the measurement
    benchmark.extra_info.update(
        op=case.op,
        case=case.name,
        shape=case.shape,
        bytes=case.bytes,
        flops=case.flops,
        gpu=torch.cuda.get_device_name(0),
    )
    benchmark.pedantic(synchronised, rounds=20, warmup_rounds=3)
