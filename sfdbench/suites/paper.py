"""The paper's pixel suites: CIFAR-10 32x32 and ImageNet 64x64 with NVIDIA's EDM teachers (Zhou et al.
2024, SFD, arXiv 2409.19681, Tables 2 and 3; teachers from Karras et al. 2022, EDM, arXiv 2206.00364).

* Teacher: the released EDM pickle (``sfdbench assets download --suite cifar10``, or ``--teacher PATH``
  to a local ``.pkl`` or a ``.safetensors`` written by ``sfdbench teacher convert``), read without
  executing anything from it (``sfdbench.networks.edm_pickle``) into our own SongUNet / DhariwalUNet.
* Labels (ImageNet-64): one class per sample, uniform over 1000, drawn from the sample's own generator
  right after its latent and one-hot encoded, as EDM's generate.py does; SFD fine-tuning draws its
  labels uniformly too (``docs/suites.md#paper-suites``).
* Metrics at EDM's protocol (``docs/suites.md#paper-suites``): uint8 images (round half up of
  (x + 1) 127.5), FID on torch-fidelity's ``inception-v3-compat`` pool3 features against EDM's
  reference statistics (``fid-refs/*.npz``), 50,000 samples of seeds 0..49,999 by default.
  Precision / recall / density / coverage, KID and FD-DINOv2 need features of the training set:
  pass ``--reference-images DIR|NPZ`` (the dataset's images); without it they are recorded as
  unavailable with the reason.
* Grids and hyperparameters as the paper: SFD 200 kimg at batch 128 (1563 iterations), lr 5e-5 on
  CIFAR-10 (the reference repository's launch.sh, zju-pi/diff-sampler ``sfd-main/launch.sh``) and
  lr 1e-5 on ImageNet-64 (the authors' answer in zju-pi/diff-sampler issue #20); SFD-v 800 kimg;
  the second stage 2000 kimg at lr 5e-4; sigma_min 0.006 for SFD against the baselines' 0.002
  (``docs/algorithms.md#reference-quirks-reproduced-on-purpose``, item 8); fp16 autocast for
  fine-tuning (the reference sets ``use_fp16`` on teacher and student).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sfdbench.errors import BadInput
from sfdbench.suites.assets import asset_provenance, get_asset, locate
from sfdbench.suites.base import GridEntry, Suite

# SFD paper Tables 2/3 and Figure 1: solvers at NFE 5 and 10 (DDIM also 50), SFD / SFD-v at 2-5,
# the second stage at 1, and the teacher's own sampler (EDM Heun) at its published NFE.
SOLVER_NFES = (5, 10)


def paper_grid(teacher_nfe: int) -> tuple[GridEntry, ...]:
    return (
        GridEntry("heun-edm", (teacher_nfe,)),
        GridEntry("ddim", (10, 50)),
        GridEntry("dpmpp3m", SOLVER_NFES),
        GridEntry("ipndm", SOLVER_NFES),
        GridEntry("unipc", SOLVER_NFES),
        GridEntry("deis", SOLVER_NFES),
        GridEntry("amed-plugin", SOLVER_NFES),  # the paper's AMED-Plugin / GITS rows (Tables 2, 3)
        GridEntry("gits", SOLVER_NFES),
        GridEntry("sfd", (2, 3, 4, 5)),
        GridEntry("sfd-v", (2, 3, 4, 5)),
        GridEntry("sfd-stage2", (1,)),
    )


KIMG_SFD, KIMG_SFD_V, KIMG_STAGE2, BATCH = 200, 800, 2000, 128


def iterations(kimg: int, batch: int = BATCH) -> int:
    """The reference's loop length: it stops once ``cur_nimg >= kimg * 1000``, ``batch`` per iteration."""
    return -(-kimg * 1000 // batch)


def paper_method_options(lr: float) -> dict:
    sfd = {"iterations": iterations(KIMG_SFD), "batch": BATCH, "lr": lr, "precision": "fp16-autocast"}
    return {"sfd": sfd, "sfd-v": {"iterations": iterations(KIMG_SFD_V), "precision": "fp16-autocast"},
            "sfd-stage2": {"iterations": iterations(KIMG_STAGE2), "lr": 5e-4, "precision": "fp16-autocast"}}


PROTOCOL_SAMPLES = 50_000
LABEL_DIM_IMAGENET = 1000


class PaperSuite(Suite):
    """A pixel suite of the paper: an EDM teacher, EDM's FID protocol, the paper's grid."""

    def __init__(self, name: str, description: str, latent_shape, teacher_asset: str, fid_ref_asset: str,
                 label_dim: int, teacher_nfe: int, lr: float, provenance: dict):
        grid = paper_grid(teacher_nfe)
        super().__init__(name=name, description=description, latent_shape=latent_shape, sigma_min=0.002,
                         sigma_max=80.0, default_grid=grid, default_seeds=(0,), default_samples=PROTOCOL_SAMPLES,
                         method_options=paper_method_options(lr), check_grid=(), check_seeds=(0,),
                         check_samples=PROTOCOL_SAMPLES)
        self.teacher_asset = teacher_asset
        self.fid_ref_asset = fid_ref_asset
        self.label_dim = label_dim
        self.provenance = provenance
        self.reference_images: Path | None = None
        self.device = torch.device("cpu")  # where metrics run: the run's device (set by load_teacher)
        self._teacher_path: Path | None = None

    # ---------------------------------------------------------------- teacher

    def teacher_file(self, path=None) -> Path:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise BadInput(f"--teacher {path} does not exist; pass an EDM .pkl or a converted .safetensors")
            return path
        return get_asset(self.teacher_asset).require(self.name)

    def load_teacher(self, path=None, device="cpu"):
        """The EDM teacher (our network, EDM's weights), frozen, on ``device``; its resolution,
        channels and label count must be this suite's."""
        from sfdbench.networks.edm_pickle import load_teacher

        file = self.teacher_file(path)
        teacher = load_teacher(file)
        shape = (int(teacher.img_channels), int(teacher.img_resolution), int(teacher.img_resolution))
        if shape != tuple(self.latent_shape) or int(teacher.label_dim) != self.label_dim:
            raise BadInput(f"teacher {file} makes {shape[0]}x{shape[1]}x{shape[2]} images with "
                           f"{teacher.label_dim} labels; suite {self.name!r} needs "
                           f"{'x'.join(map(str, self.latent_shape))} with {self.label_dim}")
        self.device = torch.device(device)
        self._teacher_path = file
        return teacher.to(device).eval().requires_grad_(False)

    def required_assets(self, teacher_given: bool = False) -> list[str]:
        keys = [] if teacher_given else [self.teacher_asset]
        keys += [self.fid_ref_asset, "inception-v3-compat"]
        return keys + (["dinov2-vitl14"] if self.reference_images is not None else [])

    def require_assets(self, teacher_given: bool = False) -> None:
        """Every file a run needs, checked at once: one line naming all missing ones (exit 3)."""
        from sfdbench.errors import MissingAsset
        from sfdbench.io import cache_dir

        missing = [get_asset(k) for k in self.required_assets(teacher_given) if locate(get_asset(k)) is None]
        if len(missing) == 1:
            missing[0].require(self.name)
        if missing:
            keys = " ".join(a.key for a in missing)
            files = ", ".join(f"{a.key} = {a.filename} from {a.url}" for a in missing)
            raise MissingAsset(f"suite {self.name!r} needs {len(missing)} missing files ({files}): run "
                               f"`sfdbench assets download {keys}` (or `--suite {self.name}`), or fetch them by hand "
                               f"into {cache_dir() / 'assets'}")

    def teacher_id(self, path=None) -> str:
        """The first 16 hex digits of the teacher file's sha256 (its content, not its name)."""
        from sfdbench.io import sha256_file

        return sha256_file(self.teacher_file(path))[:16]

    def asset_provenance(self, teacher=None) -> dict:
        """The sha256 of every file a record depends on and whether it was pinned, recorded at the
        first download, or is an unverified local file (``--teacher``)."""
        from sfdbench.io import sha256_file

        out = {key: asset_provenance(key) for key in self.required_assets(teacher_given=teacher is not None)}
        if teacher is not None:
            out["teacher"] = {"file": str(teacher), "sha256": sha256_file(Path(teacher)), "pinned": False,
                              "source": "unverified local file (--teacher)"}
        return out

    # ---------------------------------------------------------------- conditioning

    def conditioning(self, generator: torch.Generator, index: int) -> dict:
        if not self.label_dim:
            return {}
        label = torch.randint(self.label_dim, (), generator=generator)
        return {"class_labels": torch.nn.functional.one_hot(label, self.label_dim).float()}

    def training_conditioning(self, batch: int, generator: torch.Generator) -> dict:
        if not self.label_dim:
            return {}
        labels = torch.randint(self.label_dim, (batch,), generator=generator)
        return {"class_labels": torch.nn.functional.one_hot(labels, self.label_dim).float()}

    # ---------------------------------------------------------------- evaluation

    def use_reference_images(self, source: Path) -> None:
        source = Path(source)
        if not source.exists():
            raise BadInput(f"--reference-images {source} does not exist; pass a folder of PNGs or an .npz of "
                           "uint8 images")
        self.reference_images = source

    def feature_space(self):
        from sfdbench.metrics.features import inception_feature_space

        return inception_feature_space(self._asset_path("inception-v3-compat"))

    def dinov2_space(self):
        from sfdbench.metrics.dinov2 import dinov2_feature_space

        return dinov2_feature_space(self._asset_path("dinov2-vitl14"))

    def _asset_path(self, key: str) -> Path:
        asset = get_asset(key)
        return locate(asset) or asset.require(self.name)

    def _images_reference(self, space):
        from sfdbench.metrics.reference import reference_from_images

        return reference_from_images(space, self.reference_images, device=str(self.device))

    def reference(self):
        """The training set's statistics: EDM's mu/sigma file, or (``--reference-images``) mu, sigma
        and features of the given images (then PRDC and KID are available too)."""
        from sfdbench.metrics.reference import ReferenceStats

        if self.reference_images is not None:
            return self._images_reference(self.feature_space())
        return ReferenceStats.load(get_asset(self.fid_ref_asset).require(self.name))

    def evaluate(self, images_u8: torch.Tensor, cond: dict | None = None) -> dict:
        """fid (+ kid, precision, recall, density, coverage with reference images) on Inception
        features, and fd_dinov2 (reference images only), against the training set: the streaming
        path (``summarize`` then ``evaluate_summaries``) on one batch of every sample."""
        return self.evaluate_summaries(self.summarize(images_u8, cond or {}))

    # ---------------------------------------------------------------- streaming evaluation

    def summarize(self, images_u8: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """Per-sample rows of one batch: Inception pool3 features (float32 [B, 2048]; the extractor's float32
        output, so nothing is lost) and, with ``--reference-images``, DINOv2 CLS features ([B, 1024]). The
        sampler keeps these rows (8 KiB per sample), never the images."""
        from sfdbench.metrics.images import validate_images

        space = self._streaming_space("inception", self.feature_space)
        images_u8 = validate_images(images_u8, space)
        rows = {"inception": space.features(images_u8, self.device).to(torch.float32)}
        if self.reference_images is not None:
            dino = self._streaming_space("dinov2", self.dinov2_space)
            rows["dinov2"] = dino.features(images_u8, self.device).to(torch.float32)
        return rows

    def _streaming_space(self, key: str, make):
        """One feature space (and extractor) per suite object for every batch, not one per batch."""
        cache = self.__dict__.setdefault("_streaming_spaces", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def evaluate_summaries(self, rows: dict[str, torch.Tensor]) -> dict:
        """The metrics of ``evaluate`` from the rows of every sample (same numbers: FID, and with reference
        images KID, precision / recall / density / coverage at k = 5 and FD-DINOv2)."""
        from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics_from_features
        from sfdbench.metrics.fid import fid_from_statistics, fid_statistics

        feats = rows["inception"].to(torch.float64)
        n = feats.shape[0]
        if n < 2:
            raise BadInput(f"FID needs at least 2 samples, got {n}; generate more samples")
        space = self.feature_space()
        if self.reference_images is None:
            metrics = compute_metrics_from_features(feats, self.reference(), ("fid",), space=space)
            others = [m for m in IMAGE_METRICS if m != "fid"]
            metrics.update({m: None for m in [*others, "kid_std", "fd_dinov2"]})
            metrics["notes"] = (f"{', '.join(others)} and fd_dinov2 unavailable: EDM's reference statistics hold "
                                "only Inception mu/sigma and no DINOv2 statistics of the training set are published "
                                "for this suite; pass --reference-images with the dataset's images")
            return metrics
        if n < 6:
            raise BadInput(f"precision/recall/density/coverage with k=5 need at least 6 samples, got {n}; generate "
                           "more samples or lower k")
        metrics = compute_metrics_from_features(feats, self.reference(), IMAGE_METRICS, k=5, space=space)
        reference = self._images_reference(self.dinov2_space())
        metrics["fd_dinov2"] = fid_from_statistics(fid_statistics(rows["dinov2"].to(torch.float64)),
                                                   reference.fid_stats())
        return metrics

    def metric_protocol(self) -> dict:
        from sfdbench.metrics.evaluate import protocol

        reference = (f"images of {self.reference_images}" if self.reference_images is not None
                     else f"EDM reference statistics {get_asset(self.fid_ref_asset).filename} (mu/sigma only)")
        return {
            **protocol(None, k=5),
            "feature_extractor": "inception-v3-compat", "feature_layer": "2048", "feature_dim": 2048,
            "n_generated": PROTOCOL_SAMPLES,
            "reference_set": f"training set: {reference}",
            "image_conversion": "uint8(clip(127.5 x + 128, 0, 255)), truncating (EDM's generate.py)",
            "second_feature_space": "FD-DINOv2: DINOv2 ViT-L/14 CLS features (EDM2's preprocessing)"
            if self.reference_images is not None else "none (needs --reference-images)",
            **({"labels": f"one-hot, uniform over {self.label_dim} classes, drawn from each sample's generator "
                          "right after its latent (EDM's generate.py)"} if self.label_dim else {}),
        }


CIFAR10_PROVENANCE = {
    "hyperparameters": "SFD: 200 kimg, batch 128, lr 5e-5 (zju-pi/diff-sampler sfd-main/launch.sh); SFD-v 800 kimg; "
                       "second stage 2000 kimg at lr 5e-4 (same file)",
    "grid": "SFD paper Table 2 and Figure 1; Heun NFE 35 = EDM's 18-step sampler (EDM paper, Table 2)",
}
IMAGENET64_PROVENANCE = {
    "hyperparameters": "SFD / SFD-v lr 1e-5: the authors' answer in zju-pi/diff-sampler issue #20; kimg and batch as "
                       "CIFAR-10 (the README says the 2-NFE command serves all EDM datasets); second stage lr 5e-4 "
                       "as CIFAR-10 (no ImageNet value published)",
    "grid": "SFD paper Table 3; Heun NFE 79 = EDM's 40-step sampler for ImageNet-64 (EDM paper, Table 2)",
    "labels": "uniform over 1000 classes, drawn per sample from its generator after the latent (EDM generate.py)",
}


def cifar10() -> PaperSuite:
    return PaperSuite("cifar10", "CIFAR-10 32x32, EDM DDPM++ teacher (uncond.); SFD paper Table 2", (3, 32, 32),
                      "edm-cifar10-teacher", "cifar10-fid-ref", label_dim=0, teacher_nfe=35, lr=5e-5,
                      provenance=CIFAR10_PROVENANCE)


def imagenet64() -> PaperSuite:
    return PaperSuite("imagenet64", "ImageNet 64x64, EDM ADM teacher (class-cond.); SFD paper Table 3", (3, 64, 64),
                      "edm-imagenet64-teacher", "imagenet64-fid-ref", label_dim=LABEL_DIM_IMAGENET, teacher_nfe=79,
                      lr=1e-5, provenance=IMAGENET64_PROVENANCE)
