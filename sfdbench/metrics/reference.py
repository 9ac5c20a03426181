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

``reference_from_images`` (``--reference-images DIR|npz``) computes such statistics from a set of
images instead: uint8 [N, C, H, W] in memory, a directory of PNGs (sorted by relative path) or an
``.npz`` holding ``images`` ([N, C, H, W] or [N, H, W, C]) or ``arr_0`` (ADM/EDM's NHWC); cached like
any other reference, keyed by the set's identity (file list with sizes and mtimes, file hash or bytes).
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
from sfdbench.io import atomic_write_bytes, sha256_file
from sfdbench.io import cache_dir as default_cache_dir
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

    def sha256(self) -> str:
        """Content hash of what FID is measured against: sha256 of mu then sigma as little-endian
        float64 bytes (the same for a file and for statistics computed in memory)."""
        import hashlib

        h = hashlib.sha256()
        for array in (self.mu, self.sigma):
            h.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return h.hexdigest()

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


# ----------------------------------------------------------------------------- reference from images

IMAGE_SUFFIXES = (".png",)
_CHANNELS = (1, 3)


def _to_nchw(images: np.ndarray, what: str) -> np.ndarray:
    """uint8 [N, C, H, W] from [N, C, H, W], [N, H, W, C] (C in 1, 3) or [N, H, W] (grayscale)."""
    if images.dtype != np.uint8:
        raise BadInput(f"{what} have dtype {images.dtype}; reference images must be uint8 (0..255)")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise BadInput(f"{what} have shape {images.shape}; expected [N, C, H, W] or [N, H, W, C]")
    if images.shape[1] not in _CHANNELS and images.shape[-1] in _CHANNELS:
        images = images.transpose(0, 3, 1, 2)  # NHWC (ADM/EDM convention) -> NCHW
    if images.shape[1] not in _CHANNELS:
        raise BadInput(f"{what} have shape {images.shape}: no axis of 1 or 3 channels at position 1 or 3")
    return np.ascontiguousarray(images)


def load_image_npz(path: Path) -> torch.Tensor:
    """uint8 [N, C, H, W] from an npz (key ``images`` or ``arr_0``, NCHW or NHWC; no pickles)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BadInput(f"{path} is a single .npy array, not an npz; save it with np.savez(path, images=...)")
        with data:
            key = next((k for k in ("images", "arr_0") if k in data.files), None)
            if key is None:
                raise BadInput(f"{path} holds {', '.join(data.files) or 'nothing'}; expected `images` "
                               "([N, C, H, W] or [N, H, W, C] uint8) or `arr_0` ([N, H, W, C])")
            images = data[key]
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"cannot read {path} as an npz of images ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(_to_nchw(images, f"images in {path}"))


def list_image_files(directory: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                     what: str = "reference images") -> list[Path]:
    """The images (by ``suffixes``; default PNG) under ``directory``, recursively (as EDM's ``--subdirs``
    writes them), sorted by relative path; at least 2 (bad input otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"{what} {directory} is not a directory" + (" or an .npz file" if what == "reference images"
                                                                    else " of images"))
    files = sorted((p for p in directory.rglob("*") if p.suffix.lower() in suffixes and p.is_file()),
                   key=lambda p: p.relative_to(directory).as_posix())
    if len(files) < 2:
        raise BadInput(f"{what} {directory} hold {len(files)} {'/'.join(suffixes)} file(s); need at least 2")
    return files


def load_image_dir(directory: Path) -> torch.Tensor:
    """uint8 [N, C, H, W] from the PNGs under ``directory`` (sorted by relative path; grayscale stays
    1 channel, palette images become RGB; all must share size and channel count)."""
    import PIL.Image

    images, first = [], None
    for path in list_image_files(directory):
        try:
            with PIL.Image.open(path) as img:
                if img.mode == "P":
                    img = img.convert("RGB")
                if img.mode not in ("L", "RGB"):
                    raise BadInput(f"reference image {path} has mode {img.mode}; use 8-bit grayscale or RGB "
                                   "(no alpha, no 16-bit)")
                arr = np.asarray(img, dtype=np.uint8)
        except OSError as exc:
            raise BadInput(f"cannot read reference image {path} ({exc})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if first is None:
            first = (path, arr.shape)
        elif arr.shape != first[1]:
            raise BadInput(f"reference image {path} is {arr.shape} (C, H, W) but {first[0]} is {first[1]}; "
                           "all reference images must share size and channels")
        images.append(arr)
    return torch.from_numpy(np.stack(images))


def _tensor_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def image_source_id(source) -> tuple[str, Callable[[], torch.Tensor]]:
    """(reference id, loader) of an image source: a tensor/array, a directory of PNGs or an .npz."""
    if isinstance(source, np.ndarray | torch.Tensor):
        images = torch.as_tensor(source)
        return f"images-tensor-n{images.shape[0]}-{_tensor_digest(images)[:16]}", lambda: images
    if not isinstance(source, str | Path):
        raise BadInput(f"reference images must be uint8 [N, C, H, W], a directory of PNGs or an .npz, got "
                       f"{type(source).__name__}")
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".npz":
        return f"images-npz-{path.stem}-{sha256_file(path)[:16]}", lambda: load_image_npz(path)
    if path.is_file():
        raise BadInput(f"reference images {path} is a file but not an .npz; pass a directory of PNGs or an .npz")
    files = list_image_files(path)
    listing = "\n".join(f"{f.relative_to(path).as_posix()}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}"
                         for f in files)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
    return f"images-dir-{path.resolve().name}-n{len(files)}-{digest}", lambda: load_image_dir(path)


def reference_from_images(space, source, *, reference_id: str | None = None, cache_dir: Path | None = None,
                          cache: bool = True, prdc_reference_size: int | None = None, seed: int = 0,
                          device: str = "cpu") -> ReferenceStats:
    """Reference statistics (mu/sigma and features, so PRDC and KID are available) of a set of images
    in feature space ``space``, through :func:`reference_statistics`.

    Args:
        source: uint8 [N, C, H, W] (tensor or array), a directory of PNGs (recursive, sorted by relative
            path) or an ``.npz`` (``images`` NCHW/NHWC or ``arr_0`` NHWC).
        reference_id: names the set in the cache key; default derived from the source (dir: names,
            sizes and mtimes of its files; npz: file sha256; tensor: its bytes), so a changed set is
            recomputed.
        cache_dir: where ``reference/*.npz`` goes (default ``sfdbench.io.cache_dir()``); ``cache=False``
            keeps the result in memory only.
    """
    ident, load = image_source_id(source)
    if cache_dir is None and cache:
        cache_dir = default_cache_dir()
    return reference_statistics(space, reference_id or ident, load, cache_dir=cache_dir if cache else None,
                                prdc_reference_size=prdc_reference_size, seed=seed, device=device)
