"""Precision, recall, density and coverage from k-nearest-neighbour balls, exact and tiled.

Definitions (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models";
identical to the ``prdc`` package that the SFD reference's ``sfd-main/prdc.py`` (zju-pi/diff-sampler) calls;
Kynkäänniemi et al. 2019 for precision/recall; ``docs/algorithms.md#precision-and-recall``,
``docs/algorithms.md#density-and-coverage``):

* the radius of a point is the Euclidean distance to its k-th nearest neighbour *within its own
  set*, i.e. the (k+1)-th smallest distance counting the zero distance to itself (a duplicate of
  the point counts as a neighbour at distance 0);
* a point ``y`` is inside the ball of ``x`` when ``d(x, y) < radius(x)`` -- **strict** ``<``;
* precision = fraction of fake samples inside at least one real ball;
* recall    = fraction of real samples inside at least one fake ball;
* density   = (1/k) * mean over fake samples of the number of real balls that contain it;
* coverage  = fraction of real samples whose nearest fake sample lies inside its own ball.

torch-fidelity's ``prc`` (Kynkaenniemi et al. 2019) uses the same radii but ``<=``; the two agree
unless a distance ties a radius exactly (see ``sfdbench.metrics.evaluate``).

Implementation: squared distances ``|x|^2 + |y|^2 - 2 x.y`` are computed in float64 on square
tiles (inputs of any float dtype are upcast one tile at a time, so float32 features are never
copied whole), clamped at 0, with the self-distance set to exactly 0 (as scikit-learn does for
``prdc``). Comparisons happen between squared distances, which is equivalent to comparing
distances. No N x N matrix is ever built: memory is O(tile^2 + (N + M) k) beyond the inputs,
and the symmetric within-set pass computes each tile pair once.
"""

from __future__ import annotations

import numpy as np
import torch

from sfdbench.errors import BadInput

DEFAULT_K = 5
DEFAULT_TILE = 2048
F64 = torch.float64


def _as_matrix(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if x.ndim != 2 or not x.is_floating_point():
        raise BadInput(f"{name} features must be a float matrix [N, D], got {x.dtype} {tuple(x.shape)}")
    return x.cpu()


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def squared_norms(x: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Row-wise |x|^2 in float64, upcasting one tile of rows at a time."""
    return torch.cat([x[a:b].to(F64).square().sum(1) for a, b in _spans(x.shape[0], tile)])


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """float64 tile of squared Euclidean distances, clamped at 0."""
    return torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.T, alpha=-2.0).clamp_min_(0.0)


def _merge_smallest(best: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The ``best.shape[1]`` smallest values per row of ``cat(best, block)``."""
    kk = best.shape[1]
    part = block.topk(min(kk, block.shape[1]), dim=1, largest=False).values
    return torch.cat([best, part], 1).topk(kk, dim=1, largest=False).values


def knn_sq_radii(features, k: int = DEFAULT_K, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest neighbour within ``features`` (the
    (k+1)-th smallest squared distance counting the zero self-distance), float64 [N]."""
    x = _as_matrix(features, "k-NN")
    n = x.shape[0]
    if n < k + 1:
        raise BadInput(f"k-NN radii with k={k} need at least {k + 1} samples, got {n}; use more samples or a smaller k")
    norms = squared_norms(x, tile)
    best = torch.full((n, k + 1), float("inf"), dtype=F64)
    spans = _spans(n, tile)
    for t, (i0, i1) in enumerate(spans):
        xi = x[i0:i1].to(F64)
        for j0, j1 in spans[t:]:
            xj = xi if j0 == i0 else x[j0:j1].to(F64)
            d = _sq_dists(xi, norms[i0:i1], xj, norms[j0:j1])
            if j0 == i0:
                d.fill_diagonal_(0.0)
            best[i0:i1] = _merge_smallest(best[i0:i1], d)
            if j0 != i0:  # the same tile, seen from the other side: each pair is computed once
                best[j0:j1] = _merge_smallest(best[j0:j1], d.T)
    return best[:, k]


def prdc(real_features, fake_features, k: int = DEFAULT_K, tile: int = DEFAULT_TILE) -> dict[str, float]:
    """Precision, recall, density and coverage (definitions in the module docstring), exact.

    ``real_features`` [N, D] and ``fake_features`` [M, D] may be float32 or float64 tensors or arrays;
    distances are float64 either way. Same conventions and argument order as ``prdc.compute_prdc``."""
    real = _as_matrix(real_features, "real")
    fake = _as_matrix(fake_features, "fake")
    if real.shape[1] != fake.shape[1]:
        raise BadInput(f"real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]}); "
                       "extract both with the same feature network")
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] < k + 1:
            raise BadInput(f"precision/recall/density/coverage with k={k} need at least {k + 1} {name} samples, "
                           f"got {x.shape[0]}; generate more samples or lower k")
    real_r2 = knn_sq_radii(real, k, tile)
    fake_r2 = knn_sq_radii(fake, k, tile)
    real_sq, fake_sq = squared_norms(real, tile), squared_norms(fake, tile)
    n, m = real.shape[0], fake.shape[0]
    real_balls_per_fake = torch.zeros(m, dtype=torch.int64)  # density numerator, precision
    real_in_a_fake_ball = torch.zeros(n, dtype=torch.bool)  # recall
    nearest_fake = torch.full((n,), float("inf"), dtype=F64)  # coverage
    fake_spans = _spans(m, tile)
    for i0, i1 in _spans(n, tile):
        xi = real[i0:i1].to(F64)
        for j0, j1 in fake_spans:
            d = _sq_dists(xi, real_sq[i0:i1], fake[j0:j1].to(F64), fake_sq[j0:j1])
            real_balls_per_fake[j0:j1] += (d < real_r2[i0:i1, None]).sum(0)
            real_in_a_fake_ball[i0:i1] |= (d < fake_r2[None, j0:j1]).any(1)
            nearest_fake[i0:i1] = torch.minimum(nearest_fake[i0:i1], d.min(1).values)
    return {
        "precision": float((real_balls_per_fake > 0).to(F64).mean()),
        "recall": float(real_in_a_fake_ball.to(F64).mean()),
        "density": float(real_balls_per_fake.sum()) / (k * m),
        "coverage": float((nearest_fake < real_r2).to(F64).mean()),
    }
