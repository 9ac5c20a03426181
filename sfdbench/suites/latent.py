"""The paper's latent suites through diffusers: ``lsun_bedroom`` (LDM, VQ-f4) and ``ms_coco`` (Stable Diffusion
v1.5, text-to-image). SFD paper (Zhou et al., NeurIPS 2024, arXiv 2409.19681), Sec. 5 ("latent diffusion");
LDM: Rombach et al. 2022 (arXiv 2112.10752); classifier-free guidance: Ho & Salimans 2022.

* Teacher: a diffusers pipeline folder or hub id (``--teacher``; hub ids resolve from the local Hugging Face
  cache only, never downloaded), weights as safetensors (``networks/diffusers_teacher.py``). The U-Net is an
  ε-prediction discrete-VP model wrapped as an EDM denoiser on its own noise table; σ range = the wrapper's
  default (σ(τ=1e-3), σ(1)): LDM (betas 0.0015 -> 0.0195) 0.0388 .. 83.8, SD (0.00085 -> 0.012)
  0.0292 .. 14.61 (``docs/algorithms.md``, discrete-VP wrapper). Every method runs on the ``discrete``
  schedule with ρ = 1. SFD / SFD-v use σ_min 0.006 (LDM) and 0.1 (SD) (the SFD reference's settings,
  ``docs/suites.md#latent-suites``).
* ``lsun_bedroom``: unconditional, latents 3x64x64 decoded by the VQ-f4 first stage to 3x256x256.
* ``ms_coco``: latents 4x64x64 decoded by SD's AutoencoderKL to 3x512x512; sample i is conditioned on caption i
  of the MS-COCO val2014 30k caption list (the text2image-benchmark CSV, column ``text``), as ``cond =
  {"caption_index": i}``; the CLIP ViT-L/14 text embedding is computed once per caption and cached.
  Classifier-free guidance w = 7.5 at sampling (the paper's); the unconditional branch is the empty prompt
  ("" = caption index -1); each guided call costs 2 network evaluations. SFD fine-tuning sees the teacher
  without guidance (w = 1) and draws training captions uniformly from the list.
* Metrics, computed per batch (``summarize``: Inception pool3 features, CLIP cosines, DINOv2 features when
  its weights and reference exist) so decoded images never accumulate in memory: FID against reference
  statistics the user builds once (``sfdbench reference build --suite NAME --images DIR``: streaming, cached,
  provenance recorded); ``ms_coco`` adds the CLIP score with open_clip ViT-g-14 ``laion2b_s34b_b88k``
  (mean of 100 max(cos, 0), the model's own resize / centre-crop preprocessing; ``metrics/clip_score.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.errors import BadInput, MissingAsset
from sfdbench.suites.assets import get_asset, locate
from sfdbench.suites.base import GridEntry, Suite

# ---------------------------------------------------------------------------------------------
# Grids and hyperparameters

SFD_NFES = (2, 3, 4, 5)
SOLVER_NFES = (4, 5, 6, 8, 10)  # DPM-Solver++ / UniPC / DDIM baselines at the few-step NFEs of the latent tables
DISCRETE = {"schedule": "discrete", "rho": 1.0}
LATENT_SOLVER_OPTIONS = {"thresholding": False}  # dynamic thresholding is for pixel space (diffusers' default off)


def latent_grid(guidance: float | None) -> tuple[GridEntry, ...]:
    """SFD / SFD-v at 2-5 sampler steps and the DPM-Solver++ / UniPC / DDIM baselines (SFD paper, latent
    tables). With guidance every step costs 2 network evaluations: "NFE (guided)" = 2 x steps."""
    return (
        GridEntry("ddim", SOLVER_NFES, guidance),
        GridEntry("dpmpp2m", SOLVER_NFES, guidance),
        GridEntry("dpmpp3m", SOLVER_NFES, guidance),
        GridEntry("unipc", SOLVER_NFES, guidance),
        GridEntry("sfd", SFD_NFES, guidance),
        GridEntry("sfd-v", SFD_NFES, guidance),
    )


def latent_method_options(sfd_sigma_min: float, lr: float, micro_batch: int | None = None) -> dict:
    """Solvers on the ``discrete`` schedule; SFD / SFD-v: 128 trajectories per iteration, processed in rounds of
    ``micro_batch`` (the reference's SD accumulation; None: one round, as for the LDM)."""
    solver = {**DISCRETE}
    dpm = {**DISCRETE, **LATENT_SOLVER_OPTIONS}
    sfd = {**DISCRETE, "sigma_min": sfd_sigma_min, "lr": lr, "batch": 128, "precision": "fp16-autocast",
           "iterations": 1563, **({"micro_batch": micro_batch} if micro_batch else {})}
    return {"ddim": solver, "heun": solver, "dpm2": solver, "ipndm": solver, "ipndm_v": solver, "deis": solver,
            "dpmpp2m": dpm, "dpmpp3m": dpm, "unipc": dpm, "heun-edm": solver,
            "sfd": sfd, "sfd-v": {**sfd, "iterations": 6250}}


SD_MICRO_BATCH = 16  # trajectories per round of the 128 per SFD iteration on Stable Diffusion (memory, not math)
CAPTIONS_ASSET = "ms-coco-captions-30k"
CLIP_MODEL, CLIP_PRETRAINED = "ViT-g-14", "laion2b_s34b_b88k"
SD_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_FETCH = (f"`hf download {SD_HUB_ID} --include 'model_index.json' 'scheduler/*' 'unet/config.json' "
            "'unet/diffusion_pytorch_model.safetensors' 'vae/config.json' 'vae/diffusion_pytorch_model.safetensors' "
            "'text_encoder/config.json' 'text_encoder/model.safetensors' 'tokenizer/*'`")
LDM_FOLDER_HELP = ("download CompVis' lsun_bedrooms.zip "
                   "(https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip, listed in latent-diffusion's "
                   "scripts/download_models.sh), unzip it and run `sfdbench teacher "
                   "convert model.ckpt FOLDER` (a diffusers folder, safetensors; no code from the file is run)")


class LatentSuite(Suite):
    """A latent diffusers teacher (ε-prediction, discrete VP) with FID (+ CLIP score for captions)."""

    def __init__(self, name: str, description: str, latent_shape, image_size: int, vp: DiscreteVP, *, text: bool,
                 guidance: float, sfd_sigma_min: float, lr: float, default_teacher: str | None,
                 teacher_fetch: str, provenance: dict, samples: int, micro_batch: int | None = None):
        low, high = vp.sigma_range()
        grid = latent_grid(guidance if guidance != 1.0 else None)
        super().__init__(name=name, description=description, latent_shape=tuple(latent_shape), sigma_min=low,
                         sigma_max=high, default_grid=grid, default_seeds=(0,), default_samples=samples,
                         method_options=latent_method_options(sfd_sigma_min, lr, micro_batch), check_grid=(),
                         check_seeds=(0,), check_samples=samples, discrete_vp=vp, guidance=guidance)
        self.image_size = int(image_size)
        self.text = bool(text)
        self.default_teacher = default_teacher
        self.teacher_fetch = teacher_fetch
        self.provenance = provenance
        self.device = torch.device("cpu")
        self._teacher = None
        self._teacher_folder: Path | None = None
        self._captions: list[str] | None = None
        self._clip = None
        self.clip_loader = None  # tests: a callable () -> metrics.clip_score.ClipModel
        self.feature_space_factory = None  # tests: a callable () -> FeatureSpace (default Inception-v3)
        self.dinov2_factory = None
        self._spaces: dict = {}  # feature spaces, built once per suite object

    # ---------------------------------------------------------------- teacher

    def default_teacher_folder(self) -> Path:
        from sfdbench.io import cache_dir

        return cache_dir() / "teachers" / self.name

    def teacher_source(self, path=None):
        if path is not None:
            return path
        folder = self.default_teacher_folder()
        if folder.is_dir():
            return folder
        return self.default_teacher

    def _missing_teacher(self) -> str | None:
        """Why the default teacher is unavailable (None when present)."""
        if self.default_teacher_folder().is_dir():
            return None
        if self.default_teacher is not None:
            from sfdbench.networks.diffusers_teacher import resolve_pipeline

            try:
                resolve_pipeline(self.default_teacher, self.teacher_fetch)
                return None
            except MissingAsset:
                pass
            return (f"teacher {self.default_teacher} (diffusers pipeline, safetensors): run {self.teacher_fetch}, "
                    f"or pass --teacher FOLDER")
        return (f"teacher: {self.teacher_fetch.replace('FOLDER', str(self.default_teacher_folder()))}, or pass "
                "--teacher FOLDER")

    def teacher_folder(self, path=None) -> Path:
        from sfdbench.networks.diffusers_teacher import resolve_pipeline

        source = self.teacher_source(path)
        if source is None:
            raise MissingAsset(f"suite {self.name!r} needs its teacher: {self._missing_teacher()}")
        return resolve_pipeline(source, self.teacher_fetch)

    def load_teacher(self, path=None, device="cpu"):
        """The diffusers U-Net as a frozen EDM denoiser on ``device``; its decoder becomes ``decode``."""
        from sfdbench.networks.diffusers_teacher import load_diffusers_teacher

        folder = self.teacher_folder(path)
        if self.text:
            self.captions()  # sample i <-> caption i mod the list's length from here on
        captions = self.caption if self.text else None
        teacher = load_diffusers_teacher(folder, text=self.text, device=device, captions=captions)
        unet = teacher.net.unet
        shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
        if shape != tuple(self.latent_shape):
            raise BadInput(f"teacher {folder} works on {'x'.join(map(str, shape))} latents; suite {self.name!r} needs "
                           f"{'x'.join(map(str, self.latent_shape))}")
        self.discrete_vp = teacher.vp
        self.sigma_min, self.sigma_max = teacher.sigma_min, teacher.sigma_max
        self.device = torch.device(device)
        self._teacher, self._teacher_folder = teacher, folder
        return teacher

    def teacher_id(self, path=None) -> str:
        from sfdbench.networks.diffusers_teacher import folder_digest

        return folder_digest(self.teacher_folder(path))[:16]

    # ---------------------------------------------------------------- latents, conditioning

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._teacher is None or self._teacher.decoder is None:
            raise BadInput(f"suite {self.name!r} decodes with its teacher's first stage: load the teacher first")
        return self._teacher.decoder(latents)

    @property
    def image_channels(self) -> int:
        return 3

    def captions(self) -> list[str]:
        if self._captions is None:
            self._captions = read_captions(get_asset(CAPTIONS_ASSET).require(self.name))
        return self._captions

    def caption(self, index: int) -> str:
        caps = self.captions()
        return caps[int(index) % len(caps)]

    def conditioning(self, generator: torch.Generator, index: int) -> dict:
        """Sample i <-> caption i (the reference's seed i <-> caption i); nothing is drawn."""
        if not self.text:
            return {}
        n = len(self._captions) if self._captions is not None else None
        return {"caption_index": torch.tensor(index % n if n else index, dtype=torch.long)}

    def training_conditioning(self, batch: int, generator: torch.Generator) -> dict:
        if not self.text:
            return {}
        return {"caption_index": torch.randint(len(self.captions()), (batch,), generator=generator)}

    def unconditional(self, cond: dict) -> dict:
        from sfdbench.networks.diffusers_teacher import UNCONDITIONAL_INDEX

        if "caption_index" not in cond:
            raise BadInput(f"suite {self.name!r} has no conditioning to guide; use guidance 1")
        return {**cond, "caption_index": torch.full_like(cond["caption_index"], UNCONDITIONAL_INDEX)}

    @property
    def conditional(self) -> bool:
        return self.text

    # ---------------------------------------------------------------- assets

    def reference_path(self, space_name: str = "inception-v3-compat") -> Path:
        from sfdbench.io import cache_dir

        return cache_dir() / "reference" / self.name / f"{space_name}.npz"

    def _clip_weights(self) -> Path | None:
        asset = locate(get_asset("clip-vit-g14-laion2b"))
        if asset is not None:
            return asset
        from sfdbench.metrics.clip_score import resolve_clip_weights

        try:
            return resolve_clip_weights(CLIP_MODEL, CLIP_PRETRAINED)
        except (MissingAsset, BadInput, ImportError):
            return None

    def missing_assets(self, teacher_given: bool = False) -> list[str]:
        """One line per missing file, each with the command that fetches or builds it."""
        lines = []
        if not teacher_given:
            why = self._missing_teacher()
            if why:
                lines.append(why)
        keys = [CAPTIONS_ASSET] if self.text else []
        keys.append("inception-v3-compat")
        for key in keys:
            asset = get_asset(key)
            if locate(asset) is None:
                lines.append(f"{key} ({asset.name}): run {asset.download_command(self.name)}, or download {asset.url} "
                             f"to {asset.path}")
        if self.feature_space_factory is None and not self.reference_path().is_file():
            lines.append(f"FID reference statistics {self.reference_path()}: run `sfdbench reference build --suite "
                         f"{self.name} --images DIR` once with {self.reference_images_help()}")
        if self.text and self.clip_loader is None and self._clip_weights() is None:
            asset = get_asset("clip-vit-g14-laion2b")
            lines.append(f"clip-vit-g14-laion2b (open_clip {CLIP_MODEL} / {CLIP_PRETRAINED}, CLIP score): run "
                         f"{asset.download_command(self.name)}, or download {asset.url} to {asset.path}")
        return lines

    def reference_images_help(self) -> str:
        return ("the MS-COCO val2014 images (the 40,504 JPEGs of val2014.zip), centre-cropped and resized to 512"
                if self.text else "the LSUN-Bedroom images, centre-cropped and resized to 256")

    def require_assets(self, teacher_given: bool = False) -> None:
        lines = self.missing_assets(teacher_given)
        if lines:
            raise MissingAsset(f"suite {self.name!r} is missing {len(lines)} asset(s), one per line:\n"
                               + "\n".join(f"  missing {line}" for line in lines))

    def asset_provenance(self, teacher=None) -> dict:
        from sfdbench.suites.assets import asset_provenance

        out = {"inception-v3-compat": asset_provenance("inception-v3-compat")}
        if self.text:
            out[CAPTIONS_ASSET] = asset_provenance(CAPTIONS_ASSET)
        folder = self._teacher_folder or self.teacher_folder(teacher)
        from sfdbench.networks.diffusers_teacher import folder_digest

        out["teacher"] = {"file": str(folder), "sha256": folder_digest(folder), "pinned": False,
                          "source": "diffusers pipeline folder (sha256 over its files)"
                          + (" (--teacher)" if teacher is not None else "")}
        meta = self.reference_path().with_suffix(".json")
        if meta.is_file():
            out["fid-reference"] = json.loads(meta.read_text())
        return out

    # ---------------------------------------------------------------- evaluation (streaming)

    def feature_space(self):
        """Inception-v3 (torch-fidelity ``inception-v3-compat``), built once per suite object."""
        if "inception" not in self._spaces:
            if self.feature_space_factory is not None:
                self._spaces["inception"] = self.feature_space_factory()
            else:
                from sfdbench.metrics.features import inception_feature_space

                asset = get_asset("inception-v3-compat")
                self._spaces["inception"] = inception_feature_space(locate(asset) or asset.require(self.name))
        return self._spaces["inception"]

    def reference(self):
        from sfdbench.metrics.reference import ReferenceStats

        path = self.reference_path(self.feature_space().name)
        if not path.is_file():
            raise MissingAsset(f"missing FID reference statistics {path}: run `sfdbench reference build --suite "
                               f"{self.name} --images DIR` with {self.reference_images_help()}")
        return ReferenceStats.load(path)

    def clip_model(self):
        if self._clip is None:
            if self.clip_loader is not None:
                self._clip = self.clip_loader()
            else:
                from sfdbench.metrics.clip_score import load_clip

                weights = self._clip_weights()
                if weights is None:
                    asset = get_asset("clip-vit-g14-laion2b")
                    raise MissingAsset(f"missing CLIP weights {CLIP_MODEL} / {CLIP_PRETRAINED}: run "
                                       f"{asset.download_command(self.name)}")
                self._clip = load_clip(CLIP_MODEL, str(weights), device=self.device)
        return self._clip

    def dinov2_space(self):
        """DINOv2 ViT-L/14 feature space when its weights and a DINOv2 reference exist, else None."""
        if "dinov2" not in self._spaces:
            path = locate(get_asset("dinov2-vitl14"))
            if self.dinov2_factory is not None:
                self._spaces["dinov2"] = self.dinov2_factory()
            elif path is None or not self.reference_path("dinov2-vitl14").is_file():
                self._spaces["dinov2"] = None
            else:
                from sfdbench.metrics.dinov2 import dinov2_feature_space

                self._spaces["dinov2"] = dinov2_feature_space(path)
        return self._spaces["dinov2"]

    @torch.no_grad()
    def summarize(self, images_u8: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """Per-sample rows of one decoded batch: Inception pool3 features (float32 [B, 2048]), CLIP cosines with
        each sample's caption (float64 [B], ``ms_coco``), DINOv2 CLS features (when available)."""
        from sfdbench.metrics.images import validate_images

        space = self.feature_space()
        images_u8 = validate_images(images_u8, space)
        rows = {"inception": space.features(images_u8, self.device).to(torch.float32)}
        dino = self.dinov2_space()
        if dino is not None:
            rows["dinov2"] = dino.features(images_u8, self.device).to(torch.float32)
        if self.text:
            from sfdbench.metrics.clip_score import clip_cosines

            index = cond["caption_index"].reshape(-1).tolist()
            prompts = [self.caption(i) for i in index]
            rows["clip_cos"] = clip_cosines(images_u8, prompts, self.clip_model(), device=self.device)
            rows["caption_index"] = cond["caption_index"].reshape(-1).cpu()
        return rows

    def evaluate_summaries(self, rows: dict[str, torch.Tensor]) -> dict:
        from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
        from sfdbench.metrics.reference import ReferenceStats

        feats = rows["inception"].to(torch.float64)
        if feats.shape[0] < 2:
            raise BadInput(f"FID needs at least 2 samples, got {feats.shape[0]}; generate more samples")
        metrics: dict = {"fid": fid_from_statistics(fid_statistics(feats), self.reference().fid_stats())}
        notes = []
        if "dinov2" in rows:
            ref = ReferenceStats.load(self.reference_path("dinov2-vitl14"))
            metrics["fd_dinov2"] = fid_from_statistics(fid_statistics(rows["dinov2"].to(torch.float64)),
                                                       ref.fid_stats())
        else:
            metrics["fd_dinov2"] = None
            notes.append("fd_dinov2 unavailable: needs the dinov2-vitl14 weights and a DINOv2 reference "
                         f"(`sfdbench reference build --suite {self.name}` with the weights present)")
        if self.text:
            cos = rows["clip_cos"].to(torch.float64)
            metrics["clip_score"] = float((100 * cos.clamp_min(0)).mean())
        for key in ("kid", "kid_std", "precision", "recall", "density", "coverage"):
            metrics[key] = None
        notes.append("kid, precision, recall, density, coverage unavailable: the reference statistics hold mu/sigma "
                     "only")
        metrics["notes"] = "; ".join(notes)
        return metrics

    def evaluate(self, images_u8: torch.Tensor, cond: dict | None = None) -> dict:
        """Metrics of samples held in memory: ``summarize`` in batches of 100, then ``evaluate_summaries``."""
        rows: dict[str, list] = {}
        cond = cond or {}
        for s in range(0, images_u8.shape[0], 100):
            part = self.summarize(images_u8[s:s + 100], {k: v[s:s + 100] for k, v in cond.items()})
            for k, v in part.items():
                rows.setdefault(k, []).append(v)
        return self.evaluate_summaries({k: torch.cat(v) for k, v in rows.items()})

    def fid_features_and_reference(self, images_u8: torch.Tensor):
        from sfdbench.metrics.images import validate_images

        space = self.feature_space()
        return space.features(validate_images(images_u8, space), self.device), self.reference()

    def metric_protocol(self) -> dict:
        ref_meta = self.reference_path().with_suffix(".json")
        out = {
            "feature_extractor": "inception-v3-compat", "feature_layer": "2048", "feature_dim": 2048,
            "n_generated": self.default_samples,
            "reference_set": json.loads(ref_meta.read_text()).get("images", "") if ref_meta.is_file()
            else "built by `sfdbench reference build`",
            "image_conversion": "decoded by the teacher's first stage, uint8(clip(127.5 x + 128, 0, 255))",
            "evaluation": "streaming: features per decoded batch (summarize), metrics from the rows",
            "guidance": self.guidance,
            "nfe_semantics": "sampler steps; network evaluations = 2 per guided step (NFE (guided))"
            if self.guidance != 1.0 else "sampler steps = network evaluations",
        }
        if self.text:
            out.update({"clip_model": CLIP_MODEL, "clip_pretrained": CLIP_PRETRAINED,
                        "clip_score_formula": "mean 100*max(cos,0)", "clip_preprocess": "open_clip validation "
                        "transform of the model (resize shortest side to 224, bicubic, centre crop)",
                        "captions": "MS-COCO val2014 30k (text2image-benchmark CSV, column text); "
                                    "sample i <-> caption i"})
        return out


def read_captions(path: Path) -> list[str]:
    """The ``text`` column of the caption CSV, in file order."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise BadInput(f"{path} has no 'text' column (columns: {reader.fieldnames}); expected the "
                               "text2image-benchmark MS-COCO captions CSV")
            captions = [row["text"] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"cannot read the caption file {path} ({exc})") from None
    if not captions:
        raise BadInput(f"{path} holds no captions")
    return captions


# ---------------------------------------------------------------------------------------------
# Reference statistics, built once from a folder of images (streaming)

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def center_crop_resize(img, size: int) -> np.ndarray:
    """RGB uint8 [3, size, size]: centre crop to a square, then a bicubic resize (PIL)."""
    import PIL.Image

    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class RunningMoments:
    """Streaming mean and unbiased covariance in float64 (sum and sum of outer products)."""

    def __init__(self, dim: int):
        self.n, self.s, self.ss = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s / self.n
        return mu, (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)


def build_reference(suite: LatentSuite, images: Path, batch: int = 64, device: str = "cpu", progress=None,
                    command: str = "") -> list[Path]:
    """mu/sigma of the Inception (and DINOv2, when its weights are present) features of every image under
    ``images`` (recursive, sorted), centre-cropped and resized to the suite's resolution, in batches (never all
    images in memory); written to the suite's reference path with a JSON provenance record. Cached: an
    unchanged folder is not recomputed."""
    import PIL.Image

    from sfdbench.io import atomic_write_bytes
    from sfdbench.metrics.reference import list_image_files

    images = Path(images)
    files = list_image_files(images, REFERENCE_SUFFIXES, what="--images")
    listing = "\n".join(f"{f.relative_to(images).as_posix()}\t{f.stat().st_size}" for f in files)
    digest = hashlib.sha256(listing.encode()).hexdigest()
    spaces = [suite.feature_space()]
    dino_weights = locate(get_asset("dinov2-vitl14"))
    if suite.dinov2_factory is not None:
        spaces.append(suite.dinov2_factory())
    elif dino_weights is not None:
        from sfdbench.metrics.dinov2 import dinov2_feature_space

        spaces.append(dinov2_feature_space(dino_weights))
    written = []
    todo = []
    for space in spaces:
        path = suite.reference_path(space.name)
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("listing_sha256") == digest \
                and json.loads(meta.read_text()).get("feature_weights_sha256") == space.weights_id:
            written.append(path)
        else:
            todo.append(space)
    if not todo:
        return written
    moments = {space.name: RunningMoments(space.dim) for space in todo}
    for s in range(0, len(files), batch):
        chunk = []
        for f in files[s:s + batch]:
            try:
                with PIL.Image.open(f) as img:
                    chunk.append(center_crop_resize(img, suite.image_size))
            except OSError as exc:
                raise BadInput(f"cannot read reference image {f} ({exc})") from None
        u8 = torch.from_numpy(np.stack(chunk))
        for space in todo:
            moments[space.name].add(space.features(u8, device).numpy())
        if progress is not None:
            progress(min(s + batch, len(files)), len(files))
    for space in todo:
        mu, sigma = moments[space.name].result()
        path = suite.reference_path(space.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        np.savez(buf, mu=mu, sigma=sigma)
        atomic_write_bytes(path, buf.getvalue())
        record = {"suite": suite.name, "images": str(images.resolve()), "n_images": len(files),
                  "listing_sha256": digest, "preprocess": f"RGB, centre crop to square, PIL bicubic resize to "
                  f"{suite.image_size}", **space.protocol(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": command}
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# The two suites

LSUN_PROVENANCE = {
    "teacher": "LDM-VQ-f4 LSUN-Bedroom (Rombach et al. 2022), CompVis lsun_bedrooms.zip + vq-f4.zip, as a diffusers "
               "folder",
    "schedule": "discrete, rho 1; sigma range (sigma(1e-3), sigma(1)) of betas 0.0015 -> 0.0195; SFD sigma_min 0.006",
    "grid": "SFD / SFD-v at 2-5 steps, DPM-Solver++ / UniPC / DDIM baselines (SFD paper, latent-diffusion table)",
    "hyperparameters": "SFD lr 5e-5, 200 kimg (SFD-v 800 kimg): the reference train.py defaults; no LDM / SD launch "
                       "command is published",
}
COCO_PROVENANCE = {
    "teacher": "Stable Diffusion v1.5 (v1-5-pruned-emaonly) as a diffusers pipeline",
    "guidance": "classifier-free guidance 7.5 at sampling (SFD paper), 1 during SFD fine-tuning",
    "schedule": "discrete, rho 1; sigma range (sigma(1e-3), sigma(1)) of betas 0.00085 -> 0.012; SFD sigma_min 0.1",
    "evaluation": "30k MS-COCO val2014 captions (text2image-benchmark CSV); FID vs COCO val2014 images resized to "
                  "512; CLIP score ViT-g-14 laion2b_s34b_b88k",
    "batch": "128 trajectories per SFD iteration, accumulated over rounds of 16 (the reference's SD rule: 128 / "
             "per-GPU batch rounds)",
    "hyperparameters": "SFD lr 5e-5, 200 kimg (SFD-v 800 kimg): the reference train.py defaults; no LDM / SD launch "
                       "command is published",
}


def lsun_bedroom(latent_shape=(3, 64, 64), image_size: int = 256) -> LatentSuite:
    """The LSUN-Bedroom LDM suite (other shapes: tiny test teachers)."""
    return LatentSuite("lsun_bedroom", "LSUN-Bedroom 256x256, LDM VQ-f4 teacher via diffusers (uncond.)",
                       latent_shape, image_size, DiscreteVP.ldm(), text=False, guidance=1.0, sfd_sigma_min=0.006,
                       lr=5e-5, default_teacher=None, teacher_fetch=LDM_FOLDER_HELP, provenance=LSUN_PROVENANCE,
                       samples=50_000)


def ms_coco(latent_shape=(4, 64, 64), image_size: int = 512) -> LatentSuite:
    """The MS-COCO Stable Diffusion suite (other shapes: tiny test teachers)."""
    return LatentSuite("ms_coco", "MS-COCO 512x512 text-to-image, Stable Diffusion v1.5 via diffusers, CFG 7.5",
                       latent_shape, image_size, DiscreteVP.sd(), text=True, guidance=7.5, sfd_sigma_min=0.1, lr=5e-5,
                       default_teacher=SD_HUB_ID, teacher_fetch=SD_FETCH, provenance=COCO_PROVENANCE,
                       samples=30_000, micro_batch=SD_MICRO_BATCH)
