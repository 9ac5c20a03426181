"""Denoiser convention and wrappers.

Every model is seen by the solvers as ``D(x, sigma, **cond) -> x0_hat`` with
``x = x0 + sigma * noise`` (EDM, Karras et al. 2022). ``sigma`` is a scalar tensor or a
tensor of shape ``[B]``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn


class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample sigma to shape ``[B]`` in ``x``'s dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(x.shape[0])


class EDMPrecond(nn.Module):
    """EDM preconditioning around a raw network ``F(x_in, c_noise, **cond)``.

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with (Karras et al. 2022, Table 1)
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """

    def __init__(self, net: nn.Module, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = batch_sigma(sigma, x).reshape(-1, *([1] * (x.ndim - 1)))
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        out = self.net((c_in * x).to(x.dtype), c_noise.to(x.dtype), **cond)
        return c_skip * x + c_out * out.to(x.dtype)


class VPEpsilonDenoiser(nn.Module):
    """An epsilon-prediction discrete-VP model (DDPM / LDM / Stable Diffusion) seen as an EDM
    denoiser (Karras et al. 2022, Table 1, "VP" column, with the model's own discrete table).

    With the table's continuous view ``vp`` (``schedules.DiscreteVP``):
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1) (so c_in x is the VP state
    sqrt(abar) x0 + sqrt(1 - abar) eps), c_noise = M tau(sigma) - 1, the fractional discrete
    timestep the U-Net receives unrounded; D = x - sigma eps_hat (``docs/algorithms.md``,
    "Denoiser wrappers").
    """

    def __init__(self, net: nn.Module, vp, sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        self.net = net
        self.vp = vp
        low, high = vp.sigma_range()
        self.sigma_min = float(low if sigma_min is None else sigma_min)
        self.sigma_max = float(high if sigma_max is None else sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        c_noise = self.vp.timestep(sigma.detach().double().cpu()).to(device=x.device, dtype=x.dtype)
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (sigma**2 + 1).sqrt()
        eps = self.net((c_in * x).to(x.dtype), c_noise, **cond)
        return x - sigma * eps.to(x.dtype)


def _batch_both(uncond: dict, cond: dict, batch: int) -> dict:
    """[unconditional; conditional] conditioning for one doubled batch: per-sample tensors are
    concatenated, anything else (a scalar step condition) must be the same in both."""
    merged = {}
    for key in cond.keys() | uncond.keys():
        a, b = uncond.get(key), cond.get(key)
        if isinstance(b, torch.Tensor) and b.ndim > 0 and b.shape[0] == batch:
            merged[key] = torch.cat([a, b])
        elif a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)) or a == b:
            merged[key] = b
        else:
            raise ValueError(f"conditioning {key!r} differs between the guided branches but is not per-sample")
    return merged


class DenoiserWrapper:
    """A denoiser around another one (``self.denoiser``), with its sigma range."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max


def guided_evaluations_per_call(scale: float) -> int:
    """Network evaluations per sample of one guided call: 1 at w = 1 (conditional) or w = 0
    (unconditional), else 2 (both branches)."""
    return 1 if scale in (0.0, 1.0) else 2


class ClassifierFreeGuidance(DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, in denoiser form):
    D_w(x; sigma, c) = D(x; sigma, u) + w (D(x; sigma, c) - D(x; sigma, u)), where ``unconditional(cond)``
    makes u (class labels zeroed, the empty prompt, ...).

    w = 1 is the conditional model and w = 0 the unconditional one: a single evaluation. Any other
    w evaluates both branches in one doubled batch [u; c], so a ``CountingDenoiser`` below this
    wrapper counts 2 network evaluations per sample and call (the paper's convention:
    ``network_evaluations_per_call``)."""

    def __init__(self, denoiser: Denoiser, scale: float, unconditional):
        super().__init__(denoiser)
        self.scale = float(scale)
        self.unconditional = unconditional

    @property
    def network_evaluations_per_call(self) -> int:
        return guided_evaluations_per_call(self.scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        uncond = self.unconditional(cond)
        if self.scale == 0.0:
            return self.denoiser(x, sigma, **uncond)
        sigma = batch_sigma(sigma, x)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_batch_both(uncond, cond, x.shape[0]))
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


class CountingDenoiser(DenoiserWrapper):
    """Wraps a denoiser and counts its evaluations: the NFE is counted, never declared.

    ``calls`` is the number of network evaluations; ``samples`` the number of per-sample
    evaluations (sum of batch sizes), so ``samples / batch`` is the NFE per sample.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__(denoiser)
        self.calls = 0
        self.samples = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self.calls += 1
        self.samples += x.shape[0]
        return self.denoiser(x, sigma, **cond)


def analytic_first_direction(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """AFS (Zhou et al., AMED, 2024): the first ODE direction without a network call.

    At sigma_max the data is negligible, so eps_hat ~= x / sqrt(1 + sigma^2)
    (the state normalised to unit variance); d = (x - D) / sigma = eps_hat.
    """
    sigma = float(sigma)
    return x / math.sqrt(1.0 + sigma**2)
