"""CLIP score through open_clip (text-to-image suites).

Per image ``i`` with caption ``i``: ``cos_i = <e_img, e_txt> / (|e_img| |e_txt|)`` from the model's
image and text embeddings (the model's own validation preprocessing and tokenizer), and

    clip_score = mean_i 100 * max(cos_i, 0)     (clip_at_zero=True, default: issue 4, torchmetrics)
    clip_score = mean_i 100 * cos_i             (clip_at_zero=False: the SFD reference, ``sfd-main/clip_score.py``)

(see ``docs/algorithms.md#clip-score``). Default model: ``ViT-g-14`` with pretrained tag ``laion2b_s34b_b88k``,
as in the SFD reference implementation (zju-pi/diff-sampler, file ``sfd-main/clip_score.py``). Weights are never
downloaded here: they are looked up in sfdbench's cache, open_clip's URL cache and the Hugging Face
hub cache, and a missing file raises ``MissingAsset`` naming the file, its URL and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.io import cache_dir as default_cache_dir

DEFAULT_CLIP_MODEL = "ViT-g-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"
HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference order


@dataclass(eq=False)
class ClipModel:
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> normalised tensor [3, S, S]
    tokenizer: Callable  # list[str] -> token tensor
    name: str
    pretrained: str | None
    weights_file: str | None = None

    def protocol(self, clip_at_zero: bool = True) -> dict:
        return {"clip_model": self.name, "clip_pretrained": self.pretrained,
                "clip_score_formula": "mean 100*max(cos,0)" if clip_at_zero else "mean 100*cos (no clipping)"}


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it (read from the environment now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def clip_weights_candidates(model_name: str, pretrained: str, cache_dir: Path | None = None):
    """(url, candidate paths in lookup order, path we ask users to fill) for an open_clip tag."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        from open_clip import list_pretrained_tags_by_model

        raise BadInput(f"unknown open_clip weights {model_name} / {pretrained}; known tags for {model_name}: "
                       f"{list_pretrained_tags_by_model(model_name)} (or pass a weights file path)")
    ours = Path(cache_dir or default_cache_dir()) / "clip" / f"{model_name}-{pretrained}"
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin", as open_clip splits it
        files = (filename,) if filename else HF_FILES
        url = f"https://huggingface.co/{repo}/resolve/main/{files[-1]}"
        candidates = [ours / f for f in files]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for f in files:
                hit = try_to_load_from_cache(repo, f, cache_dir=str(_hf_hub_cache()))
                if isinstance(hit, str):
                    candidates.append(Path(hit))
        return url, candidates, ours / files[-1]
    url = cfg["url"]
    name = os.path.basename(url)
    return url, [ours / name, Path("~/.cache/clip").expanduser() / name], ours / name


def resolve_clip_weights(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED,
                         cache_dir: Path | None = None) -> Path:
    """The local weights file for ``model_name``/``pretrained`` (a tag or a file path), or ``MissingAsset``."""
    if pretrained and Path(pretrained).expanduser().is_file():
        return Path(pretrained).expanduser()
    url, candidates, target = clip_weights_candidates(model_name, pretrained, cache_dir)
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise MissingAsset(f"missing CLIP weights {model_name} / {pretrained}: download {url} and put it at {target} "
                       f"(the Hugging Face hub cache {_hf_hub_cache()} is searched too)")


def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED,
              device: str | torch.device = "cpu", cache_dir: Path | None = None) -> ClipModel:
    """open_clip model + its validation preprocessing + tokenizer, from a local weights file only."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    path = resolve_clip_weights(model_name, pretrained, cache_dir)  # before building a 1B-parameter model
    cfg = get_pretrained_cfg(model_name, pretrained) if not Path(pretrained).expanduser().is_file() else {}
    # a file path loses the tag's preprocessing config in open_clip: pass it explicitly
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(path), device=device, image_mean=cfg.get("mean"), image_std=cfg.get("std"),
        image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"),
        force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(model_name), model_name, pretrained, str(path))


@torch.no_grad()
def clip_cosines(images_u8: torch.Tensor, prompts: list[str], clip: ClipModel, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Cosine similarity (float64 [N]) between image ``i`` and caption ``i``."""
    from torchvision.transforms.functional import to_pil_image

    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
        raise BadInput(f"CLIP score needs uint8 images [N, 1|3, H, W], got {images_u8.dtype} "
                       f"{tuple(images_u8.shape)}")
    if len(prompts) != images_u8.shape[0]:
        raise BadInput(f"CLIP score needs one prompt per image: {images_u8.shape[0]} images, {len(prompts)} prompts")
    model = clip.model.to(device).eval()
    out = []
    for s in range(0, images_u8.shape[0], batch_size):
        imgs = images_u8[s:s + batch_size].cpu()
        pixels = torch.stack([clip.preprocess(to_pil_image(im)) for im in imgs]).to(device)
        tokens = clip.tokenizer(list(prompts[s:s + batch_size])).to(device)
        e_img = model.encode_image(pixels).to(torch.float64)
        e_txt = model.encode_text(tokens).to(torch.float64)
        out.append(torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1, eps=1e-12).cpu())
    return torch.cat(out)


def clip_score(images_u8: torch.Tensor, prompts: list[str], clip: ClipModel, clip_at_zero: bool = True,
               batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean over image-caption pairs of 100 * max(cos, 0) (or 100 * cos when ``clip_at_zero=False``)."""
    cos = clip_cosines(images_u8, prompts, clip, batch_size, device)
    return float((100 * (cos.clamp_min(0) if clip_at_zero else cos)).mean())
