"""The embedded suites: scikit-learn's 8x8 handwritten digits with shipped ~1M-parameter EDM
teachers and a shipped feature CNN. They run every method on a CPU in minutes, offline.

* ``digits``: unconditional (``digits-teacher.safetensors``).
* ``digits-cond``: class-conditional, trained with label dropout so that classifier-free guidance
  works (``digits-cond-teacher.safetensors``); each sample's label is drawn uniformly from the
  sample's own generator right after its latent; the CPU stand-in for ImageNet-64 (labels) and
  Stable Diffusion (guidance: 2 network evaluations per guided step). Its metrics add the
  class-match accuracy: the feature CNN's prediction on a sample vs the label it was asked for.

Images stay at their native 8x8: the U-Net works at 8 -> 4 -> 2 and trains in ~5 minutes on
two cores; upsampling to 16x16 would cost 4x compute for no new information.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.errors import BadInput
from sfdbench.io import sha256_file
from sfdbench.metrics import digits_features
from sfdbench.metrics.images import to_uint8
from sfdbench.networks.checkpoint import load_weights, read_metadata
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.base import GridEntry, Suite
from sfdbench.suites.digits_data import NUM_CLASSES, SIGMA_DATA, load_digits, one_hot

WEIGHTS_DIR = Path(__file__).parent / "weights"
TEACHER_WEIGHTS = WEIGHTS_DIR / "digits-teacher.safetensors"
COND_TEACHER_WEIGHTS = WEIGHTS_DIR / "digits-cond-teacher.safetensors"
FEATURE_WEIGHTS = WEIGHTS_DIR / "digits-features.safetensors"
DIGITS_KID_SUBSETS = 20  # torch-fidelity's 100 subsets cost ~3.7 s per record on 2 cores; 20 keep KID's std small
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
MEMORISATION_PERCENTILE = 5.0


# The paper fine-tunes a 56M-parameter CIFAR-10 model for 1563 iterations at lr 5e-5; the
# 1M-parameter digits teacher reaches its plateau in 100 iterations at lr 5e-4 (measured: NFE 2
# FID 9.3 at 5e-5 vs 5.6 at 5e-4 after 100 iterations). SFD-v: one model for NFE 2-5, 2.5x SFD's
# length (the paper: 4x); the second stage 5x (the paper: 10x). Measured on digits: SFD-v within
# ~10% of per-NFE SFD after 250 iterations.
DIGITS_METHOD_OPTIONS = {"sfd": {"iterations": 100, "batch": 128, "lr": 5e-4, "checkpoint_every": 25},
                         "sfd-v": {"iterations": 250}, "sfd-stage2": {"iterations": 500}}
# The baselines at digits scale (docs/methods.md, "Baselines on digits"): AMED and GITS keep their CIFAR-10
# recipes (79 iterations at batch 128; 61-point grid, 256 warm-up trajectories). EPD: polynomial rho = 7 (its
# time-uniform default is poor with 3-4 points on digits: DPM-Solver-2 FID 90 vs 15) and lr 0.05 (5e-3 barely
# moves its logits), chosen from its identity runs and training loss, not from FID. PD: 64 starting steps, 300
# iterations per halving round at lr 2e-4. CD / ECT: 2,000 iterations at batch 128, L2 distance for CD (LPIPS is
# not available offline), ECT with dropout; lr 5e-4 / 2e-4.
BASELINE_OPTIONS = {
    "epd": {"schedule": "polynomial", "rho": 7.0, "lr": 0.05},
    "pd": {"start_steps": 64, "iterations": 300, "batch": 128, "lr": 2e-4, "checkpoint_every": 50},
    "cd": {"iterations": 2000, "batch": 128, "lr": 5e-4, "warmup_fraction": 0.024, "ema_halflife_fraction": 0.05,
           "distance": "l2", "dropout": "off", "checkpoint_every": 100},
    "ect": {"iterations": 2000, "batch": 128, "lr": 2e-4, "warmup_fraction": 0.024, "ema_halflife_fraction": 0.05,
            "dropout": "on", "checkpoint_every": 100},
}
GUIDED_PD_OPTIONS = {**BASELINE_OPTIONS["pd"], "guidance_range": [1.0, 2.0], "guidance": 1.25}
DIGITS_DEFAULT_GRID = (
    GridEntry("heun", (36,)),
    GridEntry("ddim", (3, 5, 10)),
    GridEntry("dpmpp3m", (2, 3, 5, 10)),
    GridEntry("sfd", (2, 3)),
    # the learned / searched solvers (AMED-Plugin odd NFEs with AFS; EPD: K = 2 directions, NFE 5 and 8 are 3 and
    # 5 parallel rounds, 8 counted calls being the paper's "NFE 5")
    GridEntry("amed-plugin", (3, 5, 7, 9)),
    GridEntry("gits", (4, 5, 6, 8, 10)),
    GridEntry("epd", (5, 8)),
)
# the base solvers of the learned ones at the same NFEs (`--grid learned`)
LEARNED_GRID = (
    GridEntry("ipndm", (3, 4, 5, 6, 7, 8, 9, 10)),
    GridEntry("dpmpp3m", (3, 4, 5, 6, 7, 8, 9, 10)),
    GridEntry("dpm2", (4, 8, 10)),
    GridEntry("amed", (3, 5, 7, 9)),
    GridEntry("amed-plugin", (3, 5, 7, 9)),
    GridEntry("gits", (4, 5, 6, 8, 10)),
    GridEntry("gits-ddim", (5, 10)),
    GridEntry("epd", (5, 8)),
    GridEntry("sfd", (2, 3, 4, 5)),
    GridEntry("sfd-v", (2, 3, 4, 5)),
)
# the distillation baselines' recipe rows (`--grid distillation`; add `--budget sfd` for the equal-budget rows)
DISTILLATION_GRID = (
    GridEntry("sfd", (1, 2, 4)),
    GridEntry("sfd-v", (2, 4)),
    GridEntry("pd", (1, 2, 4)),
    GridEntry("cd", (1, 2, 4)),
    GridEntry("ect", (1, 2, 4)),
)
DIGITS_FULL_GRID = (
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
)
CHECK_GRID = (GridEntry("ddim", (10,)), GridEntry("dpmpp3m", (5,)), GridEntry("sfd", (2,)),
              GridEntry("sfd-v", (2,)), GridEntry("sfd-stage2", (1,)))


class DigitsSuite(Suite):
    """The unconditional digits suite; ``DigitsCondSuite`` adds labels and guidance."""

    teacher_kind = "digits-teacher"
    teacher_path = TEACHER_WEIGHTS
    label_dim = 0

    def __init__(self, **overrides):
        settings = dict(
            name="digits",
            description="scikit-learn 8x8 digits; shipped 1M-param EDM teacher; shipped CNN features (CPU, offline)",
            latent_shape=(1, 8, 8),
            sigma_min=SIGMA_MIN,
            sigma_max=SIGMA_MAX,
            # The quick default (the README's first command): the paper's story on digits in minutes.
            # Every other row is in `--grid full` (the previous default, 2000 samples recommended).
            default_grid=DIGITS_DEFAULT_GRID,
            full_grid=DIGITS_FULL_GRID,
            default_seeds=(0, 1, 2),
            default_samples=1000,
            method_options={k: dict(v) for k, v in {**DIGITS_METHOD_OPTIONS, **BASELINE_OPTIONS}.items()},
            check_grid=CHECK_GRID,
            extra_grids={"learned": LEARNED_GRID, "distillation": DISTILLATION_GRID},
        )
        super().__init__(**{**settings, **overrides})

    # ---------------------------------------------------------------- teacher

    def load_teacher(self, path=None, device="cpu") -> EDMPrecond:
        path = Path(path or self.teacher_path)
        meta = read_metadata(path)
        if meta.get("kind") != self.teacher_kind or "config" not in meta:
            raise BadInput(f"{path} is not an sfdbench {self.name} teacher (its metadata kind is "
                           f"{meta.get('kind')!r}, expected {self.teacher_kind!r}); pass a file written by "
                           f"`sfdbench teacher train --suite {self.name}`")
        net = load_weights(DigitsUNet(**meta["config"]), path)
        teacher = EDMPrecond(net, SIGMA_MIN, SIGMA_MAX, meta.get("sigma_data", SIGMA_DATA)).to(device).eval()
        teacher.requires_grad_(False)
        return teacher

    def teacher_id(self, path=None) -> str:
        return sha256_file(Path(path or self.teacher_path))[:16]

    def teacher_weights_path(self) -> Path:
        return self.teacher_path

    def train_teacher(self, iterations: int, batch: int, seed: int, progress=None):
        from sfdbench.suites.digits_training import COND_LABEL_DROPOUT, train_digits_teacher

        extra = {"label_dim": self.label_dim, "label_dropout": COND_LABEL_DROPOUT} if self.label_dim else {}
        return train_digits_teacher(iterations=iterations, batch=batch, seed=seed,
                                    **({"progress": progress} if progress else {}), **extra)

    def train_features(self, epochs: int, seed: int, progress=None):
        from sfdbench.suites.digits_training import train_digits_classifier

        return train_digits_classifier(epochs=epochs, seed=seed, **({"progress": progress} if progress else {}))

    def feature_weights_path(self) -> Path:
        return FEATURE_WEIGHTS

    def training_data(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        images, labels = load_digits("train")
        idx = torch.randint(len(images), (batch,), generator=generator)
        return images[idx], ({"class_labels": one_hot(labels[idx])} if self.label_dim else {})

    # ---------------------------------------------------------------- evaluation

    def feature_space(self):
        return digits_features.feature_space(FEATURE_WEIGHTS)

    def reference(self):
        from sfdbench.metrics.reference import reference_statistics

        # 1500 8x8 images: recomputed once per process in well under a second, kept in memory (no cache file)
        return reference_statistics(self.feature_space(), "sklearn-digits-train-split0-1500",
                                    lambda: to_uint8(load_digits("train")[0]))

    def heldout_reference(self):
        from sfdbench.metrics.reference import reference_statistics

        return reference_statistics(self.feature_space(), "sklearn-digits-test-split0-297",
                                    lambda: to_uint8(load_digits("test")[0]))

    def evaluate(self, images_u8: torch.Tensor, cond: dict | None = None) -> dict[str, float]:
        """fid, kid (+ kid_std, kid_subset_size), precision, recall, density, coverage of uint8 samples
        against the 1500 train digits, through ``sfdbench.metrics.evaluate.compute_metrics``; and, for
        every record (they matter for methods that train on those digits), ``fid_heldout`` (FID against
        the 297 held-out digits) and ``memorisation`` (``sfdbench.metrics.memorisation``: the fraction of
        samples closer in pixels to a training digit than the 5th percentile of train-to-train
        nearest-neighbour distances)."""
        from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics
        from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
        from sfdbench.metrics.memorisation import memorisation_fraction

        metrics = compute_metrics(images_u8, self.reference(), self.feature_space(), IMAGE_METRICS, k=5,
                                  kid_subsets=DIGITS_KID_SUBSETS)
        features = self.feature_space().features(images_u8)
        metrics["fid_heldout"] = fid_from_statistics(fid_statistics(features), self.heldout_reference().fid_stats())
        metrics["memorisation"] = memorisation_fraction(images_u8.float() / 127.5 - 1.0, load_digits("train")[0],
                                                        MEMORISATION_PERCENTILE)
        return metrics

    def metric_protocol(self) -> dict:
        from sfdbench.metrics.evaluate import protocol

        return {
            **protocol(digits_features.feature_space(FEATURE_WEIGHTS), k=5, pr_definition="knn",
                       kid_subsets=DIGITS_KID_SUBSETS,
                       n_reference=len(load_digits("train")[0])),
            "reference_set": "digits train split (1500 images; all of them also serve as PRDC/KID reference)",
            "fid_heldout": "FID on the same features against the 297 held-out digits (never seen by any network)",
            "memorisation": f"fraction of samples whose nearest train digit (pixel L2, [-1, 1]) is closer than the "
                            f"{MEMORISATION_PERCENTILE:g}th percentile of train-to-train nearest-neighbour distances",
        }


GUIDED_SCALE = 1.25


class DigitsCondSuite(DigitsSuite):
    """Class-conditional digits: labels uniform over the 10 classes, drawn per sample; a teacher
    trained with 10 % label dropout; guided and unguided rows in the default grid."""

    teacher_kind = "digits-cond-teacher"
    teacher_path = COND_TEACHER_WEIGHTS
    label_dim = NUM_CLASSES

    def __init__(self, **overrides):
        settings = dict(
            name="digits-cond",
            description="class-conditional 8x8 digits; shipped EDM teacher with label dropout (guidance); "
                        "class-match accuracy (CPU, offline)",
            # w = 1 is the conditional model without guidance; w = 1.25 is the guided scale chosen by the sweep
            # in the README (the smallest w whose class match is within 0.005 of the best; FID only gets worse
            # with guidance on digits)
            default_grid=tuple(GridEntry(m, nfes, guidance=w) for w in (1.0, GUIDED_SCALE) for m, nfes in (
                ("ddim", (5, 10)), ("dpmpp3m", (3, 5)), ("sfd", (2,)), ("sfd-v", (2, 3, 4, 5)), ("sfd-stage2", (1,)))),
            full_grid=(),
            check_grid=(GridEntry("dpmpp3m", (5,)), GridEntry("sfd", (2,)),
                        GridEntry("sfd", (2,), guidance=GUIDED_SCALE)),
            # guided distillation (one network call per step at w = 1.25) against SFD guided (two)
            extra_grids={"distillation": (GridEntry("sfd", (1, 2, 4), guidance=GUIDED_SCALE),
                                          GridEntry("guided-pd", (1, 2, 4)))},
        )
        super().__init__(**{**settings, **overrides})
        self.method_options["guided-pd"] = dict(GUIDED_PD_OPTIONS)

    def conditioning(self, generator: torch.Generator, index: int) -> dict:
        label = torch.randint(NUM_CLASSES, (), generator=generator)
        return {"class_labels": one_hot(label)}

    def training_conditioning(self, batch: int, generator: torch.Generator) -> dict:
        return {"class_labels": one_hot(torch.randint(NUM_CLASSES, (batch,), generator=generator))}

    def evaluate(self, images_u8: torch.Tensor, cond: dict | None = None) -> dict[str, float]:
        """The digits metrics plus ``class_match``: the share of samples whose feature-CNN class is
        the label they were drawn with."""
        metrics = super().evaluate(images_u8)
        if cond and "class_labels" in cond:
            metrics["class_match"] = digits_features.class_match(FEATURE_WEIGHTS, images_u8, cond["class_labels"])
        return metrics

