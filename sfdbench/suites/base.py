"""What every suite declares (like an lm-eval task): data, teacher, feature space, grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sfdbench.diffusion.denoiser import Denoiser


@dataclass(frozen=True)
class GridEntry:
    method: str
    nfes: tuple[int, ...]


@dataclass
class Suite:
    name: str
    description: str
    image_shape: tuple[int, int, int]
    sigma_min: float  # baseline sigma_min (SFD has its own, see methods)
    sigma_max: float
    default_grid: tuple[GridEntry, ...]
    default_seeds: tuple[int, ...] = (0, 1, 2)
    default_samples: int = 1000
    method_options: dict = field(default_factory=dict)  # per-method overrides, e.g. {"sfd": {...}}
    # the quick grid `sfdbench check` runs and compares with results/reference/<suite>/
    check_grid: tuple[GridEntry, ...] = ()
    check_seeds: tuple[int, ...] = (0, 1, 2)
    check_samples: int = 1000

    def load_teacher(self, path=None, device: str | torch.device = "cpu") -> Denoiser:
        raise NotImplementedError

    def teacher_id(self, path=None) -> str:
        """A content hash of the teacher weights; it enters every config hash."""
        raise NotImplementedError

    def evaluate(self, images_u8: torch.Tensor) -> dict[str, float]:
        """Metrics of uint8 samples [N, C, H, W] against the suite's reference set."""
        raise NotImplementedError

    def metric_protocol(self) -> dict:
        """What a record must say about how metrics were computed (extractor, reference, n)."""
        raise NotImplementedError

    def feature_space(self):
        """The ``metrics.features.FeatureSpace`` the suite's metrics use."""
        raise NotImplementedError

    def reference(self):
        """The suite's reference statistics (``metrics.reference.ReferenceStats``)."""
        raise NotImplementedError

    def fid_features_and_reference(self, images_u8: torch.Tensor):
        """(features [N, D] of uint8 samples, reference statistics): what FID and its bootstrap
        interval are computed from. Bad images -> ``BadInput``."""
        from sfdbench.metrics.evaluate import validate_images

        space = self.feature_space()
        reference = self.reference()
        return space.features(validate_images(images_u8, space)), reference
