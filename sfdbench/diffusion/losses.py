"""Training losses (tensors in, tensors out)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sfdbench.diffusion.denoiser import EDMPrecond


def edm_loss(denoiser: EDMPrecond, x0: torch.Tensor, generator: torch.Generator | None = None,
             p_mean: float = -1.2, p_std: float = 1.2,
             cond_fn: Callable[[torch.Generator | None], dict] | None = None, **cond) -> torch.Tensor:
    """EDM training loss (Karras et al. 2022, eq. 8 and Table 1), mean over the batch:
    ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2,
    L = lambda(sigma) * ||D(x0 + sigma n; sigma) - x0||^2 (per-element mean).

    Conditioning reaches the denoiser as ``**cond`` (e.g. ``class_labels=one_hot``), plus, when given,
    ``cond_fn(generator)``'s dict, built after sigma and the noise are drawn: its random draws (e.g. a
    classifier-free-guidance label-dropout mask) follow them in ``generator``'s stream, and without it
    the stream is sigma then noise only."""
    shape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    sigma = torch.exp(p_mean + p_std * torch.randn(shape, generator=generator, dtype=x0.dtype, device=x0.device))
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    if cond_fn is not None:
        cond = {**cond, **cond_fn(generator)}
    denoised = denoiser(x0 + sigma * noise, sigma.flatten(), **cond)
    return (weight * (denoised - x0) ** 2).mean()
