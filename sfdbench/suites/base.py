"""What every suite declares (like an lm-eval task): latent space and decoder, conditioning,
teacher, student construction, data, feature space, grids (``docs/suites.md``).

Everything network- or data-specific comes from here; methods and the harness see only this
interface and the teacher denoiser it hands out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfdbench.diffusion.denoiser import Denoiser
from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.errors import BadInput


@dataclass(frozen=True)
class GridEntry:
    """A method at some NFEs; ``guidance`` = the classifier-free-guidance scale to sample with
    (None: the suite's default)."""

    method: str
    nfes: tuple[int, ...]
    guidance: float | None = None


@dataclass
class Suite:
    name: str
    description: str
    latent_shape: tuple[int, ...]  # what the sampler integrates (= the image shape for pixel suites)
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
    # the LDM / Stable Diffusion noise table when the teacher is a discrete-VP model (the
    # ``discrete`` schedule needs it); None for continuous-sigma (EDM) teachers
    discrete_vp: DiscreteVP | None = None
    # classifier-free guidance scale used when a grid entry / --guidance names none (1 = none)
    guidance: float = 1.0
    # a larger grid than the default (`sfdbench run --grid full`); empty = the default grid
    full_grid: tuple[GridEntry, ...] = ()
    # further named grids (`sfdbench run --grid NAME`), e.g. opt-in baselines too slow for the default
    extra_grids: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- latent space, conditioning

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images in [-1, 1] [N, C, H, W] (identity for pixel suites)."""
        return latents

    def conditioning(self, generator: torch.Generator, index: int) -> dict:
        """Conditioning of sample ``index``, drawn from the sample's own generator right after its
        latent (as EDM's generate.py draws ImageNet labels): a dict of per-sample tensors (no batch
        dimension). Unconditional suites: ``{}``, drawing nothing."""
        return {}

    def training_conditioning(self, batch: int, generator: torch.Generator) -> dict:
        """Conditioning of one training batch of ``batch`` trajectories (batched tensors)."""
        return {}

    def unconditional(self, cond: dict) -> dict:
        """``cond`` with its guidance signal removed: the unconditional branch of classifier-free
        guidance. Class labels become all-zero rows (EDM's "no label"); other keys are kept."""
        if "class_labels" not in cond:
            raise BadInput(f"suite {self.name!r} has no conditioning to guide; use guidance 1")
        return {**cond, "class_labels": torch.zeros_like(cond["class_labels"])}

    @property
    def conditional(self) -> bool:
        """Whether samples carry a conditioning signal that guidance can amplify."""
        return bool(self.conditioning(torch.Generator().manual_seed(0), 0))

    def training_data(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """A batch of real training images in [-1, 1] and their conditioning, for methods that need
        data (progressive / consistency distillation)."""
        raise BadInput(f"suite {self.name!r} has no training data")

    # ---------------------------------------------------------------- teacher and student

    def load_teacher(self, path=None, device: str | torch.device = "cpu") -> Denoiser:
        raise NotImplementedError

    def teacher_id(self, path=None) -> str:
        """A content hash of the teacher weights; it enters every config hash."""
        raise NotImplementedError

    def make_student(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """A trainable copy of the teacher denoiser (preconditioning and network)."""
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def load_student(self, path: Path, teacher: torch.nn.Module, meta: dict) -> torch.nn.Module:
        """A student written by ``methods.training.save_student``: a copy of the teacher's
        architecture, the adapters named in ``meta`` attached, the weights loaded strictly."""
        from sfdbench.networks.adapters import attach_step_condition
        from sfdbench.networks.checkpoint import load_weights

        student = copy.deepcopy(teacher)
        if meta.get("adapters", {}).get("step_condition"):
            student = attach_step_condition(student)
        return load_weights(student, path)

    def train_teacher(self, iterations: int, batch: int, seed: int, progress=None):
        """(network, metadata) of a teacher trained from scratch (embedded suites only)."""
        raise BadInput(f"suite {self.name!r} ships no trainable teacher")

    def train_features(self, epochs: int, seed: int, progress=None):
        """(network, metadata) of the suite's feature network trained from scratch (embedded suites only)."""
        raise BadInput(f"suite {self.name!r} ships no trainable feature network")

    def feature_weights_path(self) -> Path:
        raise BadInput(f"suite {self.name!r} ships no trainable feature network")

    def teacher_weights_path(self) -> Path:
        """Where ``sfdbench teacher train`` writes this suite's teacher by default."""
        raise BadInput(f"suite {self.name!r} ships no trainable teacher")

    # ---------------------------------------------------------------- evaluation

    def use_reference_images(self, source: Path) -> None:
        """Compute the reference statistics from these images (``--reference-images``)."""
        raise BadInput(f"suite {self.name!r} has its own reference set; --reference-images is for the paper suites")

    def require_assets(self, teacher_given: bool = False) -> None:
        """Stop with ``MissingAsset`` (exit 3), naming every missing file at once, when a run cannot
        have what it needs (``teacher_given``: ``--teacher`` replaces the downloaded teacher). The
        embedded suites ship everything."""

    def asset_provenance(self, teacher=None) -> dict:
        """sha256 and origin of every downloaded file a record depends on (``teacher``: the
        ``--teacher`` path, if any); the embedded suites download nothing."""
        return {}

    def evaluate(self, images_u8: torch.Tensor, cond: dict | None = None) -> dict[str, float]:
        """Metrics of uint8 samples [N, C, H, W] (and the conditioning they were drawn with)
        against the suite's reference set."""
        raise NotImplementedError

    # Streaming evaluation: the sampler hands each decoded batch to ``summarize`` and keeps only what
    # it returns (per-sample rows, e.g. feature vectors), never the images; ``evaluate_summaries`` turns
    # all rows (concatenated in sample order, gathered from every process) into the metrics. The
    # default keeps the images themselves and calls ``evaluate``: right for small embedded suites.
    # Large suites override both, so host memory holds features (kilobytes per sample), not images.

    def summarize(self, images_u8: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """Per-sample rows [B, ...] of one batch of uint8 samples and their conditioning (batched)."""
        return {"images": images_u8, **{f"cond.{k}": v for k, v in cond.items()}}

    def evaluate_summaries(self, rows: dict[str, torch.Tensor]) -> dict:
        """The metrics of every sample from its rows (``summarize``'s keys, concatenated along dim 0)."""
        cond = {k[len("cond."):]: v for k, v in rows.items() if k.startswith("cond.")}
        return self.evaluate(rows["images"], cond)

    def metric_protocol(self) -> dict:
        """What a record must say about how metrics were computed (extractor, reference, n)."""
        raise NotImplementedError

    def reference_provenance(self) -> dict:
        """What FID is measured against, for records and exports: the statistics' content hash
        (``ReferenceStats.sha256``: mu and sigma) and where they came from. A suite whose metrics do
        not go through ``reference()`` says so instead."""
        try:
            ref = self.reference()
        except NotImplementedError:
            return {"sha256": None, "note": f"suite {self.name!r} exposes no reference statistics"}
        return {"sha256": ref.sha256(), "source": ref.source, "dim": ref.dim,
                "hash_of": "mu then sigma, little-endian float64"}

    def feature_space(self):
        """The ``metrics.features.FeatureSpace`` the suite's metrics use."""
        raise NotImplementedError

    def reference(self):
        """The suite's reference statistics (``metrics.reference.ReferenceStats``)."""
        raise NotImplementedError

    def fid_features_and_reference(self, images_u8: torch.Tensor):
        """(features [N, D] of uint8 samples, reference statistics): what FID and its bootstrap
        interval are computed from. Bad images -> ``BadInput``."""
        from sfdbench.metrics.images import validate_images

        space = self.feature_space()
        reference = self.reference()
        return space.features(validate_images(images_u8, space)), reference

    @property
    def image_channels(self) -> int:
        """Channels of a decoded image (for reading sample files)."""
        return int(self.decode(torch.zeros(1, *self.latent_shape)).shape[1])


def collate(conds: list[dict]) -> dict:
    """Per-sample conditioning dicts -> one batched dict (tensors stacked along a new dim 0)."""
    if not conds or not conds[0]:
        return {}
    return {key: torch.stack([c[key] for c in conds]) for key in conds[0]}
