"""FD-DINOv2's feature space: Meta's DINOv2 ViT-L/14, offline, registered into torch-fidelity.

FD-DINOv2 is the Frechet distance on the 1024-d DINOv2 ViT-L/14 (Oquab et al. 2023) CLS features,
the metric of dgm-eval (Stein et al. 2023, arXiv 2306.04675) that EDM2 (Karras et al. 2024, arXiv
2312.02696) reports. We compute it as EDM2 does (NVlabs/edm2 ``calculate_metrics.py``,
``DINOv2Detector`` with its default ``resize_mode='torch'``):

* uint8 NCHW -> float32 -> ``F.interpolate(size=(224, 224), mode='bicubic', antialias=True)`` (no
  rounding or clamping afterwards) -> ``/ 255`` -> ``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``;
* the network is torch hub's ``facebookresearch/dinov2`` ``dinov2_vitl14`` (weights
  ``dinov2_vitl14_pretrain.pth``, 518x518 pretraining, ``interpolate_offset=0.1``,
  ``interpolate_antialias=False``) and the feature is its ``forward`` output: the CLS token after
  the final LayerNorm.

torch-fidelity 0.4's own ``dinov2-vit-l-14`` extractor differs: it resizes with its TF1-compatible
*bilinear* resize (no antialiasing) and it can only fetch the network through
``torch.hub.load('facebookresearch/dinov2')`` (internet and hub code; a weights path raises
``NotImplementedError``). EDM2's bicubic-antialiased resize gives different features, so its
numbers are what this extractor reproduces.

How the network is built without the hub: timm's ``vit_large_patch14_dinov2`` (same blocks: pre-norm,
LayerScale, qkv bias, exact GELU, LayerNorm eps 1e-6, CLS token pooling) at ``img_size=224``, loaded from the
*official* Meta state dict through timm's own conversion ``timm.models.vision_transformer.
checkpoint_filter_fn`` (its DINOv2 branch drops ``mask_token``, the one key timm has no slot for --
it is only used for masked training -- and renames SwiGLU keys, which ViT-L does not have).

One deliberate override: timm resamples the 37x37 ``pos_embed`` to the 16x16 grid with
``size=(16, 16)`` and ``antialias=True``; DINOv2 itself (``DinoVisionTransformer.
interpolate_pos_encoding``) uses ``scale_factor=(16 + 0.1) / 37`` and no antialiasing, which gives
different values. We keep DINOv2's own resampling (:func:`dinov2_pos_embed`), so the features are
those of the hub model EDM2 runs, up to float32 rounding of the attention kernels.

The weights file is the asset ``dinov2-vitl14`` (``sfdbench assets download dinov2-vitl14``), kept
at ``sfdbench.io.cache_dir()/assets/dinov2_vitl14_pretrain.pth``; nothing here downloads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.io import cache_dir, sha256_file
from sfdbench.metrics.features import FeatureSpace

EXTRACTOR_NAME = "sfdbench-dinov2-vit-l-14"
FEATURE_LAYER = "dinov2"
ASSET_KEY = "dinov2-vitl14"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
INPUT_SIZE = 224  # EDM2 / dgm-eval resize target
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1  # DINOv2 hub default for models without registers


@dataclass(frozen=True)
class ViTArch:
    """A DINOv2 ViT shape. ``VITL14`` is the real one; tests also build thinner-than-real stand-ins
    (fewer blocks) of the same layout."""

    depth: int = 24
    embed_dim: int = 1024
    num_heads: int = 16
    patch_size: int = 14
    pretrain_img_size: int = 518  # pos_embed of the checkpoint: (518 / 14)^2 + 1 = 1370 tokens

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_img_size // self.patch_size

    def label(self) -> str:
        return "DINOv2 ViT-L/14" if self == VITL14 else f"DINOv2 ViT (depth {self.depth}, dim {self.embed_dim})"


VITL14 = ViTArch()


# ----------------------------------------------------------------------------- the weights file


def dinov2_weights_path() -> Path:
    """Where ``sfdbench assets download dinov2-vitl14`` puts the file."""
    return cache_dir() / "assets" / WEIGHTS_FILENAME


def require_dinov2_weights(path: Path | None = None) -> Path:
    """The weights file (``path``, default the asset's cache path); ``MissingAsset`` (exit 3) when absent."""
    path = Path(path) if path is not None else dinov2_weights_path()
    if not path.is_file():
        raise MissingAsset(f"missing {ASSET_KEY}, DINOv2 ViT-L/14 weights {WEIGHTS_FILENAME} (FD-DINOv2) at {path}: "
                           f"run `sfdbench assets download {ASSET_KEY}`, or download {DINOV2_URL} yourself and put "
                           f"it at {dinov2_weights_path()} (cache: $SFDBENCH_CACHE)")
    return path


def read_state_dict(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A plain state dict read with ``torch.load(weights_only=True)`` (no code runs); memory-mapped
    when the file is in torch's zip format, so a layout check costs no full read."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
            if not mmap or "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types: all mean "not a readable state dict"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadInput(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__}: {first[:160]}); "
                       f"expected Meta's {WEIGHTS_FILENAME}: delete it and run "
                       f"`sfdbench assets download {ASSET_KEY}`") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise BadInput(f"{path} holds a {type(sd).__name__}, not a state dict of tensors; expected Meta's "
                       f"{WEIGHTS_FILENAME} (run `sfdbench assets download {ASSET_KEY}`)")
    return sd


def _timm_model(arch: ViTArch, img_size: int, device: str | torch.device = "meta"):
    """timm's ``vit_large_patch14_dinov2`` (``patch_size=14, embed_dim=1024, depth=24, num_heads=16,
    init_values=1e-5``, no classifier), built from its class directly so that neither the pretrained
    config nor ``TIMM_USE_NAFLEXVIT`` can change it; LayerScale's ``init_values`` only matters for
    initialisation, the checkpoint's ``gamma`` replaces it."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device(device):
        return VisionTransformer(img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
                                 depth=arch.depth, num_heads=arch.num_heads, init_values=1e-5, num_classes=0)


def official_layout(arch: ViTArch = VITL14) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Meta's checkpoint (``dinov2_vitl14_pretrain.pth``, loaded by the hub with
    ``strict=True`` into ``DinoVisionTransformer(img_size=518, block_chunks=0)``), derived from timm:
    timm's model at the pretraining size plus ``mask_token`` [1, D], the key timm's DINOv2 conversion
    drops. (tests/standin_weights.py writes the same layout out by hand from Meta's source.)"""
    return dict(_official_layout(arch))


@cache
def _official_layout(arch: ViTArch) -> dict[str, tuple[int, ...]]:
    model = _timm_model(arch, arch.pretrain_img_size, "meta")
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layout["mask_token"] = (1, arch.embed_dim)
    return layout


def check_layout(sd: dict[str, torch.Tensor], arch: ViTArch = VITL14, source: str = "state dict") -> None:
    """``BadInput`` (one line) unless ``sd`` has exactly the official keys and shapes."""
    expected = official_layout(arch)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    nonfloat = [k for k in expected if k in sd and not sd[k].is_floating_point()]
    if missing or unexpected or wrong or nonfloat:
        parts = []
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
                            ("non-float tensors", nonfloat)):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise BadInput(f"{source} is not a {arch.label()} state dict in Meta's layout ({WEIGHTS_FILENAME}): "
                       f"{'; '.join(parts)}; run `sfdbench assets download {ASSET_KEY}`")


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for a square ``grid`` x ``grid`` input: the class token's
    embedding unchanged, the M x M patch embeddings resampled bicubically with ``scale_factor=(grid +
    offset) / M`` (the "historical kludge" that also shifts the sampling positions) and no antialiasing,
    in float32."""
    dtype = pos_embed.dtype
    pos_embed = pos_embed.float()
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise BadInput(f"pos_embed has {n} patch tokens, not a square grid")
    if m == grid:
        return pos_embed.to(dtype)
    dim = pos_embed.shape[-1]
    scale = float(grid + offset) / m
    patch = F.interpolate(pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                          mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise BadInput(f"pos_embed resampling gave a {tuple(patch.shape[-2:])} grid, expected {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos_embed[:, :1], patch], dim=1).to(dtype)


def load_dinov2(sd: dict[str, torch.Tensor], arch: ViTArch = VITL14, img_size: int = INPUT_SIZE,
                device: str | torch.device = "cpu", source: str = "state dict"):
    """timm ``VisionTransformer`` (``num_classes=0``: forward = CLS token after the final norm) for
    ``img_size`` inputs, from an official-layout state dict. Keys go through timm's
    ``checkpoint_filter_fn`` and are loaded with ``strict=True``; ``pos_embed`` is then DINOv2's own
    resampling (module doc). ``device='meta'`` checks the structure without allocating."""
    check_layout(sd, arch, source)
    model = _timm_model(arch, img_size, "meta")
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(dict(sd), model)  # a copy: the DINOv2 branch pops mask_token in place
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise BadInput(f"img_size {img_size} gives a non-square patch grid {grid}")
    converted["pos_embed"] = dinov2_pos_embed(sd["pos_embed"], grid[0])
    converted = {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in converted.items()}
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise BadInput(f"{source} does not fit timm's DINOv2 ViT after conversion: "
                       f"{' '.join(str(exc).split())[:300]}") from None
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers and torch.device(device).type != "meta":
        raise BadInput(f"{source}: timm's DINOv2 ViT has tensors the checkpoint does not fill: {leftovers[:3]}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- torch-fidelity extractor


def preprocess(x_u8: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """EDM2's ``DINOv2Detector`` input (``resize_mode='torch'``): float32, bicubic antialiased resize to
    ``size`` x ``size`` in 0..255, then ``/255`` and ImageNet mean/std."""
    x = F.interpolate(x_u8.to(torch.float32), size=(size, size), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


class Dinov2FeatureExtractor(FeatureExtractorBase):
    """uint8 [B, 3, H, W] -> DINOv2 CLS features [B, 1024] (float32). Weights come from
    ``feature_extractor_weights_path`` (torch-fidelity's keyword); ``sfdbench_dinov2_arch`` (a
    ``ViTArch``, default ViT-L/14) exists for the tests' thinner stand-ins."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, sfdbench_dinov2_arch=None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("Dinov2FeatureExtractor needs feature_extractor_weights_path (nothing is downloaded)")
        path = require_dinov2_weights(feature_extractor_weights_path)
        arch = sfdbench_dinov2_arch or VITL14
        self.model = load_dinov2(read_state_dict(path), arch, INPUT_SIZE, "cpu", source=str(path))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3):
            raise BadInput(f"DINOv2 takes uint8 [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                           f"{tuple(getattr(x, 'shape', ()))}")
        out = {FEATURE_LAYER: self.model(preprocess(x)).to(torch.float32)}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Idempotent registration into torch-fidelity's registry."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, Dinov2FeatureExtractor)


def create(weights_path, cuda: bool = False, arch: ViTArch = VITL14) -> FeatureExtractorBase:
    """The registered extractor, built through torch-fidelity's factory."""
    from torch_fidelity.utils import create_feature_extractor

    register()
    return create_feature_extractor(EXTRACTOR_NAME, [FEATURE_LAYER], cuda=cuda,
                                    feature_extractor_weights_path=str(weights_path), sfdbench_dinov2_arch=arch,
                                    verbose=False)


def dinov2_feature_space(weights_path: Path | None = None, batch_size: int = 64, arch: ViTArch = VITL14):
    """FD-DINOv2's ``FeatureSpace`` (layer ``dinov2``, 1024-d for ViT-L/14). ``weights_path`` defaults
    to the asset's cache path. Checks now, before any sampling: the file exists (``MissingAsset``,
    exit 3) and holds Meta's layout (``BadInput``, exit 2; memory-mapped, cheap). The network itself
    is built on first use."""
    path = require_dinov2_weights(weights_path)
    check_layout(read_state_dict(path), arch, source=str(path))
    return FeatureSpace(name=EXTRACTOR_NAME, layer=FEATURE_LAYER, dim=arch.embed_dim,
                        weights_id=sha256_file(path)[:16], create=lambda cuda: create(path, cuda, arch),
                        channels=(1, 3), image_size=None, gray_to_rgb=True, batch_size=batch_size,
                        description=f"{arch.label()} ({WEIGHTS_FILENAME}) via timm, CLS token after the final "
                                    "norm; uint8 resized to 224x224 bicubic+antialias, /255, ImageNet mean/std "
                                    "(EDM2 calculate_metrics.py DINOv2Detector, resize_mode='torch')")
