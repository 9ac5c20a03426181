"""Noise-level schedules: N decreasing sigmas from sigma_max to sigma_min.

All formulas follow ``docs/algorithms.md#schedules`` and the SFD reference implementation's
``get_schedule`` (zju-pi/diff-sampler, ``sfd-main/solver_utils.py``):
``polynomial`` (EDM), ``logsnr``, ``time_uniform`` (VP time), ``discrete`` (LDM / Stable
Diffusion, from the model's 1000-step table via ``DiscreteVP``; rho = 1 only) and ``custom``
(an explicit sigma list). Schedules are computed in float64 and returned as float64 tensors
(the reference uses float32); the solvers cast.
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


def custom(sigmas) -> torch.Tensor:
    """An explicit list of noise levels (``docs/algorithms.md#custom-schedule``): N = its length,
    sigma_max / sigma_min = its ends. Must be 1-D, finite, positive and strictly decreasing (the
    solvers divide by sigma and take its logarithm)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().clone()
    if sig.ndim != 1 or len(sig) < 2:
        raise ValueError(f"a custom schedule needs a 1-D list of at least 2 sigmas, got shape {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()) or not bool((sig > 0).all()):
        raise ValueError("a custom schedule must hold finite sigmas > 0 (solvers divide by sigma)")
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError("a custom schedule must be strictly decreasing (from sigma_max to sigma_min)")
    return sig


class DiscreteVP:
    """The continuous-time view of a discrete VP (DDPM) noise table, as the reference's
    CFGPrecond wrapper builds it for LDM and Stable Diffusion epsilon-models (the SFD reference
    implementation, zju-pi/diff-sampler, file ``sfd-main/models/networks_edm.py``; see
    ``docs/algorithms.md#discrete-vp-wrapper-for-epsilon-prediction-models``).

    The table alpha-bar_n, n = 0..M-1, sits at tau_n = (n + 1) / M with log alpha(tau_n) =
    ln(alpha-bar_n) / 2; log alpha(tau) is the piecewise-linear interpolation of these points
    (linear extrapolation beyond both ends, using the two outermost points).
    sigma(tau) = sqrt(1 - alpha^2) / alpha, and sigma^-1 inverts the same interpolation through
    log alpha = -ln(1 + sigma^2) / 2. ``timestep(sigma) = M sigma^-1(sigma) - 1`` is the fractional
    discrete timestep the reference feeds the U-Net (c_noise). Everything is float64.

    Naming trap: the LDM code base calls its schedule "linear" but builds
    betas = linspace(sqrt(beta_start), sqrt(beta_end), M)^2 -- what diffusers calls
    "scaled_linear". Both ``ldm()`` (0.0015 -> 0.0195, sigma(1) = 83.82) and ``sd()``
    (0.00085 -> 0.012, sigma(1) = 14.61) use that form; these sigma_max values are the ones in
    ``docs/algorithms.md#discrete-vp-wrapper-for-epsilon-prediction-models``. ``linear()`` is the
    plain linspace of betas (diffusers' "linear")."""

    def __init__(self, alphas_cumprod):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
        if abar.ndim != 1 or len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1)")
        if not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (all betas > 0)")
        self.alphas_cumprod = abar
        self.num_timesteps = len(abar)
        self.taus = torch.arange(1, len(abar) + 1, dtype=torch.float64) / len(abar)
        self.log_alphas = 0.5 * torch.log(abar)  # strictly decreasing in tau

    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, dim=0))

    @classmethod
    def scaled_linear(cls, beta_start: float, beta_end: float, num_timesteps: int = 1000) -> DiscreteVP:
        """betas = linspace(sqrt(beta_start), sqrt(beta_end), M)^2 (LDM's "linear")."""
        return cls.from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2)

    @classmethod
    def linear(cls, beta_start: float, beta_end: float, num_timesteps: int = 1000) -> DiscreteVP:
        """betas = linspace(beta_start, beta_end, M) (DDPM's / diffusers' "linear")."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def ldm(cls) -> DiscreteVP:
        """LSUN-Bedroom / FFHQ LDM (betas 0.0015 -> 0.0195, LDM "linear" = square-root spacing)."""
        return cls.scaled_linear(0.0015, 0.0195)

    @classmethod
    def sd(cls) -> DiscreteVP:
        """Stable Diffusion v1.x (scaled-linear betas 0.00085 -> 0.012)."""
        return cls.scaled_linear(0.00085, 0.012)

    def log_alpha(self, tau) -> torch.Tensor:
        return _interp(torch.as_tensor(tau, dtype=torch.float64), self.taus, self.log_alphas)

    def sigma(self, tau) -> torch.Tensor:
        """sigma(tau) = sqrt(1 - alpha^2) / alpha = sqrt(exp(-2 log alpha) - 1)."""
        return torch.sqrt(torch.expm1(-2 * self.log_alpha(tau)))

    def tau(self, sigma) -> torch.Tensor:
        """sigma^-1: log alpha = -ln(1 + sigma^2) / 2, then the inverse interpolation."""
        log_alpha = -0.5 * torch.log1p(torch.as_tensor(sigma, dtype=torch.float64) ** 2)
        return _interp(log_alpha, self.log_alphas.flip(0), self.taus.flip(0))

    def timestep(self, sigma) -> torch.Tensor:
        """The fractional discrete timestep M sigma^-1(sigma) - 1 (the reference's c_noise)."""
        return self.num_timesteps * self.tau(sigma) - 1

    def sigma_range(self, tau_min: float = 1e-3) -> tuple[float, float]:
        """The reference wrapper's default (sigma_min, sigma_max) = (sigma(1e-3), sigma(1))."""
        return float(self.sigma(tau_min)), float(self.sigma(1.0))

    def schedule(self, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 1.0) -> torch.Tensor:
        """The reference's ``discrete`` schedule (``docs/algorithms.md#discrete-ldm-and-sd-schedule``;
        zju-pi/diff-sampler, ``sfd-main/solver_utils.py``) for rho = 1: uniform in tau from
        sigma^-1(sigma_max) to sigma^-1(sigma_min), t_i = sigma(tau_i).

        rho != 1 is rejected: the reference computes (tau_max + i/(N-1) (tau_min^(1/rho) -
        tau_max))^rho, raising only tau_min to 1/rho, which is the intended polynomial warping
        (tau_max^(1/rho) + ...)^rho only when rho = 1 or tau_max = 1; every reference launch file
        uses rho = 1 with this schedule, so there is nothing to reproduce."""
        if rho != 1:
            raise ValueError(
                f"the discrete schedule supports rho = 1 only, got rho = {rho}: the reference's formula "
                "(tau_max + i/(N-1)(tau_min^(1/rho) - tau_max))^rho raises only tau_min to 1/rho, so for rho != 1 "
                "it is not the polynomial warping it appears to be (unless tau_max = 1), and every reference "
                "launch uses rho = 1 with it")
        default_min, default_max = self.sigma_range()
        sigma_min = default_min if sigma_min is None else sigma_min
        sigma_max = default_max if sigma_max is None else sigma_max
        _check(n, sigma_min, sigma_max)
        tau_min, tau_max = self.tau(sigma_min), self.tau(sigma_max)
        frac = torch.linspace(0, 1, n, dtype=torch.float64)
        return self.sigma(tau_max + frac * (tau_min - tau_max))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp strictly increasing), extrapolating
    linearly with the first / last segment outside [xp[0], xp[-1]]."""
    idx = (torch.searchsorted(xp, x.contiguous(), right=True) - 1).clamp(0, len(xp) - 2)
    x0, x1, f0, f1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def discrete(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, vp: DiscreteVP) -> torch.Tensor:
    """The LDM/SD ``discrete`` schedule of ``vp`` (see ``DiscreteVP.schedule``)."""
    return vp.schedule(n, sigma_min, sigma_max, rho)


SCHEDULES = {"polynomial": polynomial, "logsnr": logsnr, "time_uniform": time_uniform, "discrete": discrete,
             "custom": custom}
DEFAULT_RHO = {"discrete": 1.0}  # every other schedule: 7.0 (EDM's default, as before)


def get_schedule(kind: str, n: int | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float | None = None, *, vp: DiscreteVP | None = None, sigmas=None) -> torch.Tensor:
    """Look up a schedule by name: ``polynomial``, ``logsnr``, ``time_uniform`` (rho defaults to 7),
    ``discrete`` (needs the model's table, ``vp=DiscreteVP.ldm()`` / ``.sd()`` /
    ``DiscreteVP.from_betas(...)``; rho must be 1, its default) or ``custom`` (``sigmas=[...]``;
    n, sigma_min and sigma_max may be omitted and must match the list when given)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if kind == "custom":
        if sigmas is None:
            raise ValueError("the custom schedule needs its sigmas: get_schedule('custom', sigmas=[...])")
        sig = custom(sigmas)
        for name, given, actual in (("n", n, len(sig)), ("sigma_max", sigma_max, float(sig[0])),
                                    ("sigma_min", sigma_min, float(sig[-1]))):
            if given is not None and not math.isclose(given, actual, rel_tol=1e-9):
                raise ValueError(f"custom schedule: {name} = {given} does not match the sigma list ({actual})")
        return sig
    if sigmas is not None:
        raise ValueError(f"sigmas=... is only for the custom schedule, not {kind!r}")
    if n is None or sigma_min is None or sigma_max is None:
        raise ValueError(f"the {kind} schedule needs n, sigma_min and sigma_max")
    rho = DEFAULT_RHO.get(kind, 7.0) if rho is None else rho
    if kind == "discrete":
        if vp is None:
            raise ValueError("the discrete schedule needs the model's noise table: pass vp=DiscreteVP.ldm(), "
                             "DiscreteVP.sd() or DiscreteVP.from_betas(betas)")
        return discrete(n, sigma_min, sigma_max, rho, vp=vp)
    if vp is not None:
        raise ValueError(f"vp=... is only for the discrete schedule, not {kind!r}")
    return SCHEDULES[kind](n, sigma_min, sigma_max, rho)


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 timestamps, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def schedule_for(kind: str, n: int, sigma_min: float, sigma_max: float, rho: float,
                 vp: DiscreteVP | None = None) -> torch.Tensor:
    """``get_schedule`` with a suite's discrete-VP table (``Suite.discrete_vp``) passed where the
    schedule needs it (``discrete``) and left out everywhere else."""
    return get_schedule(kind, n, sigma_min, sigma_max, rho, **({"vp": vp} if kind == "discrete" else {}))
