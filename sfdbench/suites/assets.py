"""Every downloadable asset of the real suites: URL, checksum, cache path.

Nothing is downloaded at import or in tests; a missing asset stops a run with exit code 3 and
one message saying what is missing, where to get it and where to put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sfdbench.errors import MissingAsset
from sfdbench.io import cache_dir


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    filename: str
    sha256: str | None = None  # None: not pinned yet (we have never downloaded it offline here)
    size: int | None = None

    @property
    def path(self) -> Path:
        return cache_dir() / "assets" / self.filename

    def require(self) -> Path:
        if not self.path.is_file():
            raise MissingAsset(f"missing {self.name}: download {self.url} and put it at {self.path} "
                               f"(or set SFDBENCH_CACHE)")
        return self.path


EDM_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm"
ASSETS = {
    "edm-cifar10-teacher": Asset("EDM CIFAR-10 teacher (edm-cifar10-32x32-uncond-vp.pkl)",
                                 f"{EDM_CDN}/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
                                 "edm-cifar10-32x32-uncond-vp.pkl"),
    "cifar10-fid-ref": Asset("CIFAR-10 FID reference statistics (cifar10-32x32.npz)",
                             f"{EDM_CDN}/fid-refs/cifar10-32x32.npz", "cifar10-32x32.npz"),
    "edm-imagenet64-teacher": Asset("EDM ImageNet-64 teacher (edm-imagenet-64x64-cond-adm.pkl)",
                                    f"{EDM_CDN}/pretrained/edm-imagenet-64x64-cond-adm.pkl",
                                    "edm-imagenet-64x64-cond-adm.pkl"),
    "imagenet64-fid-ref": Asset("ImageNet-64 FID reference statistics (imagenet-64x64.npz)",
                                f"{EDM_CDN}/fid-refs/imagenet-64x64.npz", "imagenet-64x64.npz"),
}


def status() -> list[tuple[str, Asset, bool]]:
    """(key, asset, present) for every known asset."""
    return [(key, asset, asset.path.is_file()) for key, asset in ASSETS.items()]
