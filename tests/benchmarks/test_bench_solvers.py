"""pytest-benchmark: the per-step overhead of every solver next to one forward pass of the digits
teacher (batch 500, [500, 1, 8, 8], float32, no grad). Skipped in the normal test run by
``--benchmark-skip``; run with

    python -m pytest tests/benchmarks/test_bench_solvers.py --benchmark-only --benchmark-enable -s

``test_overhead_to_forward_ratio`` measures both in one process and prints the ratio
per-step overhead / forward pass (``python tests/benchmarks/test_bench_solvers.py`` prints the
same table without pytest). Overhead = a full sample with a zero-cost denoiser
(``x * 0``, one tiny elementwise op per evaluation, included) divided by the number of steps;
it includes precomputing DEIS's weights, amortised over the steps. Timings are printed, never
asserted.
"""

from __future__ import annotations

import time

import pytest
import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.schedules import get_schedule

BATCH, SHAPE, STEPS = 500, (1, 8, 8), 10
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# name: (solver, schedule, rho, options), the registered methods' presets
SOLVERS = {
    "euler/ddim": (solvers.euler, "polynomial", 7.0, {}),
    "heun": (solvers.heun, "polynomial", 7.0, {}),
    "dpm2": (solvers.dpm_solver_2, "polynomial", 7.0, {}),
    "dpmpp3m": (solvers.dpmpp_multistep, "logsnr", 1.0, {"max_order": 3, "thresholding": True}),
    "ipndm": (solvers.ipndm, "polynomial", 7.0, {"max_order": 4}),
    "ipndm_v": (solvers.ipndm_v, "polynomial", 7.0, {"max_order": 4}),
    "deis": (solvers.deis, "time_uniform", 2.0, {"max_order": 3}),
    "unipc": (solvers.unipc, "logsnr", 1.0, {"max_order": 3, "thresholding": True}),
}


def zero_denoiser(x: torch.Tensor, sigma, **cond) -> torch.Tensor:
    return x * 0


def latents() -> torch.Tensor:
    return torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(0))


def run_solver(name: str, x: torch.Tensor) -> torch.Tensor:
    solver, schedule, rho, options = SOLVERS[name]
    sigmas = get_schedule(schedule, STEPS + 1, SIGMA_MIN, SIGMA_MAX, rho)
    return solvers.sample(solver, zero_denoiser, x, sigmas, **options)


def load_teacher():
    from sfdbench.suites.digits import DigitsSuite

    return DigitsSuite().load_teacher()


def teacher_forward(teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x, torch.tensor(1.0))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bench_solver_overhead(benchmark, name):
    x = latents()
    out = benchmark(run_solver, name, x)
    benchmark.extra_info["steps"] = STEPS
    assert out.shape == x.shape


def test_bench_teacher_forward(benchmark, teacher):
    x = latents()
    out = benchmark(teacher_forward, teacher, x)
    assert out.shape == x.shape


def best_of(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(teacher=None) -> dict:
    """{'forward_s': ..., 'solvers': {name: per-step overhead in s}} measured in this process."""
    teacher = teacher or load_teacher()
    x = latents()
    forward = best_of(lambda: teacher_forward(teacher, x))
    per_step = {name: best_of(lambda name=name: run_solver(name, x)) / STEPS for name in SOLVERS}
    return {"forward_s": forward, "solvers": per_step}


def format_table(result: dict) -> str:
    lines = [f"teacher forward, batch {BATCH}: {result['forward_s'] * 1e3:.2f} ms "
             f"({torch.get_num_threads()} threads)",
             f"{'solver':12s} {'overhead/step':>14s} {'/ forward':>10s}"]
    for name, t in result["solvers"].items():
        lines.append(f"{name:12s} {t * 1e3:11.3f} ms {t / result['forward_s']:10.4f}")
    return "\n".join(lines)


def test_overhead_to_forward_ratio(benchmark, teacher):
    result = benchmark.pedantic(measure, args=(teacher,), rounds=1, iterations=1)
    benchmark.extra_info.update({"forward_s": result["forward_s"],
                                 **{f"ratio_{k}": v / result["forward_s"] for k, v in result["solvers"].items()}})
    print("\n" + format_table(result))


if __name__ == "__main__":
    print(format_table(measure()))
