"""Noise-level schedules: N decreasing sigmas from sigma_max to sigma_min.

All formulas follow ``shared/docs/sfd-spec.md`` section 2 (the reference's ``get_schedule``).
Schedules are computed in float64 and returned as float64 tensors; the solvers cast.
"""

from __future__ import annotations

import math

import torch

TIME_UNIFORM_EPS = 1e-3


def polynomial(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM schedule (Karras et al. 2022, eq. 5):
    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check(n, sigma_min, sigma_max)
    frac = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + frac * (lo - hi)) ** rho


def logsnr(n: int, sigma_min: float, sigma_max: float, rho: float | None = None) -> torch.Tensor:
    """Uniform in lambda = -ln(sigma): t_i = sigma_max (sigma_min / sigma_max)^(i/(N-1)).
    (DPM-Solver, Lu et al. 2022; rho is unused.)"""
    _check(n, sigma_min, sigma_max)
    frac = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.exp(math.log(sigma_max) + frac * (math.log(sigma_min) - math.log(sigma_max)))


def vp_parameters(sigma_min: float, sigma_max: float, eps: float = TIME_UNIFORM_EPS) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP SDE with sigma_VP(1) = sigma_max and sigma_VP(eps) = sigma_min,
    where sigma_VP(s) = sqrt(exp(beta_d s^2 / 2 + beta_min s) - 1) (Song et al. 2021)."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps - math.log(sigma_max**2 + 1)) / (eps - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def time_uniform(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Uniform (rho = 1) or polynomially warped VP time s in [eps, 1], mapped through sigma_VP:
    s_i = (1 + i/(N-1) (eps^(1/rho) - 1))^rho, t_i = sigma_VP(s_i)."""
    _check(n, sigma_min, sigma_max)
    beta_d, beta_min = vp_parameters(sigma_min, sigma_max)
    frac = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (1 + frac * (TIME_UNIFORM_EPS ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.expm1(0.5 * beta_d * s**2 + beta_min * s))


SCHEDULES = {"polynomial": polynomial, "logsnr": logsnr, "time_uniform": time_uniform}


def get_schedule(kind: str, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Look up a schedule by name (``polynomial``, ``logsnr``, ``time_uniform``)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[kind](n, sigma_min, sigma_max, rho)


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 timestamps, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
