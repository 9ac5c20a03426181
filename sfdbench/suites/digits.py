"""The embedded ``digits`` suite: scikit-learn's 8x8 handwritten digits, a shipped ~1M-parameter
EDM teacher and a shipped feature CNN. Runs every method on a CPU in minutes, offline.

Images stay at their native 8x8: the U-Net works at 8 -> 4 -> 2 and trains in ~5 minutes on
two cores; upsampling to 16x16 would cost 4x compute for no new information.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
import torch

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.metrics import digits_features
from sfdbench.metrics.fid import extract_features, fid_statistics
from sfdbench.metrics.images import to_uint8
from sfdbench.networks.checkpoint import load_weights, read_metadata
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.base import GridEntry, Suite

WEIGHTS_DIR = Path(__file__).parent / "weights"
TEACHER_WEIGHTS = WEIGHTS_DIR / "digits-teacher.safetensors"
FEATURE_WEIGHTS = WEIGHTS_DIR / "digits-features.safetensors"
SPLIT_SEED = 0
HELD_OUT = 297  # images never seen by the teacher or the feature net; 1500 remain for training
SIGMA_DATA = 0.5
DIGITS_KID_SUBSETS = 20  # torch-fidelity's 100 subsets cost ~3.7 s per record on 2 cores; 20 keep KID's std small
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


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


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_teacher_net(config: dict) -> DigitsUNet:
    return DigitsUNet(**config)


class DigitsSuite(Suite):
    def __init__(self):
        super().__init__(
            name="digits",
            description="scikit-learn 8x8 digits; shipped 1M-param EDM teacher; shipped CNN features (CPU, offline)",
            image_shape=(1, 8, 8),
            sigma_min=SIGMA_MIN,
            sigma_max=SIGMA_MAX,
            default_grid=(
                GridEntry("heun", (4, 10, 36)),
                GridEntry("ddim", (2, 3, 4, 5, 10)),
                GridEntry("dpmpp3m", (2, 3, 4, 5, 10)),
                GridEntry("sfd", (2, 3, 4, 5)),
                GridEntry("sfd-v", (2, 3, 4, 5)),
                GridEntry("sfd-stage2", (1,)),
                GridEntry("dpm2", (4, 10)),
                GridEntry("dpmpp2m", (3, 4, 5, 10)),
                GridEntry("ipndm", (3, 4, 5, 10)),
                GridEntry("unipc", (3, 4, 5, 10)),
                GridEntry("deis", (3, 4, 5, 10)),
            ),
            default_seeds=(0, 1, 2),
            default_samples=2000,
            # The paper fine-tunes a 56M-parameter CIFAR-10 model for 1563 iterations at lr 5e-5;
            # the 1M-parameter digits teacher reaches its plateau in 100 iterations at lr 5e-4
            # (measured: NFE 2 FID 9.3 at 5e-5 vs 5.6 at 5e-4 after 100 iterations).
            # SFD-v: one model for NFE 2-5, 2.5x SFD's length (the paper: 4x); the second stage 5x
            # (the paper: 10x). Measured on digits: SFD-v within ~10% of per-NFE SFD after 250 iterations.
            method_options={"sfd": {"iterations": 100, "batch": 128, "lr": 5e-4, "checkpoint_every": 25},
                            "sfd-v": {"iterations": 250}, "sfd-stage2": {"iterations": 500}},
            check_grid=(GridEntry("ddim", (10,)), GridEntry("dpmpp3m", (5,)), GridEntry("sfd", (2,)),
                        GridEntry("sfd-v", (2,)), GridEntry("sfd-stage2", (1,))),
        )

    def load_teacher(self, path=None, device="cpu") -> EDMPrecond:
        path = Path(path or TEACHER_WEIGHTS)
        meta = read_metadata(path)
        if meta.get("kind") != "digits-teacher" or "config" not in meta:
            from sfdbench.errors import BadInput

            raise BadInput(f"{path} is not an sfdbench digits teacher (its metadata kind is {meta.get('kind')!r}); "
                           "pass a file written by `sfdbench teacher train`")
        net = load_weights(build_teacher_net(meta["config"]), path)
        teacher = EDMPrecond(net, SIGMA_MIN, SIGMA_MAX, meta.get("sigma_data", SIGMA_DATA)).to(device).eval()
        teacher.requires_grad_(False)
        return teacher

    def teacher_id(self, path=None) -> str:
        return sha256_file(Path(path or TEACHER_WEIGHTS))[:16]

    def feature_space(self):
        return digits_features.feature_space(FEATURE_WEIGHTS)

    def reference(self):
        from sfdbench.metrics.reference import reference_statistics

        # 1500 8x8 images: recomputed once per process in well under a second, kept in memory (no cache file)
        return reference_statistics(self.feature_space(), "sklearn-digits-train-split0-1500",
                                    lambda: to_uint8(load_digits("train")[0]))

    def evaluate(self, images_u8: torch.Tensor) -> dict[str, float]:
        """fid, kid (+ kid_std, kid_subset_size), precision, recall, density, coverage of uint8 samples
        against the 1500 train digits, through ``sfdbench.metrics.evaluate.compute_metrics``."""
        from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics

        return compute_metrics(images_u8, self.reference(), self.feature_space(), IMAGE_METRICS, k=5,
                               kid_subsets=DIGITS_KID_SUBSETS)

    def metric_protocol(self) -> dict:
        from sfdbench.metrics.evaluate import protocol

        return {
            **protocol(digits_features.feature_space(FEATURE_WEIGHTS), k=5, pr_definition="knn",
                       kid_subsets=DIGITS_KID_SUBSETS,
                       n_reference=len(load_digits("train")[0])),
            "reference_set": "digits train split (1500 images; all of them also serve as PRDC/KID reference)",
        }


@cache
def _extractor():
    return digits_features.create(FEATURE_WEIGHTS)


@cache
def _reference_statistics() -> dict:
    images, _ = load_digits("train")
    feats = extract_features(_extractor(), to_uint8(images), digits_features.FEATURE_LAYER)
    return fid_statistics(feats)
