"""The data of the embedded digits suites: scikit-learn's 8x8 handwritten digits (1,797 images,
10 classes) with a fixed held-out split. Shared by the suites (``digits.py``) and the training of
their shipped networks (``digits_training.py``)."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

SPLIT_SEED = 0
HELD_OUT = 297  # images never seen by the teacher or the feature net; 1500 remain for training
SIGMA_DATA = 0.5
NUM_CLASSES = 10


@cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as float32 [N, 1, 8, 8] and their labels, for ``train`` (1500),
    ``test`` (297, held out) or ``all`` (1797). Pixel values 0..16 map to v / 8 - 1."""
    images, labels = _digits_arrays()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    idx = {"train": order[HELD_OUT:], "test": order[:HELD_OUT], "all": np.arange(len(images))}[split]
    x = torch.from_numpy(images[idx] / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(labels[idx])


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), NUM_CLASSES).float()
