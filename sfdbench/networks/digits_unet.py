"""A small U-Net for 8x8 single-channel images (the raw network F of EDM preconditioning).

Shaped after EDM's SongUNet (positional noise embedding -> MLP, residual blocks with the
embedding added before the second GroupNorm, skip connections between encoder and decoder),
at a size that trains on two CPU cores in minutes.

``step_condition=True`` adds SFD-v's step-condition branch (``shared/docs/sfd-spec.md`` 5.2, the
SongUNet variant): a positional embedding of the integer N (number of timestamps) -> Linear ->
SiLU -> Linear -> SiLU, and in every residual block a Linear projection of it added next to the
noise-embedding projection, before the second GroupNorm. Networks built without it (the shipped
teacher, first-stage SFD students) have no such modules, so their checkpoints stay loadable strictly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def positional_embedding(x: torch.Tensor, channels: int, max_positions: int = 10_000,
                         endpoint: bool = False) -> torch.Tensor:
    """Transformer-style sinusoidal embedding [sin(x f_k), cos(x f_k)], f_k = max^(-k/(C/2)), or with
    ``endpoint`` f_k = max^(-k/(C/2 - 1)) so that the last frequency is exactly 1/max (EDM's
    SongUNet convention, which SFD-v's step embedding uses)."""
    half = channels // 2
    denom = half - 1 if endpoint else half
    freqs = torch.exp(-math.log(max_positions) * torch.arange(half, device=x.device, dtype=torch.float32) / denom)
    angles = x.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, add the embedding projection (and the step-embedding projection when
    step-conditioned), GN -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, step_condition: bool = False):
        super().__init__()
        self.norm0 = nn.GroupNorm(8, c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        # created last, so the modules above are initialised exactly as without the step condition
        self.step_emb = nn.Linear(emb_dim, c_out) if step_condition else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, step_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.emb(emb)[:, :, None, None]
        if step_emb is not None:
            h = h + self.step_emb(step_emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (h + self.skip(x)) / math.sqrt(2)


class DigitsUNet(nn.Module):
    """U-Net over resolutions 8 -> 4 -> 2 with ``blocks`` residual blocks per level.

    ``forward(x, c_noise, labels=None, step_condition=None)``: ``c_noise`` is EDM's ln(sigma)/4 per
    sample; ``step_condition`` (SFD-v: the number of timestamps N, a scalar or shape [1] broadcast over
    the batch, or one value per sample) needs ``step_condition=True`` at construction. The step
    modules use PyTorch's ordinary ``nn.Linear`` init (this network's init everywhere; spec 5.2
    "Initialisation": random, not zero); ``is_step_condition_key`` names their parameters.
    """

    def __init__(self, in_channels: int = 1, model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
                 blocks: int = 2, emb_dim: int = 256, dropout: float = 0.1, label_dim: int = 0,
                 step_condition: bool = False):
        super().__init__()
        self.config = dict(in_channels=in_channels, model_channels=model_channels, channel_mult=list(channel_mult),
                           blocks=blocks, emb_dim=emb_dim, dropout=dropout, label_dim=label_dim)
        if step_condition:  # only then, so that the config of every existing network is unchanged
            self.config["step_condition"] = True
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
                self.down.append(ResBlock(c, width, emb_dim, dropout, step_condition))
                c = width
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, step_condition),
                                  ResBlock(c, c, emb_dim, dropout, step_condition)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, dropout, step_condition))
                c = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        # SFD-v's second embedding branch, parallel to ``map`` (created last: see ResBlock)
        self.step_map = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
                                      nn.SiLU()) if step_condition else None

    @property
    def step_conditioned(self) -> bool:
        return self.step_map is not None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                step_condition: torch.Tensor | int | None = None) -> torch.Tensor:
        emb = self.map(positional_embedding(c_noise, self.noise_channels))
        if self.label_map is not None and labels is not None:
            emb = emb + self.label_map(labels.to(emb.dtype))
        step_emb = None
        if step_condition is not None:
            if self.step_map is None:
                raise ValueError("this network has no step-condition branch (build it with step_condition=True)")
            n = torch.as_tensor(step_condition, dtype=torch.float32, device=x.device).reshape(-1)
            step_emb = self.step_map(positional_embedding(n, self.noise_channels, endpoint=True).to(emb.dtype))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, step_emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb, step_emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, step_emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def is_step_condition_key(key: str) -> bool:
    """Whether a state-dict key belongs to the step-condition branch (``step_map.*``, ``*.step_emb.*``)."""
    return key.startswith("step_map.") or ".step_emb." in key
