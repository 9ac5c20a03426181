"""Stand-in weights for the real suites' feature networks: files of the exact structure of the real
ones, filled with seeded random values, so the metric pipeline can be proven offline.

* :func:`write_standin_inception`: the state dict torch-fidelity's ``inception-v3-compat`` loads
  (``FeatureExtractorInceptionV3.__init__`` builds the network, then ``torch.load``s
  ``feature_extractor_weights_path`` and ``load_state_dict``s it strictly, so the file's keys and
  shapes are exactly the network's ``state_dict()``: 566 keys, BatchNorm buffers included), saved with
  ``torch.save`` like ``weights-inception-2015-12-05-6726825d.pth``.
* :func:`write_standin_dinov2`: a DINOv2 ViT state dict in Meta's original layout
  (``dinov2_vitl14_pretrain.pth``). :func:`meta_dinov2_layout` writes that layout out by hand from
  Meta's source, facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``
  (``DinoVisionTransformer``: ``cls_token`` [1, 1, D], ``pos_embed`` [1, (518/14)^2 + 1, D],
  ``mask_token`` [1, D], ``patch_embed.proj`` conv 14x14, ``blocks.N`` with ``block_chunks=0`` as the
  hub builds it, final ``norm``) and ``dinov2/layers`` (``Block``: ``norm1``, ``attn.qkv``,
  ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``). It is written
  independently of ``sfdbench.metrics.dinov2.official_layout``, which derives the same layout from
  timm; the tests check that the two agree.

Real-size DINOv2 ViT-L/14 is ~1.2 GB of float32: the tests write thinner stand-ins (``depth=2``, real
width 1024) to run the network and check the full-size layout on the meta device.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import torch

INCEPTION_FILENAME = "standin-inception-v3-compat.pth"
DINOV2_FILENAME = "standin-dinov2-vitl14-pretrain.pth"


# ----------------------------------------------------------------------------- Inception-v3


def inception_standin_state_dict(seed: int = 0) -> OrderedDict:
    """The state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` with seeded random values:
    conv weights He-normal (std sqrt(2 / fan_in), so activations keep their scale through the ReLUs;
    torch's default init shrinks them ~1e-8 by pool3), BatchNorm weight 1, bias 0, running mean 0,
    running var 1 (an identity up to eps), fc weights normal std 0.01, bias 0."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    # build the network without weights: no download, no state dict to load
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        net = cls("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            new = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            new = torch.ones_like(value)
        elif key.endswith("bn.bias") or key.endswith("running_mean") or key == "fc.bias":
            new = torch.zeros_like(value)
        elif key.endswith("num_batches_tracked"):
            new = torch.zeros_like(value)
        elif key == "fc.weight":
            new = torch.randn(value.shape, generator=g) * 0.01
        else:
            raise AssertionError(f"unexpected Inception key {key}: update the stand-in")
        out[key] = new.to(value.dtype)
    return out


def write_standin_inception(directory: Path, seed: int = 0, filename: str = INCEPTION_FILENAME) -> Path:
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inception_standin_state_dict(seed), path)
    return path


# ----------------------------------------------------------------------------- DINOv2


def meta_dinov2_layout(depth: int = 24, embed_dim: int = 1024, patch_size: int = 14, img_size: int = 518,
                       mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Meta's DINOv2 checkpoint (ViT-L/14 with the defaults), from Meta's source."""
    d, h = embed_dim, embed_dim * mlp_ratio
    grid = img_size // patch_size
    layout = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid * grid + 1, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,),
            b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        })
    layout.update({"norm.weight": (d,), "norm.bias": (d,)})
    return layout


def dinov2_standin_state_dict(seed: int = 0, depth: int = 24, embed_dim: int = 1024,
                              device: str | torch.device = "cpu") -> OrderedDict:
    """Meta's layout with seeded random values of trained-like scale: linear/conv weights normal std
    0.02 (DINOv2's init), biases std 0.02, LayerNorm weights 1 + N(0, 0.1^2) and biases N(0, 0.1^2),
    LayerScale gammas U(0.1, 0.5), cls/pos embeddings std 0.5 (large on purpose: a wrong pos_embed
    resampling must show in the features). ``device='meta'`` gives shapes only (no memory)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, shape in meta_dinov2_layout(depth, embed_dim).items():
        if torch.device(device).type == "meta":
            out[key] = torch.empty(shape, device="meta")
            continue
        if key in ("cls_token", "pos_embed", "mask_token"):
            value = 0.5 * torch.randn(shape, generator=g)
        elif key.endswith("gamma"):
            value = 0.1 + 0.4 * torch.rand(shape, generator=g)
        elif key.split(".")[-2].startswith("norm"):
            base = 1.0 if key.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.02 * torch.randn(shape, generator=g)
        out[key] = value
    return out


def write_standin_dinov2(directory: Path, seed: int = 0, depth: int = 24, embed_dim: int = 1024,
                         filename: str = DINOV2_FILENAME) -> Path:
    """A DINOv2 checkpoint file in Meta's layout (plain state dict, ``torch.save``); ``depth=24`` is
    the full ViT-L/14 (~1.2 GB)."""
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dinov2_standin_state_dict(seed, depth, embed_dim), path)
    return path
