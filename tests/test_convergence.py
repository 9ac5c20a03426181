"""Convergence orders on the Gaussian-mixture test bed of ``sfdbench.diffusion.convergence``.

Global orders: every case of ``convergence.CASES`` with a theoretical order is fitted over its
step range and must lie within 0.3 of it (the ranges and the non-obvious theoretical values --
DPM-Solver++(3M) 2, iPNDM 2, iPNDM_v with the reference weights 2 / 3 -- are explained in the
module docstring). Local orders: the update weights of the linear multistep solvers are applied
to EXACT history values (no warm-up, no accumulated error), so the one-step error must scale as
h^(q+1) with the order q each formula has on each kind of grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfdbench.diffusion import convergence, solvers
from sfdbench.diffusion.convergence import CASES, GaussianMixture, TestBed, fit_order, step_counts

DTYPE = torch.float64


@pytest.fixture(scope="module")
def bed() -> TestBed:
    return TestBed()


def test_mixture_denoiser_is_the_posterior_mean():
    """Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x), with p_sigma the noised mixture."""
    mix = GaussianMixture.default()
    x = 2.0 * torch.randn(5, mix.dim, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    for sigma in (0.01, 0.3, 1.0, 7.0):
        xs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_density(xs, sigma).sum(), xs)
        torch.testing.assert_close(mix(x, sigma), x + sigma**2 * grad, rtol=1e-12, atol=1e-12)


def test_exact_flow_is_accurate(bed):
    """Two independent integrators (explicit DOP853, implicit Radau) agree far below the
    smallest solver error we fit (~1e-9), and the ODE holds at the end point."""
    radau = bed.mixture.exact_flow(bed.latents * bed.mixture.sigma_max, bed.mixture.sigma_max,
                                   bed.mixture.sigma_min, method="Radau", rtol=1e-12, atol=1e-12)
    assert (radau - bed.exact).abs().max().item() < 1e-10
    m, s = bed.mixture, 0.5
    x_s = m.exact_flow(bed.latents * m.sigma_max, m.sigma_max, s)
    eps = 1e-4
    fd = (m.exact_flow(x_s, s, s + eps) - m.exact_flow(x_s, s, s - eps)) / (2 * eps)
    torch.testing.assert_close(fd, solvers.direction(m, x_s, torch.tensor(s, dtype=DTYPE), None), rtol=1e-6, atol=1e-7)


ASSERTED = [c for c in CASES if c.theory is not None]


@pytest.mark.parametrize("case", ASSERTED, ids=[f"{c.name}-{c.schedule}" for c in ASSERTED])
def test_global_order(case, bed):
    steps = step_counts(*case.steps)
    errors = bed.errors(case, steps)
    assert all(e > 1e-11 for e in errors), errors  # far above the reference's accuracy
    assert all(b < a for a, b in zip(errors, errors[1:])), errors  # monotone in the fit range
    p = fit_order(steps, errors)
    assert abs(p - case.theory) <= 0.3, (case.name, case.schedule, p, errors)


def test_every_new_solver_has_an_asserted_case():
    assert {c.solver for c in ASSERTED} >= {"euler", "heun", "dpm2", "dpmpp", "ipndm", "ipndm_v", "deis", "unipc"}


def test_table_runs(capsys, monkeypatch):
    """``python -m sfdbench.diffusion.convergence`` prints one row per case."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(convergence, "CASES", CASES[:2])
    monkeypatch.setattr(convergence, "run", lambda cases=CASES[:2], bed=None: [
        convergence.Result(c, [8, 16], [1e-2, 5e-3], 1.0, 1.0) for c in cases])
    convergence.main()
    out = capsys.readouterr().out
    assert "Euler / DDIM" in out and "Heun" in out


# --------------------------------------------------------------------------------------------
# local truncation order of the multistep weights, from exact history


SHAPES = {  # step-size ratios h_{n-1}/h_n, h_{n-2}/h_n, h_{n-3}/h_n, kept fixed as h -> 0
    "equal": (1.0, 1.0, 1.0),
    "geometric": (1.3, 1.3**2, 1.3**3),
    "irregular": (1.3, 0.8, 1.6),
}
SIGMA_STAR = 1.0  # t_i, the current time; the nodes lie above it


