"""Uncertainty of FID from one sample set: a bootstrap over the generated features.

Each replicate draws ``n`` generated feature vectors with replacement (``numpy.random.Generator(
PCG64(seed))``), recomputes their mean/covariance and the FID against the *fixed* reference statistics
with the same torch-fidelity functions as the point estimate. The interval therefore reflects the
sampling noise of the generated set only (not of the reference, nor of the generation seeds: for the
latter, rerun with other seeds).

FID is biased upwards by finite samples, and a bootstrap replicate (about 63% distinct points) is
biased further: on the digits features the replicates' mean sits 2-3x above the point estimate, so
the plain percentile interval often excludes it. ``method="shifted"`` (default) therefore moves the
bootstrap distribution by its estimated bias ``b = mean(F*) - F``: ``(q_lo - b, q_hi - b)``, an
interval for the sampling spread *around the point estimate* (it does not remove FID's own
finite-sample bias, which is the same for every method evaluated with the same n).
``"percentile"`` gives ``(q_lo, q_hi)``, ``"basic"`` gives ``(2F - q_hi, 2F - q_lo)``. Lower ends
are clamped at 0 (FID is non-negative).

Cost: one covariance and one FID per replicate -- negligible for 64-d digits features, about as long
as one FID per replicate for 2048-d Inception features (use ``n_boot`` of 50-100 there).
"""

from __future__ import annotations

import numpy as np
import torch

from sfdbench.errors import BadInput
from sfdbench.metrics.fid import fid_from_statistics, fid_statistics


def _stats(reference_stats) -> dict:
    if hasattr(reference_stats, "fid_stats"):
        return reference_stats.fid_stats()
    return {"mu": np.asarray(reference_stats["mu"], np.float64), "sigma": np.asarray(reference_stats["sigma"],
                                                                                       np.float64)}


def bootstrap_fids(features, reference_stats, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """FID of ``n_boot`` with-replacement resamples of ``features`` [N, D] (float64 [n_boot])."""
    features = torch.as_tensor(features).to(torch.float64)
    n = features.shape[0]
    if features.ndim != 2 or n < 2:
        raise BadInput(f"bootstrap FID needs features [N >= 2, D], got {tuple(features.shape)}")
    if n_boot < 2:
        raise BadInput(f"bootstrap FID needs n_boot >= 2, got {n_boot}")
    ref = _stats(reference_stats)
    if ref["mu"].shape[0] != features.shape[1]:
        raise BadInput(f"reference statistics are {ref['mu'].shape[0]}-d but features are {features.shape[1]}-d; "
                       "use statistics from the same extractor")
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        out[b] = fid_from_statistics(fid_statistics(features[idx]), ref)
    return out


def bootstrap_fid(features, reference_stats, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                  method: str = "shifted") -> tuple[float, float, float]:
    """(low, high, std) of FID by bootstrap over generated features; see the module docstring.

    ``reference_stats``: ``ReferenceStats`` or a dict with ``mu``/``sigma``. ``std`` is the standard
    deviation (ddof=1) of the bootstrap FIDs. Deterministic for a given ``seed``."""
    if not 0 < level < 1:
        raise BadInput(f"confidence level must be in (0, 1), got {level}")
    if method not in ("shifted", "percentile", "basic"):
        raise BadInput(f"unknown bootstrap interval method {method!r}; use 'shifted', 'percentile' or 'basic'")
    fids = bootstrap_fids(features, reference_stats, n_boot, seed)
    q_lo, q_hi = np.quantile(fids, [(1 - level) / 2, (1 + level) / 2])
    if method == "percentile":
        low, high = q_lo, q_hi
    else:
        feats = torch.as_tensor(features).to(torch.float64)
        point = fid_from_statistics(fid_statistics(feats), _stats(reference_stats))
        if method == "shifted":
            bias = fids.mean() - point
            low, high = q_lo - bias, q_hi - bias
        else:
            low, high = 2 * point - q_hi, 2 * point - q_lo
    return max(float(low), 0.0), max(float(high), 0.0), float(np.std(fids, ddof=1))
