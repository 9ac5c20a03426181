"""The digits feature network registered into torch-fidelity as a feature extractor."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from sfdbench.networks.checkpoint import load_weights, read_metadata
from sfdbench.networks.digits_classifier import DigitsClassifier

EXTRACTOR_NAME = "sfdbench-digits"
FEATURE_LAYER = "features"


class DigitsFeatureExtractor(FeatureExtractorBase):
    """uint8 [B, 1, 8, 8] -> (penultimate 64-d features, logits). Weights come from
    ``feature_extractor_weights_path`` (torch-fidelity's own keyword)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("DigitsFeatureExtractor needs feature_extractor_weights_path")
        config = read_metadata(feature_extractor_weights_path)["config"]
        self.net = load_weights(DigitsClassifier(**config), feature_extractor_weights_path).eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        x = x.float() / 127.5 - 1.0
        feats = self.net.features(x)
        out = {FEATURE_LAYER: feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Idempotent registration into torch-fidelity's registry."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)


def create(weights_path, cuda: bool = False) -> FeatureExtractorBase:
    """The registered extractor, built through torch-fidelity's factory."""
    from torch_fidelity.utils import create_feature_extractor

    register()
    return create_feature_extractor(EXTRACTOR_NAME, [FEATURE_LAYER], cuda=cuda,
                                    feature_extractor_weights_path=str(weights_path), verbose=False)


@cache
def _feature_space(weights_path: str):
    from sfdbench.io import sha256_file
    from sfdbench.metrics.features import FeatureSpace

    config = read_metadata(weights_path).get("config", {})
    return FeatureSpace(name=EXTRACTOR_NAME, layer=FEATURE_LAYER, dim=int(config.get("feature_dim", 64)),
                        weights_id=sha256_file(weights_path)[:16], create=lambda cuda: create(weights_path, cuda),
                        channels=(1,), image_size=(8, 8), batch_size=500,
                        description="sfdbench digits CNN, penultimate ReLU layer")


def feature_space(weights_path):
    """The digits feature space (64-d penultimate layer), one instance per weights file, for
    ``sfdbench.metrics.evaluate.compute_metrics``."""
    return _feature_space(str(Path(weights_path).resolve()))


@cache
def _classifier(weights_path: str) -> DigitsClassifier:
    config = read_metadata(weights_path)["config"]
    return load_weights(DigitsClassifier(**config), weights_path).eval()


@torch.no_grad()
def class_match(weights_path, images_u8: torch.Tensor, class_labels: torch.Tensor) -> float:
    """Share of uint8 samples [N, 1, 8, 8] that the digits CNN classifies as the label they were
    asked for (``class_labels``: one-hot [N, 10]): "does the sample show the requested digit"."""
    net = _classifier(str(weights_path))
    predicted = torch.cat([net(chunk.float() / 127.5 - 1.0).argmax(1) for chunk in images_u8.split(1000)])
    return float((predicted == class_labels.argmax(1).to(predicted.device)).float().mean())
