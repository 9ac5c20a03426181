"""Reference statistics: computed once per (extractor, weights, reference set) and cached as npz.

File format (``.npz``, loaded with ``allow_pickle=False``):

* ``mu`` [D] and ``sigma`` [D, D] (float64) -- FID, over *all* reference images;
* ``features`` [M, D] -- the reference features PRDC and KID need (all of them, or a seeded subset
  of ``prdc_reference_size`` images: ``RandomState(seed).permutation(n)[:size]``, re-sorted, like the
  reference's ``--num`` subsets); stored as float32 when that is lossless;
* ``meta`` -- a JSON string: extractor, layer, weights hash, reference id, counts, format version.

EDM-style files holding only ``mu``/``sigma`` (e.g. ``cifar10-32x32.npz``) load too: they give
FID, while KID/precision/recall/density/coverage are reported as unavailable.

Writes are atomic (temp file + rename), so a cache file is either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.metrics.fid import fid_statistics
from sfdbench.metrics.images import validate_images

FORMAT_VERSION = 1


@dataclass(eq=False)
class ReferenceStats:
    """FID statistics of a reference set, plus its features when PRDC/KID are possible."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    features: torch.Tensor | None = None  # [M, D] (float32 or float64) or None (EDM-style file)
    meta: dict = field(default_factory=dict)
    source: str = "in-memory reference"

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def has_features(self) -> bool:
        return self.features is not None

    def fid_stats(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma}

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict | None = None, prdc_reference_size: int | None = None,
                      seed: int = 0, source: str = "in-memory reference") -> ReferenceStats:
        """mu/sigma over all ``features``; keeps all features or a seeded subset for PRDC/KID."""
        features = torch.as_tensor(features)
        stats = fid_statistics(features)
        n = features.shape[0]
        kept = features
        if prdc_reference_size is not None and prdc_reference_size < n:
            idx = np.sort(np.random.RandomState(seed).permutation(n)[:prdc_reference_size])
            kept = features[torch.from_numpy(idx)]
        as32 = kept.to(torch.float32)
        if torch.equal(as32.to(kept.dtype), kept):  # the extractors emit float32: halve the file losslessly
            kept = as32
        meta = {**(meta or {}), "n_reference": n, "n_reference_features": int(kept.shape[0]),
                "prdc_reference_size": prdc_reference_size, "subset_seed": seed, "format_version": FORMAT_VERSION}
        return cls(np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64), kept.contiguous(),
                   meta, source)

    def to_bytes(self) -> bytes:
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        if self.features is not None:
            arrays["features"] = self.features.cpu().numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        atomic_write_bytes(Path(path), self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        """Our npz or an EDM-style one (``mu``, ``sigma`` only)."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"reference statistics {path} do not exist; pass an existing .npz (mu, sigma[, features])")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise BadInput(f"reference statistics {path} lack 'mu'/'sigma' (keys: {sorted(z.files)}); "
                                   "pass an EDM-style or sfdbench reference .npz")
                mu = np.asarray(z["mu"], np.float64)
                sigma = np.asarray(z["sigma"], np.float64)
                features = torch.from_numpy(np.array(z["features"])) if "features" in z else None
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except BadInput:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise BadInput(f"cannot read reference statistics {path}: {exc}; delete or replace the file") from exc
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise BadInput(f"reference statistics {path} have inconsistent shapes mu {mu.shape}, sigma {sigma.shape}")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise BadInput(f"reference statistics {path}: features {tuple(features.shape)} do not match mu {mu.shape}")
        return cls(mu, sigma, features, meta, str(path))


def cache_key(space, reference_id: str, prdc_reference_size: int | None, seed: int) -> str:
    """16 hex digits identifying extractor + layer + weights + reference set + PRDC subset."""
    ident = {"extractor": space.name, "layer": space.layer, "weights": space.weights_id, "reference": reference_id,
             "prdc_reference_size": prdc_reference_size, "seed": seed, "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(space, reference_id: str, cache_dir: Path, prdc_reference_size: int | None = None,
               seed: int = 0) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{space.name}-{reference_id}")[:80]
    return Path(cache_dir) / "reference" / f"{slug}-{cache_key(space, reference_id, prdc_reference_size, seed)}.npz"


_MEMORY: dict[str, ReferenceStats] = {}


def reference_statistics(space, reference_id: str, load_images: Callable[[], torch.Tensor],
                         cache_dir: Path | None = None, prdc_reference_size: int | None = None, seed: int = 0,
                         device: str = "cpu") -> ReferenceStats:
    """Reference statistics of ``load_images()`` (uint8 [N, C, H, W]) in feature space ``space``.

    Computed once per process; with ``cache_dir`` (e.g. ``default_cache_dir()``) also stored in
    ``<cache_dir>/reference/<extractor>-<reference_id>-<key>.npz`` and reused across processes.
    ``reference_id`` must name the image set exactly (dataset, split, count)."""
    key = cache_key(space, reference_id, prdc_reference_size, seed)
    if key in _MEMORY and cache_dir is None:
        return _MEMORY[key]
    path = cache_path(space, reference_id, cache_dir, prdc_reference_size, seed) if cache_dir is not None else None
    if path is not None and path.is_file():
        ref = ReferenceStats.load(path)
    elif key in _MEMORY:
        ref = _MEMORY[key]
        if path is not None:
            ref.save(path)
    else:
        images = validate_images(load_images(), space, what="reference images")
        feats = space.features(images, device)
        meta = {**space.protocol(), "reference": reference_id, "cache_key": key}
        ref = ReferenceStats.from_features(feats, meta, prdc_reference_size, seed,
                                           source=str(path) if path else f"reference {reference_id}")
        if path is not None:
            ref.save(path)
    _MEMORY[key] = ref
    return ref
