"""A toy latent, class-conditional suite whose teacher is NOT the digits network: the proof that
methods and harness assume no particular network (``docs/suites.md``).

* latent space 3x4x4, decoded by a fixed "decoder" (nearest 2x upsampling, a fixed 1x1 channel
  mix, tanh) to 3x8x8 images;
* an epsilon-prediction discrete-VP teacher (Stable Diffusion's noise table) around a small,
  randomly initialised SongUNet-like network with class labels (3 classes), registered with its
  own step-condition adapter (as a user plugging in their own architecture would);
* labels drawn per sample from the sample's generator; FID in a fixed random-projection feature
  space against decoded "real" latents.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sfdbench.diffusion.denoiser import VPEpsilonDenoiser
from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
from sfdbench.networks.adapters import ArchitectureAdapter, StepEmbedding, register_adapter
from sfdbench.networks.layers import positional_embedding
from sfdbench.suites.base import GridEntry, Suite

NAME = "toy-latent"
CLASSES = 3


class ToyBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(4, c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb, c_out)
        self.norm1 = nn.GroupNorm(4, c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x))) + self.affine(emb)[:, :, None, None]
        return (self.conv1(F.silu(self.norm1(h))) + self.skip(x)) / math.sqrt(2)


class ToyUNet(nn.Module):
    """epsilon(x_in, c_noise, class_labels): two levels (4 -> 2), one block each, a middle block."""

    def __init__(self, channels: int = 3, width: int = 16, emb: int = 32, label_dim: int = CLASSES):
        super().__init__()
        self.width = width
        self.map = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.labels = nn.Linear(label_dim, emb, bias=False)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.enc = ToyBlock(width, width, emb)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = ToyBlock(width, 2 * width, emb)
        self.dec = ToyBlock(3 * width, width, emb)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        emb = self.map(positional_embedding(c_noise / 1000, self.width))
        if class_labels is not None:
            emb = emb + self.labels(class_labels.to(emb.dtype))
        h = self.enc(self.inp(x), emb)
        m = self.mid(self.down(h), emb)
        up = F.interpolate(m, scale_factor=2, mode="nearest")
        return self.out(F.silu(self.dec(torch.cat([up, h], dim=1), emb)))


class ToyAdapter(ArchitectureAdapter):
    def step_embedding(self, net):
        return StepEmbedding(channels=net.width, hidden=net.map[2].out_features, endpoint=True)

    def injection_points(self, net):
        return [(f"{name}.norm1", block.affine.out_features) for name, block in net.named_children()
                if isinstance(block, ToyBlock)]

    def bottleneck(self, net):
        return "mid"


register_adapter(ToyUNet, ToyAdapter())

VP = DiscreteVP.sd()
_MIX = torch.Generator().manual_seed(7)
MIX = torch.randn(3, 3, generator=_MIX) / math.sqrt(3) + torch.eye(3)
PROJECTION = torch.randn(3 * 8 * 8, 12, generator=_MIX) / math.sqrt(3 * 8 * 8)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """The fixed "decoder": 3x4x4 latents -> 3x8x8 images in [-1, 1]."""
    up = F.interpolate(latents.float(), scale_factor=2, mode="nearest")
    return torch.tanh(torch.einsum("oc,nchw->nohw", MIX.to(up.device), up))


def features(images_u8: torch.Tensor) -> torch.Tensor:
    return (images_u8.float().flatten(1) / 127.5 - 1.0) @ PROJECTION


def real_latents(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent blobs: the data the toy teacher would model (never trained here)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=gen)
    centres = torch.linspace(-0.6, 0.6, CLASSES)[labels].reshape(-1, 1, 1, 1)
    return (centres + 0.3 * torch.randn(n, 3, 4, 4, generator=gen)).clamp(-1, 1), labels


class ToyLatentSuite(Suite):
    def __init__(self):
        low, high = VP.sigma_range()
        super().__init__(
            name=NAME, description="toy latent class-conditional suite (tests only)", latent_shape=(3, 4, 4),
            sigma_min=low, sigma_max=high, discrete_vp=VP,
            default_grid=(GridEntry("ddim", (2,)), GridEntry("sfd", (2,)), GridEntry("sfd", (2,), guidance=2.0)),
            default_seeds=(0,), default_samples=8,
            method_options={"sfd": {"iterations": 2, "batch": 4, "checkpoint_every": 1, "schedule": "discrete",
                                    "rho": 1.0, "sigma_min": 0.1},
                            "sfd-v": {"iterations": 2}, "sfd-stage2": {"iterations": 2},
                            "ddim": {"schedule": "discrete", "rho": 1.0},
                            **{m: {"iterations": 2, "batch": 4} for m in ("amed", "amed-plugin", "amed-plugin-dpmpp",
                                                                          "epd")},
                            **{m: {"num_warmup": 8, "warmup_batch": 8} for m in ("gits", "gits-ddim")},
                            **{m: {"iterations": 2, "batch": 4, "checkpoint_every": 1, "data": "teacher-samples",
                                   "teacher_pool": 8} for m in ("cd", "ect")}})

    def decode(self, latents):
        return decode(latents)

    def conditioning(self, generator, index):
        return {"class_labels": F.one_hot(torch.randint(CLASSES, (), generator=generator), CLASSES).float()}

    def training_conditioning(self, batch, generator):
        return {"class_labels": F.one_hot(torch.randint(CLASSES, (batch,), generator=generator), CLASSES).float()}

    def training_data(self, batch, generator):
        latents, labels = real_latents(batch, int(torch.randint(2**31 - 1, (), generator=generator)))
        return decode(latents), {"class_labels": F.one_hot(labels, CLASSES).float()}

    def load_teacher(self, path=None, device="cpu"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = ToyUNet()
        teacher = VPEpsilonDenoiser(net, VP).to(device).eval()
        teacher.requires_grad_(False)
        return teacher

    def teacher_id(self, path=None):
        return "toy-unet-seed0"

    def evaluate(self, images_u8, cond=None):
        from sfdbench.metrics.images import to_uint8

        real = features(to_uint8(decode(real_latents(64)[0])))
        fid = fid_from_statistics(fid_statistics(features(images_u8)), fid_statistics(real))
        return {"fid": float(fid)}

    def metric_protocol(self):
        return {"feature_extractor": "toy random projection (12-d)", "n_reference": 64}
