"""The small CNN whose penultimate layer is the feature space of the digits suite (the role
Inception-v3 pool3 plays for CIFAR-10)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DigitsClassifier(nn.Module):
    """uint8-free core: takes images in [-1, 1], shape [B, 1, 8, 8]; ``features`` is 64-d."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = dict(feature_dim=feature_dim, num_classes=num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 2 * 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.features(x), 0.2, self.training))
