"""pytest-benchmark: density/coverage, ours vs the prdc package (skipped in the normal run by
``--benchmark-skip``; run with ``pytest tests/benchmarks --benchmark-only``). Peak memory and the
10k/50k x 2048 numbers come from ``scripts/bench_prdc.py`` (one process per implementation)."""

import contextlib
import io

import numpy as np
import pytest

N, DIM = 3000, 2048


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, DIM), dtype=np.float32), rng.standard_normal((N, DIM), dtype=np.float32) + 0.02


def test_bench_ours(benchmark, features):
    import torch

    from sfdbench.metrics.knn import prdc

    real, fake = (torch.from_numpy(x) for x in features)
    result = benchmark.pedantic(prdc, args=(real, fake, 5), rounds=3, iterations=1)
    assert 0 <= result["coverage"] <= 1


def test_bench_prdc_package(benchmark, features):
    from prdc import compute_prdc

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            return compute_prdc(*features, 5)

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert 0 <= result["coverage"] <= 1
