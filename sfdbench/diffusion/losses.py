"""Training losses (tensors in, tensors out)."""

from __future__ import annotations

import torch

from sfdbench.diffusion.denoiser import EDMPrecond


def edm_loss(denoiser: EDMPrecond, x0: torch.Tensor, generator: torch.Generator | None = None,
             p_mean: float = -1.2, p_std: float = 1.2, **cond) -> torch.Tensor:
    """EDM training loss (Karras et al. 2022, eq. 8 and Table 1), mean over the batch:
    ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2,
    L = lambda(sigma) * ||D(x0 + sigma n; sigma) - x0||^2 (per-element mean)."""
    shape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    sigma = torch.exp(p_mean + p_std * torch.randn(shape, generator=generator, dtype=x0.dtype, device=x0.device))
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = denoiser(x0 + sigma * noise, sigma.flatten(), **cond)
    return (weight * (denoised - x0) ** 2).mean()
