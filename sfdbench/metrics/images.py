"""The one conversion from sampler output to the uint8 images every metric sees."""

from __future__ import annotations

import numpy as np
import torch

from sfdbench.errors import BadInput


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8: floor(clip(127.5 x + 128, 0, 255)).

    Same as the reference's ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (the SFD reference implementation,
    zju-pi/diff-sampler, file ``sfd-main/sample.py``; ``docs/algorithms.md#reference-quirks-reproduced-on-purpose``):
    truncation toward zero of 127.5 x + 128 is round-half-up of 127.5 x + 127.5. Non-finite
    values are bad input, never silently clipped."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise BadInput(f"{bad} generated image(s) contain NaN/Inf; the sampler diverged - check the model and NFE")
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def count_bad(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum()) if x.ndim >= 1 and x.numel() else 0


def validate_images(images, space=None, what: str = "generated images") -> torch.Tensor:
    """uint8 [N, C, H, W] with channels/size the feature space accepts, else ``BadInput``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise BadInput(f"{what} must be a uint8 tensor [N, C, H, W], got {type(images).__name__}")
    if images.is_floating_point() or images.is_complex():
        if not torch.isfinite(images).all():
            raise BadInput(f"{count_bad(images)} of the {what} contain NaN/Inf; the sampler diverged - "
                           "check the model and NFE (metrics take uint8 from sfdbench.metrics.images.to_uint8)")
        raise BadInput(f"{what} have dtype {images.dtype}; metrics need uint8 [N, C, H, W] - convert images in "
                       "[-1, 1] with sfdbench.metrics.images.to_uint8")
    if images.dtype != torch.uint8:
        raise BadInput(f"{what} have dtype {images.dtype}; metrics need uint8 [N, C, H, W] in 0..255 "
                       "(sfdbench.metrics.images.to_uint8)")
    if images.ndim != 4:
        raise BadInput(f"{what} have shape {tuple(images.shape)}; metrics need 4 dimensions [N, C, H, W]")
    if images.shape[0] == 0:
        raise BadInput(f"no {what}: need at least 2 images [N, C, H, W]")
    if space is not None:
        c, h, w = images.shape[1:]
        if c not in space.channels:
            hint = " (looks like NHWC: use images.permute(0, 3, 1, 2))" if w in space.channels else ""
            raise BadInput(f"{what} have {c} channels (shape {tuple(images.shape)}) but feature extractor "
                           f"{space.name} takes {' or '.join(map(str, space.channels))}{hint}")
        if space.image_size is not None and (h, w) != tuple(space.image_size):
            raise BadInput(f"{what} are {h}x{w} but feature extractor {space.name} takes "
                           f"{space.image_size[0]}x{space.image_size[1]}; sample at the suite's resolution")
    return images
