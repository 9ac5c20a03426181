"""The one conversion from sampler output to the uint8 images every metric sees."""

from __future__ import annotations

import torch

from sfdbench.errors import BadInput


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8: floor(clip(127.5 x + 128, 0, 255)).

    Same as the reference's ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (spec section 9.5):
    truncation toward zero of 127.5 x + 128 is round-half-up of 127.5 x + 127.5. Non-finite
    values are bad input, never silently clipped."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise BadInput(f"{bad} generated image(s) contain NaN/Inf; the sampler diverged - check the model and NFE")
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
