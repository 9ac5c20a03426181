"""Probability-flow ODE solvers in the EDM (x, sigma) parameterisation.

The ODE is dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with
s(t) = 1, sigma(t) = t); ``d`` equals the noise prediction eps_hat.

Each solver is a generator ``solver(denoiser, x, sigmas, *, afs, cond, ...)`` that starts from
``x`` at ``sigmas[0]`` and yields the state after each step, i.e. at ``sigmas[1:]``. ``sample``
runs one to the end, ``trajectory`` keeps every state. Formulas follow
``shared/docs/sfd-spec.md`` section 3; the NFE of each solver is counted by
``CountingDenoiser`` in the tests, not trusted from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sfdbench.diffusion.denoiser import Denoiser, analytic_first_direction

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
    one before at most second, for every N (as in the reference; spec section 3.6). During the
    warm-up the warm-start rule wins: with N = 3 and max_order 3 the last step is second order.
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
    mode stores d = eps_hat. AFS replaces the first evaluation (spec sections 3.1, 3.6)."""
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


def sample(solver: Solver, denoiser: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
           **options: Any) -> torch.Tensor:
    """Run ``solver`` from unit-Gaussian ``latents`` (x = z * sigma_0) and return the final state
    at sigma_{N-1} (no final denoising; spec section 1.1)."""
    sigmas = sigmas.to(device=latents.device, dtype=latents.dtype)
    x = latents * sigmas[0]
    for state in solver(denoiser, x, sigmas, **options):
        x = state
    return x


def trajectory(solver: Solver, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
               **options: Any) -> torch.Tensor:
    """All states [x at sigma_0 (the start), ..., x at sigma_{N-1}] stacked: shape [N, *x.shape]."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return torch.stack([x, *solver(denoiser, x, sigmas, **options)])


SOLVERS: dict[str, Solver] = {"euler": euler, "heun": heun, "dpmpp": dpmpp_multistep}
