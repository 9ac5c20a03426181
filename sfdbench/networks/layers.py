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
