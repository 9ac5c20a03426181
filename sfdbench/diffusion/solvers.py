"""Probability-flow ODE solvers in the EDM (x, sigma) parameterisation.

The ODE is dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with
s(t) = 1, sigma(t) = t); ``d`` equals the noise prediction eps_hat.

Each solver is a generator ``solver(denoiser, x, sigmas, *, afs, cond, ...)`` that starts from
``x`` at ``sigmas[0]`` and yields the state after each step, i.e. at ``sigmas[1:]``. ``sample``
runs one to the end, ``trajectory`` keeps every state. Formulas follow ``docs/algorithms.md#solvers``
(the papers cited per solver, as the SFD reference implementation, zju-pi/diff-sampler, writes them
in ``diff-solvers-main/solvers.py``); the NFE of each solver is counted by ``CountingDenoiser`` in the
tests, not trusted from here.

Solvers (``SOLVERS``): euler / ddim, heun, dpm2 (``dpm_solver_2``), dpmpp (``dpmpp_multistep``),
ipndm, ipndm_v, deis, unipc. All take ``afs``. NFE per sample with N timestamps: N - 1, or
2(N - 1) for heun and dpm2; AFS saves exactly one. Their measured convergence orders, and why some
differ from the names' promise, are in ``sfdbench.diffusion.convergence``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from sfdbench.diffusion.denoiser import Denoiser, analytic_first_direction
from sfdbench.diffusion.schedules import vp_parameters

Solver = Callable[..., Iterator[torch.Tensor]]


def direction(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> torch.Tensor:
    """d(x, sigma) = (x - D(x; sigma)) / sigma."""
    return (x - denoiser(x, sigma, **(cond or {}))) / sigma


def first_direction(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, afs: bool,
                    cond: dict | None) -> torch.Tensor:
    """The direction at the first timestamp: analytic (AFS, no network call) or evaluated."""
    return analytic_first_direction(x, sigma) if afs else direction(denoiser, x, sigma, cond)


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
          cond: dict | None = None) -> Iterator[torch.Tensor]:
    """Euler's method, x_{i+1} = x_i + (t_{i+1} - t_i) d_i. In this parameterisation it is
    exactly deterministic DDIM (Song et al. 2021, eta = 0). 1 NFE per step."""
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        x = x + (t_next - t_cur) * d
        yield x


def heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
         cond: dict | None = None) -> Iterator[torch.Tensor]:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler predictor to t_{i+1}
    and the trapezoidal corrector x_{i+1} = x_i + (t_{i+1} - t_i)(d_i + d'_{i+1}) / 2, on every
    step (the schedule ends at sigma_min > 0). 2 NFE per step (AFS saves one at step 0)."""
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        x_pred = x + (t_next - t_cur) * d
        if t_next == 0:  # a schedule that ends at 0 cannot evaluate the corrector there
            x = x_pred
        else:
            x = x + (t_next - t_cur) * 0.5 * (d + direction(denoiser, x_pred, t_next, cond))
        yield x


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen): per sample s = max(1, q_ratio(|x0|)),
    return clip(x0, -s, s) / s. For pixel data with s = 1 this is clipping to [-1, 1]."""
    flat = x0.abs().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32), ratio, dim=1)
    s = s.clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def dpmpp_order(i: int, num_steps: int, max_order: int, lower_order_final: bool) -> int:
    """Order of DPM-Solver++ step i (0-based) on a schedule of ``num_steps`` timestamps.

    Warm start with order i + 1; with ``lower_order_final`` the order is then capped by the
    number of remaining steps, so once past the warm-up the last step is first order and the
    one before at most second, for every N (as in the reference, ``diff-solvers-main/solvers.py``;
    ``docs/algorithms.md#dpm-solver-2m-and-3m``). During the warm-up the warm-start rule wins:
    with N = 3 and max_order 3 the last step is second order.
    (diffusers lowers orders only below 15 steps and always makes the last step first order.)"""
    if lower_order_final:
        return i + 1 if i + 1 < max_order else min(max_order, num_steps - (i + 1))
    return min(max_order, i + 1)


def dpmpp_update(x: torch.Tensor, models: list[torch.Tensor], times: list[torch.Tensor],
                 t: torch.Tensor, order: int, predict_x0: bool) -> torch.Tensor:
    """One multistep DPM-Solver++ update (Lu et al. 2022, arXiv 2211.01095, Alg. 2 and the
    3rd-order variant of DPM-Solver), written for the VE (EDM) state with lambda = -ln(sigma).

    ``models``/``times`` hold the newest model values last (x0 estimates when ``predict_x0``,
    noise predictions otherwise)."""
    m0, t0 = models[-1], times[-1]
    h = math.log(float(t0)) - math.log(float(t))
    if order >= 2:
        m1, t1 = models[-2], times[-2]
        r0 = (math.log(float(t1)) - math.log(float(t0))) / h
        d1_0 = (m0 - m1) / r0
    if order >= 3:
        m2, t2 = models[-3], times[-3]
        r1 = (math.log(float(t2)) - math.log(float(t1))) / h
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if predict_x0:
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        base = (t / t0) * x - phi1 * m0
        if order == 1:
            return base
        if order == 2:
            return base - 0.5 * phi1 * d1_0
        return base + phi2 * d1 - phi3 * d2
    phi1 = math.expm1(h)
    phi2 = phi1 / h - 1
    phi3 = phi2 / h - 0.5
    base = x - t * phi1 * m0
    if order == 1:
        return base
    if order == 2:
        return base - 0.5 * t * phi1 * d1_0
    return base - t * phi2 * d1 - t * phi3 * d2


def dpmpp_multistep(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
                    cond: dict | None = None, max_order: int = 3, lower_order_final: bool = True,
                    predict_x0: bool = True, thresholding: bool = True) -> Iterator[torch.Tensor]:
    """Multistep DPM-Solver++ of order ``max_order`` (1-3), "DPM-Solver++(kM)". 1 NFE per step.

    Data-prediction mode stores thresholded x0 estimates (``thresholding``); noise-prediction
    mode stores d = eps_hat. AFS replaces the first evaluation (Zhou et al. 2024 (AMED), AFS;
    Lu et al. 2022, DPM-Solver++ Algorithm 2; ``docs/algorithms.md#analytical-first-step``,
    ``docs/algorithms.md#dpm-solver-2m-and-3m``)."""
    if not 1 <= max_order <= 3:
        raise ValueError(f"DPM-Solver++ supports orders 1-3, got {max_order}")
    models: list[torch.Tensor] = []
    times: list[torch.Tensor] = []
    n = len(sigmas)
    for i in range(n - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        if predict_x0:
            x0 = x - t_cur * d
            m = dynamic_threshold(x0) if thresholding else x0
        else:
            m = d
        models, times = (models + [m])[-3:], (times + [t_cur])[-3:]
        x = dpmpp_update(x, models, times, t_next, dpmpp_order(i, n, max_order, lower_order_final), predict_x0)
        yield x


ddim = euler  # deterministic DDIM (eta = 0) is Euler in the EDM parameterisation (docs/algorithms.md#euler-and-ddim)


def dpm_solver_2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
                 cond: dict | None = None, r: float = 0.5) -> Iterator[torch.Tensor]:
    """DPM-Solver-2 (Lu et al. 2022, arXiv 2206.00927), single-step, as the reference writes it in
    sigma-space (``docs/algorithms.md#dpm-solver-2``): an intermediate time t_m = t_{i+1}^r t_i^(1-r)
    (geometric, i.e. the midpoint in log-sigma for r = 1/2), an Euler predictor x_m = x_i + (t_m - t_i) d_i, its
    direction d_m, and x_{i+1} = x_i + (t_{i+1} - t_i) [d_m / (2r) + (1 - 1/(2r)) d_i]
    (= x_i + (t_{i+1} - t_i) d_m for r = 1/2). 2 NFE per step; AFS replaces d_0 (saves one).

    Since t_m - t_i = (t_{i+1} - t_i)(1/2 + O(h)) on a smooth schedule, this is a 2-stage
    Runge-Kutta method with b_2 c_2 = 1/2 + O(h): globally second order. diffusers'
    ``KDPM2DiscreteScheduler`` is the same update (tests/test_solvers_crosscheck.py)."""
    if not 0 < r <= 1:
        raise ValueError(f"DPM-Solver-2 needs 0 < r <= 1, got {r}")
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        if t_next == 0:  # no intermediate evaluation possible at sigma = 0: an Euler step (as heun)
            x = x + (t_next - t_cur) * d
        else:
            t_mid = t_next**r * t_cur ** (1 - r)
            d_mid = direction(denoiser, x + (t_mid - t_cur) * d, t_mid, cond)
            x = x + (t_next - t_cur) * (d_mid / (2 * r) + (1 - 1 / (2 * r)) * d)
        yield x


# Adams-Bashforth coefficients on (d_i, d_{i-1}, d_{i-2}, d_{i-3}) for equal steps
IPNDM_COEFFICIENTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                      4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
          cond: dict | None = None, max_order: int = 4) -> Iterator[torch.Tensor]:
    """iPNDM (Zhang & Chen 2023, DEIS paper, arXiv 2204.13902; ``docs/algorithms.md#ipndm``):
    Adams-Bashforth with the FIXED equal-step coefficients on the directions d,
    x_{i+1} = x_i + (t_{i+1} - t_i) sum_j c_j d_{i-j}, of order p = min(max_order, i + 1)
    (warm start; no lower-order final steps):
    p=1 (1), p=2 (3, -1)/2, p=3 (23, -16, 5)/12, p=4 (55, -59, 37, -9)/24. 1 NFE per step.

    On unequal steps the fixed coefficients are not the variable-step ones: on a smooth schedule
    (step ratios -> 1 as N grows, e.g. polynomial or logsnr) the method is globally second order,
    with step ratios fixed away from 1 only first order (``sfdbench.diffusion.convergence``,
    tests/test_convergence.py)."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"iPNDM supports orders 1-4, got {max_order}")
    history: list[torch.Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        history = [d, *history][:max_order]
        x = x + (t_next - t_cur) * _combine(IPNDM_COEFFICIENTS[len(history)], history)
        yield x


def _combine(coefficients, tensors: list[torch.Tensor]) -> torch.Tensor:
    out = coefficients[0] * tensors[0]
    for c, t in zip(coefficients[1:], tensors[1:]):
        out = out + c * t
    return out


def ipndm_v_coefficients(h: list[float], order: int) -> tuple[float, ...]:
    """The reference's variable-step Adams-Bashforth weights c_1..c_p of iPNDM_v (zju-pi/diff-sampler,
    ``diff-solvers-main/solvers.py``; ``docs/algorithms.md#variable-step-ipndm``), for
    step sizes ``h = [h_n, h_{n-1}, h_{n-2}, h_{n-3}]`` (newest first; sigma differences):
    x_{i+1} = x_i + h_n sum_k c_k d_{i-k+1}.

    Written as the reference evaluates them (its operator precedence included). Order 2 is the
    exact variable-step Adams-Bashforth rule. Order 3: T_1 = (1 - h_n^2 / (3 h_{n-1} (h_{n-1} +
    h_{n-2}))) / 2, while the exact weight is (1 - h_n / (3 (h_n + h_{n-1}))) h_n (h_n + h_{n-1}) /
    (2 h_{n-1} (h_{n-1} + h_{n-2})); they agree on equal steps and differ by O(h) on smooth grids
    (third order kept), by O(1) when step ratios stay away from 1 (then second order). Order 4:
    on equal steps (57, -65, 43, -11)/24 instead of (55, -59, 37, -9)/24 (third order), and on
    unequal steps c_1 + c_2 + c_3 + c_4 = 1 + T_2 Q (h_{n-2}/h_{n-3} - h_{n-1}/h_{n-2}) != 1
    (c_4 has h_{n-1}/h_{n-2} where consistency needs h_{n-2}/h_{n-3}): second order on smooth grids,
    inconsistent on irregular ones. ``exact=True`` in ``ipndm_v`` uses the exact weights instead
    (``multistep_coefficients(..., variable="sigma")``)."""
    if order == 1:
        return (1.0,)
    hn, h1 = h[0], h[1]
    a = hn / h1
    if order == 2:
        return ((2 + a) / 2, -a / 2)
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return ((2 + a) / 2 + t1, -a / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2)
    h3 = h[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return ((2 + a) / 2 + t1 + t2,
            -a / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2)


def ipndm_v(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
            cond: dict | None = None, max_order: int = 4, exact: bool = False) -> Iterator[torch.Tensor]:
    """iPNDM_v, variable-step Adams-Bashforth on d (``docs/algorithms.md#variable-step-ipndm``; the SFD
    reference implementation, zju-pi/diff-sampler, file ``diff-solvers-main/solvers.py``):
    order p = min(max_order, i + 1), x_{i+1} = x_i + h_n sum_k c_k d_{i-k+1} with the reference's
    weights ``ipndm_v_coefficients`` (default, reproduces the published baseline) or, with
    ``exact=True``, the exact variable-step weights (integral over [t_i, t_{i+1}] of the Lagrange
    polynomial through (t_{i-j}, d_{i-j})). 1 NFE per step; AFS replaces d_0."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"iPNDM_v supports orders 1-4, got {max_order}")
    t = [float(s) for s in sigmas]
    exact_weights = multistep_coefficients(sigmas, max_order, "sigma") if exact else None
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        history = [d, *history][:max_order]
        if exact_weights is not None:
            x = x + _combine(exact_weights[i], history)
        else:
            h = [t[i + 1 - k] - t[i - k] for k in range(len(history))]  # h_n, h_{n-1}, ...
            x = x + (t_next - t_cur) * _combine(ipndm_v_coefficients(h, len(history)), history)
        yield x


def vp_time(sigma, beta_d: float, beta_min: float):
    """sigma_VP^-1 (``docs/algorithms.md#time-uniform-vp-schedule``, ``docs/algorithms.md#deis``):
    s = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)) - beta_min) / beta_d


def vp_dsigma_ds(s, beta_d: float, beta_min: float):
    """d sigma_VP / ds in the DEIS form of the SFD reference implementation (zju-pi/diff-sampler,
    ``diff-solvers-main/solver_utils.py`` ``get_deis_coeff_list``; Zhang & Chen 2023, DEIS)
    g(s) = -(1/2) (d ln alpha-bar / ds) / sqrt(alpha-bar (1 - alpha-bar))
    with the ANALYTIC derivative d ln alpha-bar / ds = -(beta_d s + beta_min) (the reference uses
    autodiff; same value), alpha-bar(s) = exp(-(beta_d s^2 / 2 + beta_min s))."""
    s = np.asarray(s, dtype=np.float64)
    log_abar = -(0.5 * beta_d * s**2 + beta_min * s)
    abar = np.exp(log_abar)
    return 0.5 * (beta_d * s + beta_min) / np.sqrt(abar * -np.expm1(log_abar))


DEIS_VP_RANGE = (0.002, 80.0)  # the reference maps sigma to VP time with these, whatever the model
RIEMANN_POINTS = 10_000
GAUSS_POINTS = 64


def multistep_coefficients(sigmas: torch.Tensor, max_order: int, variable: str = "vp_time",
                           quadrature: str = "gauss") -> list[tuple[float, ...]]:
    """Per-step weights C_{i,j} of an Adams-Bashforth integrator on the directions d:
    x_{i+1} = x_i + sum_{j<p} C_{i,j} d_{i-j}, p = min(max_order, i + 1), with

        C_{i,j} = integral from u_i to u_{i+1} of (d sigma / du)(u) L_j(u) du,

    L_j the Lagrange basis on the nodes u_i, u_{i-1}, ..., u_{i-p+1}: the exact increment
    integral d d(sigma) with d replaced by its polynomial interpolant in the variable u.
    For p = 1 the weight is t_{i+1} - t_i (Euler).

    ``variable``: ``vp_time`` -- DEIS tAB (``docs/algorithms.md#deis``): u = s = sigma_VP^-1(sigma) with the fixed VP
    parameters of sigma in [0.002, 80], d sigma/ds from ``vp_dsigma_ds``; ``log_sigma`` -- u =
    ln sigma, diffusers' DEISMultistepScheduler ("logrho"); ``sigma`` -- u = sigma, the exact
    variable-step Adams-Bashforth weights (``ipndm_v(exact=True)``).

    ``quadrature``: ``gauss`` (default) -- 64-point Gauss-Legendre on each interval, exact to
    round-off for these smooth integrands (checked against scipy.integrate.quad in the tests);
    ``riemann`` -- the reference's sum over 10,000 equispaced points including both ends times
    (u_{i+1} - u_i) / 10,000, which carries a relative error of ~1e-4 (O(1/10,000))."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"multistep coefficients support orders 1-4, got {max_order}")
    sig = np.array([float(s) for s in sigmas], dtype=np.float64)
    if variable == "vp_time":
        beta_d, beta_min = vp_parameters(*DEIS_VP_RANGE)
        u = vp_time(sig, beta_d, beta_min)

        def jacobian(v):
            return vp_dsigma_ds(v, beta_d, beta_min)
    elif variable == "log_sigma":
        u, jacobian = np.log(sig), np.exp
    elif variable == "sigma":
        u, jacobian = sig, np.ones_like
    else:
        raise ValueError(f"unknown interpolation variable {variable!r}; known: vp_time, log_sigma, sigma")
    if quadrature == "gauss":
        ref_nodes, ref_weights = np.polynomial.legendre.leggauss(GAUSS_POINTS)
    elif quadrature != "riemann":
        raise ValueError(f"unknown quadrature {quadrature!r}; known: gauss, riemann")
    out: list[tuple[float, ...]] = []
    for i in range(len(sig) - 1):
        p = min(max_order, i + 1)
        if p == 1:
            out.append((sig[i + 1] - sig[i],))
            continue
        a, b = u[i], u[i + 1]
        if quadrature == "gauss":
            v = 0.5 * (b - a) * ref_nodes + 0.5 * (a + b)
            w = 0.5 * (b - a) * ref_weights
        else:
            v = np.linspace(a, b, RIEMANN_POINTS)
            w = np.full(RIEMANN_POINTS, (b - a) / RIEMANN_POINTS)
        nodes = [u[i - j] for j in range(p)]
        weighted = w * jacobian(v)
        coeffs = []
        for j in range(p):
            basis = np.ones_like(v)
            for k in range(p):
                if k != j:
                    basis = basis * (v - nodes[k]) / (nodes[j] - nodes[k])
            coeffs.append(float(np.sum(weighted * basis)))
        out.append(tuple(coeffs))
    return out


def deis(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
         cond: dict | None = None, max_order: int = 3, interpolation: str = "vp_time",
         quadrature: str = "gauss") -> Iterator[torch.Tensor]:
    """DEIS, tAB variant (Zhang & Chen 2023, arXiv 2204.13902; ``docs/algorithms.md#deis``): multistep
    exponential-integrator weights precomputed from the schedule (``multistep_coefficients``),
    x_{i+1} = x_i + sum_{j<p} C_{i,j} d_{i-j}, p = min(max_order, i + 1), Euler for p = 1; no
    lower-order final steps. In the EDM (VE) state the exponential integrator's linear part is the
    identity, so tAB is Adams-Bashforth on d = eps_hat with the polynomial in VP time s.
    Defaults: tAB, exact (Gauss-Legendre) weights; ``quadrature="riemann"`` reproduces the
    reference's 10,000-point Riemann sum, ``interpolation="log_sigma"`` diffusers' "logrho" DEIS.
    1 NFE per step; AFS replaces d_0."""
    weights = multistep_coefficients(sigmas, max_order, interpolation, quadrature)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        d = first_direction(denoiser, x, t_cur, afs, cond) if i == 0 else direction(denoiser, x, t_cur, cond)
        history = [d, *history][:max_order]
        x = x + _combine(weights[i], history)
        yield x


def unipc_coefficients(rks: list[float], hh: float, order: int, variant: str) -> tuple[float, list[float], list[float]]:
    """B(h) and the UniP / UniC weights of UniPC-p (Zhao et al. 2023, arXiv 2302.04867;
    ``docs/algorithms.md#unipc``).

    ``rks`` = (r_1, ..., r_{p-1}); ``hh`` = -h (data prediction) or h (noise prediction).
    R has rows r^(k-1) (k = 1..p, r = (r_1, ..., r_{p-1}, 1)); b_k = psi_k k! / B(h) with
    psi_1 = (e^hh - 1)/hh - 1, psi_{k+1} = psi_k / hh - 1/(k+1)!; B(h) = hh (bh1) or e^hh - 1 (bh2).
    Predictor: none for p = 1, (1/2) for p = 2, else R[:p-1, :p-1]^-1 b[:p-1]; corrector: (1/2) for
    p = 1, else R^-1 b."""
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}; known: bh1, bh2")
    r = np.array([*rks, 1.0], dtype=np.float64)
    rows, b = [], []
    psi, factorial = math.expm1(hh) / hh - 1, 1.0
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(psi * factorial / b_h)
        factorial *= k + 1
        psi = psi / hh - 1 / factorial
    big_r, b = np.stack(rows), np.array(b)
    if order == 1:
        return b_h, [], [0.5]
    rho_p = [0.5] if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
    return b_h, rho_p, np.linalg.solve(big_r, b).tolist()


def unipc_order(i: int, num_steps: int, max_order: int, lower_order_final: bool) -> int:
    """UniPC order at step i (``docs/algorithms.md#unipc``): warm-up p = i + 1 while i + 1 < max_order, then
    min(max_order, N - 1 - i) with ``lower_order_final`` (else max_order) -- the same rule as
    ``dpmpp_order``."""
    return dpmpp_order(i, num_steps, max_order, lower_order_final)


def unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, afs: bool = False,
          cond: dict | None = None, max_order: int = 3, variant: str = "bh2", predict_x0: bool = True,
          lower_order_final: bool = True, thresholding: bool = True) -> Iterator[torch.Tensor]:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867) in VE form (``docs/algorithms.md#unipc``): multistep
    UniP predictor of order p plus the UniC corrector, which reuses the model value at the *predicted*
    point (so it costs no extra evaluation: that value is also the next step's model value).

    lambda = -ln sigma, h = lambda(t) - lambda(t_0'), r_k = (lambda(T[-(k+1)]) - lambda(t_0'))/h,
    Delta_k = (M[-(k+1)] - m_0)/r_k. Data prediction (m = thresholded D): base = (t/t_0') x - phi m_0,
    phi = expm1(-h); noise prediction (m = d): base = x - t phi m_0, phi = expm1(h);
    x_pred = base - B(h) sum_k rho^p_k Delta_k; corrector x_c = base - B(h) (sum_k rho^c_k Delta_k +
    rho^c_p (m_t - m_0)), with a factor t on the B(h) terms in noise mode.

    NFE = 1 (initial model value; 0 with AFS) + 1 per non-final step = N - 1 (N - 2 with AFS).
    The final step never runs the corrector. (The reference runs it on the final step when
    N - 1 < max_order -- an evaluation its NFE formula does not count (zju-pi/diff-sampler,
    ``diff-solvers-main/solvers.py``; ``docs/algorithms.md#deliberate-departures-from-the-reference``);
    we count every call, so our final state there is the uncorrected predictor.)"""
    if not 1 <= max_order <= 4:
        raise ValueError(f"UniPC supports orders 1-4 here, got {max_order}")
    n = len(sigmas)

    def model_value(x_: torch.Tensor, t_: torch.Tensor, d_: torch.Tensor) -> torch.Tensor:
        if not predict_x0:
            return d_
        x0 = x_ - t_ * d_
        return dynamic_threshold(x0) if thresholding else x0

    models = [model_value(x, sigmas[0], first_direction(denoiser, x, sigmas[0], afs, cond))]
    times = [sigmas[0]]
    for i in range(n - 1):
        t = sigmas[i + 1]
        p = unipc_order(i, n, max_order, lower_order_final)
        m0, t0 = models[-1], float(times[-1])
        h = math.log(t0) - math.log(float(t))
        rks = [(math.log(t0) - math.log(float(times[-(k + 1)]))) / h for k in range(1, p)]
        deltas = [(models[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
        hh = -h if predict_x0 else h
        b_h, rho_p, rho_c = unipc_coefficients(rks, hh, p, variant)
        phi = math.expm1(hh)
        scale = b_h if predict_x0 else t * b_h
        base = (t / t0) * x - phi * m0 if predict_x0 else x - t * phi * m0
        x_pred = base - scale * _combine(rho_p, deltas) if deltas else base
        if i == n - 2:  # final step: no corrector (it would cost an evaluation at sigma_min)
            x = x_pred
        else:
            m_t = model_value(x_pred, t, direction(denoiser, x_pred, t, cond))
            correction = rho_c[-1] * (m_t - m0)
            if deltas:
                correction = correction + _combine(rho_c[:-1], deltas)
            x = base - scale * correction
            models, times = (models + [m_t])[-max_order:], (times + [t])[-max_order:]
        yield x


def sample(solver: Solver, denoiser: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
           **options: Any) -> torch.Tensor:
    """Run ``solver`` from unit-Gaussian ``latents`` (x = z * sigma_0) and return the final state
    at sigma_{N-1} (no final denoising; ``docs/algorithms.md#notation-and-the-probability-flow-ode``)."""
    sigmas = sigmas.to(device=latents.device, dtype=latents.dtype)
    x = latents * sigmas[0]
    for state in solver(denoiser, x, sigmas, **options):
        x = state
    return x


def sampler(solver: Solver, sigmas: torch.Tensor, *, add_cond: dict | None = None, **options: Any):
    """``sample`` with the solver, schedule and options bound: ``f(denoiser, latents, cond=None) ->
    final state``, the shape of a method's sampler (``methods.base.Fitted.sample``). ``cond`` is
    the suite's per-sample conditioning; ``add_cond`` (e.g. SFD-v's step condition) is added to it."""
    return functools.partial(_sample_latents, solver, sigmas, options, add_cond or {})


def _sample_latents(solver: Solver, sigmas: torch.Tensor, options: dict, add_cond: dict, denoiser: Denoiser,
                    latents: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    return sample(solver, denoiser, latents, sigmas, cond={**(cond or {}), **add_cond}, **options)


def trajectory(solver: Solver, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
               **options: Any) -> torch.Tensor:
    """All states [x at sigma_0 (the start), ..., x at sigma_{N-1}] stacked: shape [N, *x.shape]."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return torch.stack([x, *solver(denoiser, x, sigmas, **options)])


SOLVERS: dict[str, Solver] = {"euler": euler, "ddim": ddim, "heun": heun, "dpm2": dpm_solver_2,
                              "dpmpp": dpmpp_multistep, "ipndm": ipndm, "ipndm_v": ipndm_v, "deis": deis,
                              "unipc": unipc}
