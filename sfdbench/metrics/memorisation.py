"""A nearest-neighbour memorisation diagnostic for methods that train on real images.

Methods that see the training images (progressive / consistency distillation, ECT) can lower FID
against those same images by reproducing them. The diagnostic: the fraction of generated samples
whose nearest training image (pixel L2) is closer than the ``percentile``-th percentile of the
training images' own nearest-neighbour distances (each to its nearest *other* training image).
A generator that copies training images scores near 1; one that draws new images from the data
distribution scores near ``percentile`` / 100 (``docs/algorithms.md#memorisation-diagnostic``;
the threshold follows the held-out protocol of Carlini et al. 2023, "Extracting Training Data from
Diffusion Models", in spirit, at digit scale).
"""

from __future__ import annotations

import torch

from sfdbench.errors import BadInput


def nearest_distances(queries: torch.Tensor, pool: torch.Tensor, exclude_self: bool = False,
                      chunk: int = 1024) -> torch.Tensor:
    """Pixel-L2 distance of every query [N, ...] to its nearest pool image [M, ...] (float64);
    ``exclude_self``: queries are the pool and a point's distance to itself does not count."""
    q = queries.reshape(queries.shape[0], -1).to(torch.float64)
    p = pool.reshape(pool.shape[0], -1).to(torch.float64)
    if q.shape[1] != p.shape[1]:
        raise BadInput(f"samples of {q.shape[1]} values cannot be compared with training images of {p.shape[1]}")
    out = []
    for start in range(0, q.shape[0], chunk):
        d = torch.cdist(q[start:start + chunk], p)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def memorisation_fraction(samples: torch.Tensor, train: torch.Tensor, percentile: float = 5.0) -> float:
    """Fraction of ``samples`` closer (pixel L2) to their nearest training image than the
    ``percentile``-th percentile of train-to-train nearest-neighbour distances. Both in the same
    value range (e.g. [-1, 1])."""
    if samples.shape[0] == 0 or train.shape[0] < 2:
        raise BadInput("the memorisation diagnostic needs samples and at least 2 training images")
    threshold = torch.quantile(nearest_distances(train, train, exclude_self=True), percentile / 100.0)
    return float((nearest_distances(samples, train) < threshold).to(torch.float64).mean())
