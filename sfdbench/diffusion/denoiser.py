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


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations: the NFE is counted, never declared.

    ``calls`` is the number of network evaluations; ``samples`` the number of per-sample
    evaluations (sum of batch sizes), so ``samples / batch`` is the NFE per sample.
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.calls = 0
        self.samples = 0

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

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
