"""Small layers shared by the architectures and the adapters."""

from __future__ import annotations

import math

import torch


def positional_embedding(x: torch.Tensor, channels: int, max_positions: int = 10_000,
                         endpoint: bool = False) -> torch.Tensor:
    """Transformer-style sinusoidal embedding [sin(x f_k), cos(x f_k)], f_k = max^(-k/(C/2)), or with
    ``endpoint`` f_k = max^(-k/(C/2 - 1)) so that the last frequency is exactly 1/max (EDM's
    SongUNet convention, which SFD-v's step embedding uses)."""
    half = channels // 2
    denom = half - 1 if endpoint else half
    freqs = torch.exp(-math.log(max_positions) * torch.arange(half, device=x.device, dtype=torch.float32) / denom)
    angles = x.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype)


def edm_positional_embedding(x: torch.Tensor, channels: int, max_positions: int = 10_000,
                             endpoint: bool = False) -> torch.Tensor:
    """EDM's sinusoidal noise embedding (Karras et al. 2022, arXiv 2206.00364; ``docs/algorithms.md``):
    frequencies f_k = (1/max)^(k / (C/2 - e)), k = 0 .. C/2 - 1, with e = 1 when ``endpoint`` (SongUNet)
    and e = 0 otherwise (DhariwalUNet), computed in float32 as a power; features in the order
    [cos(x f) | sin(x f)] (SongUNet swaps the halves afterwards). Returned in ``x``'s dtype.

    Unlike :func:`positional_embedding` (the digits network's [sin | cos] via exp/log), this follows
    EDM's order and float32 arithmetic, so that pretrained EDM weights see the features they were
    trained on."""
    half = channels // 2
    steps = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if endpoint else 0))
    freqs = (1.0 / max_positions) ** steps
    angles = torch.outer(x.reshape(-1), freqs.to(x.dtype))
    return torch.cat([angles.cos(), angles.sin()], dim=1)
