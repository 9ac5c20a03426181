"""Feature spaces: a torch-fidelity feature extractor, the layer we read, and the identity of its
weights (which keys cached reference statistics).

* ``inception_feature_space()``: torch-fidelity's ``inception-v3-compat`` (the TF Inception-v3 of
  2015-12-05 ported to PyTorch -- the network EDM's ``inception-2015-12-05.pkl`` also wraps), pool3
  layer ``"2048"``, fed uint8 at native resolution (it resizes to 299 inside). Its weights file is
  looked up *before* torch-fidelity is asked for the network -- first the asset
  ``inception-v3-compat`` in ``sfdbench.io.cache_dir()/assets/``, then torch hub's cache -- so an
  offline machine gets ``MissingAsset`` instead of a download attempt.
* ``sfdbench.metrics.dinov2.dinov2_feature_space()``: DINOv2 ViT-L/14 CLS features (FD-DINOv2), 1024-d.
* ``sfdbench.metrics.digits_features.feature_space()``: the shipped digits CNN, 64-d.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.io import cache_dir, sha256_file
from sfdbench.metrics.fid import extract_features

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_LAYER = "2048"


@dataclass(eq=False)
class FeatureSpace:
    """How images become feature vectors. ``create(cuda)`` builds the torch-fidelity extractor
    (lazily, once per device); ``features`` runs it through torch-fidelity's extraction loop."""

    name: str  # torch-fidelity registry name
    layer: str  # one of the extractor's provided features
    dim: int
    weights_id: str  # content hash (prefix) of the weights file
    create: Callable[[bool], FeatureExtractorBase]
    channels: tuple[int, ...] = (3,)  # accepted input channel counts
    image_size: tuple[int, int] | None = None  # required (H, W); None: the extractor resizes
    gray_to_rgb: bool = False  # repeat 1-channel images to 3 channels (as EDM's / SFD's sfd-main/fid.py does)
    batch_size: int = 200
    description: str = ""
    _extractors: dict = field(default_factory=dict, repr=False)

    def extractor(self, device: str | torch.device = "cpu") -> FeatureExtractorBase:
        cuda = torch.device(device).type == "cuda"
        if cuda not in self._extractors:
            self._extractors[cuda] = self.create(cuda)
        return self._extractors[cuda]

    def features(self, images_u8: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """float64 [N, dim] features of uint8 images [N, C, H, W] (validated by the caller)."""
        if self.gray_to_rgb and images_u8.shape[1] == 1:
            images_u8 = images_u8.expand(-1, 3, -1, -1)
        cuda = torch.device(device).type == "cuda"
        return extract_features(self.extractor(device), images_u8, self.layer, batch_size=self.batch_size, cuda=cuda)

    def protocol(self) -> dict:
        return {"feature_extractor": self.name, "feature_layer": self.layer, "feature_dim": self.dim,
                "feature_weights_sha256": self.weights_id}


# ----------------------------------------------------------------------------- Inception-v3


def inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


INCEPTION_ASSET_KEY = "inception-v3-compat"


def inception_weights_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` keeps the weights:
    ``torch.hub.get_dir()/checkpoints/<file>``, i.e. ``$TORCH_HOME/hub/checkpoints`` with
    ``TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(inception_url())


def inception_asset_path() -> Path:
    """Where ``sfdbench assets download inception-v3-compat`` puts the weights:
    ``sfdbench.io.cache_dir()/assets/<torch-fidelity's file name>``."""
    return cache_dir() / "assets" / os.path.basename(inception_url())


def _expected_sha256_prefix(filename: str) -> str:
    # torch hub convention: "<name>-<first hex digits of sha256>.<ext>"
    stem = filename.rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[-1]


def require_inception_weights(path: Path | None = None) -> Path:
    """The Inception weights file without any download: an explicit ``path`` (existence only), else
    the asset in sfdbench's cache, else torch hub's cached file (for these two, the sha256 prefix in the
    file name is checked)."""
    name = os.path.basename(inception_url())
    command = f"`sfdbench assets download {INCEPTION_ASSET_KEY}`"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingAsset(f"missing Inception-v3 weights {path}: pass an existing file, or run {command} "
                               f"(or download {inception_url()}) and pass its path")
        return path  # the user's own file (e.g. a re-converted checkpoint): identified by its hash, not checked
    candidates = [inception_asset_path(), inception_weights_path()]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise MissingAsset(f"missing {INCEPTION_ASSET_KEY}, Inception-v3 weights {name} (torch-fidelity "
                           f"inception-v3-compat, pool3): run {command} (it writes {candidates[0]}), or download "
                           f"{inception_url()} and put it at {candidates[1]} "
                           "(torch hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to ~/.cache/torch)")
    expected = _expected_sha256_prefix(name)
    digest = sha256_file(path)
    if not digest.startswith(expected):
        raise BadInput(f"Inception-v3 weights {path} are corrupt (sha256 {digest[:12]}..., expected {expected}...): "
                       f"delete the file and run {command} (or download {inception_url()} again)")
    return path


def inception_feature_space(weights_path: Path | None = None, batch_size: int = 100) -> FeatureSpace:
    """torch-fidelity's ``inception-v3-compat`` pool3 (2048-d). ``weights_path``: an explicit file;
    default the asset in sfdbench's cache, then torch hub's cache. Raises ``MissingAsset`` (exit 3)
    when neither holds it (nothing is downloaded) and ``BadInput`` when a cached copy is corrupt."""
    path = require_inception_weights(weights_path)

    def create(cuda: bool) -> FeatureExtractorBase:
        from torch_fidelity.utils import create_feature_extractor

        return create_feature_extractor(INCEPTION_NAME, [INCEPTION_LAYER], cuda=cuda,
                                        feature_extractor_weights_path=str(path), verbose=False)

    return FeatureSpace(name=INCEPTION_NAME, layer=INCEPTION_LAYER, dim=2048, weights_id=sha256_file(path)[:16],
                        create=create, channels=(1, 3), image_size=None, gray_to_rgb=True, batch_size=batch_size,
                        description="torch-fidelity inception-v3-compat (TF Inception-v3 2015-12-05), pool3 2048-d, "
                                    "uint8 RGB resized to 299x299 inside the network")
