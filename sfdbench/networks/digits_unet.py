"""A small U-Net for 8x8 single-channel images (the raw network F of EDM preconditioning).

Shaped after EDM's SongUNet (positional noise embedding -> MLP, residual blocks with the
embedding added before the second GroupNorm, skip connections between encoder and decoder),
at a size that trains on two CPU cores in minutes.

Class labels (``label_dim > 0``) enter as EDM's ``class_labels``: a one-hot row per sample, mapped
by a bias-free Linear and added to the noise embedding, so an all-zero row is "no label" (the
unconditional branch of classifier-free guidance, trained by label dropout).

SFD-v's step-condition branch is not built in: ``sfdbench.networks.adapters`` attaches it to this
network (and to any other registered architecture) from outside.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sfdbench.networks.layers import positional_embedding


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, add the embedding projection, GN (``norm1``) -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(8, c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (h + self.skip(x)) / math.sqrt(2)


class DigitsUNet(nn.Module):
    """U-Net over resolutions 8 -> 4 -> 2 with ``blocks`` residual blocks per level.

    ``forward(x, c_noise, class_labels=None)``: ``c_noise`` is EDM's ln(sigma)/4 per sample;
    ``class_labels`` one-hot [B, label_dim] (ignored when the network has no labels).
    """

    def __init__(self, in_channels: int = 1, model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
                 blocks: int = 2, emb_dim: int = 256, dropout: float = 0.1, label_dim: int = 0):
        super().__init__()
        self.config = dict(in_channels=in_channels, model_channels=model_channels, channel_mult=list(channel_mult),
                           blocks=blocks, emb_dim=emb_dim, dropout=dropout, label_dim=label_dim)
        self.noise_channels = model_channels
        self.map = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.label_map = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        widths = [model_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        skips, c = [model_channels], model_channels
        for level, width in enumerate(widths):
            if level > 0:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
            for _ in range(blocks):
                self.down.append(ResBlock(c, width, emb_dim, dropout))
                c = width
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, dropout))
                c = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        emb = self.map(positional_embedding(c_noise, self.noise_channels))
        if self.label_map is not None and class_labels is not None:
            emb = emb + self.label_map(class_labels.to(emb.dtype))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
