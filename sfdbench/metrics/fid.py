"""FID through torch-fidelity: features from any registered extractor, statistics and the
Frechet distance from torch-fidelity's own functions (no hand-written formula here)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from sfdbench.errors import BadInput


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] as the Dataset torch-fidelity consumes."""

    def __init__(self, images_u8: torch.Tensor):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise BadInput(f"metrics need uint8 images [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}")
        self.images = images_u8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def extract_features(extractor: FeatureExtractorBase, images_u8: torch.Tensor, layer: str,
                     batch_size: int = 500, cuda: bool = False) -> torch.Tensor:
    """Features of ``layer`` for every image, float64 [N, D], via torch-fidelity's extraction loop
    (``cuda=True`` moves each batch to the GPU; the extractor must already be there)."""
    feats = get_featuresdict_from_dataset(TensorImages(images_u8), extractor, batch_size, cuda=cuda,
                                          save_cpu_ram=True, verbose=False)
    return feats[layer].to(torch.float64)


def fid_statistics(features: torch.Tensor) -> dict:
    """mu and sigma (unbiased covariance) of float64 features, as torch-fidelity computes them."""
    if features.shape[0] < 2:
        raise BadInput(f"FID needs at least 2 samples, got {features.shape[0]}")
    return fid_features_to_statistics(features.to(torch.float64).cpu())


def fid_from_statistics(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (torch-fidelity)."""
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])