@pytest.fixture(scope="module")
def local_errors():
    """weights(sigmas) -> one-step errors for h = h0 / 2^k, k = 0..3, on each shape (sigma in
    float64 throughout: a float32 sigma alone puts a 2e-8 floor under these errors)."""
    mix = GaussianMixture.default()
    z = torch.randn(4, mix.dim, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    cache: dict = {}

    def states(shape: str, h: float):
        if (shape, h) not in cache:
            ratios = SHAPES[shape]
            t = [SIGMA_STAR + h * sum(ratios[k:]) for k in range(3)] + [SIGMA_STAR, SIGMA_STAR - h]
            x = [mix.exact_flow(z * mix.sigma_max, mix.sigma_max, t[0])]
            for a, b in zip(t, t[1:]):
                x.append(mix.exact_flow(x[-1], a, b))
            d = [solvers.direction(mix, xi, torch.tensor(ti, dtype=DTYPE), None) for xi, ti in zip(x, t)]
            cache[shape, h] = torch.tensor(t, dtype=DTYPE), x, d
        return cache[shape, h]

    def errors(weights, shape: str, order: int, h0: float) -> tuple[list[float], list[float]]:
        hs, out = [h0 / 2**k for k in range(4)], []
        for h in hs:
            t, x, d = states(shape, h)
            newest_first = [d[3 - j] for j in range(order)]
            step = sum(c * dj for c, dj in zip(weights(t, order), newest_first))
            out.append((x[3] + step - x[4]).abs().max().item())
        return hs, out

    return errors


def ab_fixed(t, order):  # iPNDM
    return [(t[4] - t[3]).item() * c for c in solvers.IPNDM_COEFFICIENTS[order]]


def ab_reference_v(t, order):  # iPNDM_v, reference weights
    h = [(t[4 - k] - t[3 - k]).item() for k in range(order)]
    return [h[0] * c for c in solvers.ipndm_v_coefficients(h, order)]


def lagrange(variable):
    def weights(t, order):
        return list(solvers.multistep_coefficients(t[4 - order:], order, variable)[-1])
    return weights


# (name, weights, order, {shape: expected local order q, i.e. error ~ h^(q+1)}[, h0 = 0.05])
LOCAL_CASES = [
    *[(f"exact-AB{p}", lagrange("sigma"), p, dict.fromkeys(SHAPES, p)) for p in (1, 2, 3, 4)],
    *[(f"DEIS-tAB{p}", lagrange("vp_time"), p, dict.fromkeys(SHAPES, p)) for p in (2, 3, 4)],
    *[(f"logrho-{p}", lagrange("log_sigma"), p, dict.fromkeys(SHAPES, p)) for p in (2, 3)],
    # fixed equal-step weights: order p on equal steps, FIRST order once the step ratios are
    # fixed and != 1 (on the smooth schedules used in practice the ratios tend to 1 and the
    # global order is 2, see the global cases)
    *[(f"iPNDM-{p}", ab_fixed, p, {"equal": p, "geometric": 1, "irregular": 1}) for p in (2, 3, 4)],
    ("iPNDM_v-ref-2", ab_reference_v, 2, dict.fromkeys(SHAPES, 2)),
    # reference T_1 is the exact weight only on equal steps; O(1) off on fixed ratios != 1
    ("iPNDM_v-ref-3", ab_reference_v, 3, {"equal": 3, "geometric": 2, "irregular": 2}),
    # reference order-4 weights: third order on equal steps (57/24 ...), second on geometric
    # steps (T_1 off), inconsistent (weights not summing to 1) on irregular steps. On equal steps
    # two error terms cancel near h = 0.03 (local slopes 5.9, 3.2, 3.4, 3.8, 3.9 from h = 0.1),
    # so this case starts at h0 = 0.0125
    ("iPNDM_v-ref-4", ab_reference_v, 4, {"equal": 3, "geometric": 2, "irregular": 0}, 0.0125),
]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_local_truncation_order(case, local_errors):
    name, weights, order, expected, *rest = case
    for shape, q in expected.items():
        hs, errs = local_errors(weights, shape, order, rest[0] if rest else 0.05)
        assert all(e > 1e-12 for e in errs), (shape, errs)
        slope = fit_order([1 / h for h in hs], errs)
        assert abs(slope - (q + 1)) <= 0.3, (name, shape, slope, errs)


def test_multistep_weights_on_equal_steps_are_adams_bashforth():
    t = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=DTYPE)
    exact = solvers.multistep_coefficients(t, 4, "sigma")
    for p in (1, 2, 3, 4):
        np.testing.assert_allclose(exact[p - 1], [-c for c in solvers.IPNDM_COEFFICIENTS[p]], rtol=1e-13)
    # the reference's iPNDM_v weights: AB2 / AB3 on equal steps, but NOT AB4
    for p in (1, 2, 3):
        np.testing.assert_allclose(solvers.ipndm_v_coefficients([-1.0] * p, p), solvers.IPNDM_COEFFICIENTS[p],
                                   rtol=1e-14)
    np.testing.assert_allclose(solvers.ipndm_v_coefficients([-1.0] * 4, 4), np.array([57, -65, 43, -11]) / 24,
                               rtol=1e-14)
    # and on unequal, non-geometric steps its order-4 weights do not sum to 1
    h = [-1.0, -1.3, -0.8, -1.6]
    assert abs(sum(solvers.ipndm_v_coefficients(h, 4)) - 1) > 1e-2
    assert math.isclose(sum(solvers.ipndm_v_coefficients(h, 3)), 1.0, rel_tol=1e-14)
