"""EDM's U-Nets and preconditioning wrappers, with EDM's parameter names (``docs/suites.md#paper-suites``).

The real suites' teachers are the NVIDIA EDM checkpoints (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", arXiv 2206.00364):

* :class:`SongUNet`: the DDPM++ (``embedding_type='positional'``, standard encoder and decoder) and NCSN++
  (``embedding_type='fourier'``, residual encoder, ``channel_mult_noise=2``, resample filter [1,3,3,1])
  U-Nets of Song et al. 2021 (score SDE, arXiv 2011.13456) as EDM configures them;
* :class:`DhariwalUNet`: the ADM U-Net of Dhariwal & Nichol 2021 (arXiv 2105.05233) as EDM configures it;
* :class:`EDMPrecond`, :class:`VPPrecond`, :class:`VEPrecond`: the preconditioning of EDM Table 1 around
  either U-Net, held as the submodule ``model`` so that every state-dict key starts with ``model.``.

This module is written from a description of the architectures (block layout, names, shapes and the
numerical conventions that decide whether outputs match), not from EDM's source. The state-dict names
and shapes of the released CIFAR-10 DDPM++ and ImageNet-64 ADM configurations are checked against
manifests made with EDM's own classes (``tests/data/edm-manifest-*.txt``). Numerical equality with
EDM's code could not be checked here (its code is not run in this project); NCSN++ is built with the
right names and shapes, but no NCSN++ output has been compared with EDM at all.

Weights are stored in float32. Every :class:`Conv2d`, :class:`Linear` and :class:`GroupNorm` casts its
weights to the input's dtype, so the wrappers can run the U-Net in float16 (``use_fp16`` on CUDA), as
EDM does.

:func:`build_precond` builds a wrapper from EDM's class name and the keyword arguments EDM stores with
it (``_init_kwargs``); :data:`CIFAR10_DDPMPP_CONFIG` and :data:`IMAGENET64_ADM_CONFIG` are those of the
two released teachers SFD uses.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sfdbench.diffusion.denoiser import batch_sigma
from sfdbench.errors import BadInput
from sfdbench.networks.layers import edm_positional_embedding

# ---------------------------------------------------------------------------------------------
# Initialisation


def init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A freshly drawn weight tensor: Glorot (``xavier_*``, Glorot & Bengio 2010) or He (``kaiming_*``,
    He et al. 2015) initialisation, uniform or normal, with EDM's scalings (kaiming: gain 1)."""
    t = torch.empty(*shape)
    if mode == "xavier_uniform":
        return t.uniform_(-1, 1).mul_(math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return t.normal_().mul_(math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        return t.uniform_(-1, 1).mul_(math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return t.normal_().mul_(math.sqrt(1 / fan_in))
    raise BadInput(f"unknown init mode {mode!r}: expected xavier_uniform, xavier_normal, kaiming_uniform "
                   "or kaiming_normal")


def _parameter(shape, init_mode, fan_in, fan_out, scale) -> nn.Parameter:
    return nn.Parameter(init_tensor(shape, init_mode, fan_in, fan_out) * float(scale))


# ---------------------------------------------------------------------------------------------
# Layers (weights in float32, cast to the input's dtype)


class Linear(nn.Module):
    """y = x W^T + b, with ``weight`` [out, in] and optional ``bias`` [out] cast to x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _parameter([out_features, in_features], init_mode, in_features, out_features, init_weight)
        self.register_parameter("bias", _parameter([out_features], init_mode, in_features, out_features, init_bias)
                                if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Conv2d(nn.Module):
    """A 2-D convolution with a square ``kernel`` (0 = no weights), optionally resampling by 2.

    Resampling uses the separable FIR ``resample_filter`` (normalised to unit gain; a buffer of shape
    [1, 1, k, k], present only when ``up`` or ``down``): with [1, 1], "down" is 2x2 average pooling
    and "up" 2x nearest neighbour, both applied before the kernel. ``fused_resample`` applies the
    kernel first when going down (after the filter when going up) with the padding combined, as
    NCSN++'s residual encoder does. The bias is added after the convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise BadInput("Conv2d cannot both up- and down-sample")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.register_parameter("weight", _parameter([out_channels, in_channels, kernel, kernel], init_mode, fan_in,
                                                     fan_out, init_weight) if kernel else None)
        self.register_parameter("bias", _parameter([out_channels], init_mode, fan_in, fan_out, init_bias)
                                if kernel and bias else None)
        taps = torch.tensor([float(v) for v in resample_filter], dtype=torch.float32)
        fir = (torch.outer(taps, taps) / taps.sum().square())[None, None]
        self.register_buffer("resample_filter", fir if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        c_in, c_out = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(c_out, 1, 1, 1), groups=c_out, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``num_groups = min(32, C // 4)`` groups (at least 4 channels a group)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos | sin] of the noise label (``layers.edm_positional_embedding``)."""

    def __init__(self, num_channels: int, max_positions: int = 10_000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return edm_positional_embedding(x, self.num_channels, self.max_positions, self.endpoint)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f) | sin(2 pi x f)] with f ~ N(0, scale^2) (NCSN++, Song et al.
    2021); the frequencies are the buffer ``freqs`` (stored in checkpoints)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.reshape(-1), (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over the pixels of a ``qkv`` map [N, 3C, H, W] -> [N, C, H, W].

    EDM's channel layout: the 3C channels are ordered (head, channel within the head, {q, k, v}) with
    q/k/v varying fastest. The logits q.k are scaled by 1/sqrt(C / heads), the softmax over keys runs
    in float32, and the result is laid out head-major again."""
    n, c3, h, w = qkv.shape
    per_head = c3 // (3 * num_heads)
    q, k, v = qkv.reshape(n * num_heads, per_head, 3, h * w).unbind(2)  # each [N*heads, C/heads, HW]
    k = k / math.sqrt(per_head)
    weights = torch.softmax(torch.matmul(q.float().transpose(1, 2), k.float()), dim=2).to(q.dtype)  # [., q, k]
    out = torch.matmul(v, weights.transpose(1, 2))  # [N*heads, C/heads, HW]
    return out.reshape(n, c3 // 3, h, w)


class UNetBlock(nn.Module):
    """EDM's residual block, with optional resampling and self-attention.

    h = conv0(SiLU(norm0(x))) (resampling inside conv0); then either (``adaptive_scale`` False, DDPM++)
    h = SiLU(norm1(h + affine(emb))) or (True, ADM) [scale | shift] = affine(emb),
    h = SiLU(shift + norm1(h) (1 + scale)); h = conv1(dropout(h)); x = (h + skip(x)) * skip_scale, where
    ``skip`` is a projection (1x1, or the bare resample when ``resample_proj`` is off and the width is
    kept) present only when the width or resolution changes. With attention (``num_heads`` > 0):
    x = (proj(qkv_attention(qkv(norm2(x)))) + x) * skip_scale.

    Adaptive-scale blocks hold a parameter-free ``film_site`` (identity) right before the final SiLU of
    the modulation, where SFD-v's step condition applies its second FiLM (``networks/adapters.py``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = {"init_weight": 0} if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                  else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = float(dropout), float(skip_scale), adaptive_scale
        resample = {"up": up, "down": down, "resample_filter": resample_filter}
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)
        if adaptive_scale:
            self.film_site = nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(self.film_site(torch.addcmul(shift, self.norm1(h), scale + 1)))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            a = qkv_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def _drop_labels(labels: torch.Tensor, p: float, training: bool, batch: int) -> torch.Tensor:
    """Label dropout during training (each sample's labels zeroed with probability ``p``)."""
    if not (training and p):
        return labels
    keep = torch.rand([batch, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _labels_or_zero(class_labels: torch.Tensor | None, label_dim: int, like: torch.Tensor) -> torch.Tensor:
    if class_labels is None:  # "no label": one all-zero row, broadcast over the batch
        return torch.zeros(1, label_dim, dtype=like.dtype, device=like.device)
    return class_labels.to(like.dtype)


def _run_decoder_block(block: nn.Module, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor):
    if x.shape[1] != block.in_channels:  # decoder blocks whose input is wider take the next skip
        x = torch.cat([x, skips.pop()], dim=1)
    return block(x, emb)


# ---------------------------------------------------------------------------------------------
# U-Nets


def _add_decoder_level(dec: nn.ModuleDict, res: int, lowest: bool, cout: int, width: int, skips: list[int],
                       num_blocks: int, attention_blocks: set[int], block: dict) -> int:
    """One decoder resolution of EDM's U-Nets, in execution order: at the lowest resolution the two
    middle blocks ``in0`` (always with attention) and ``in1``, elsewhere the upsampling block ``up``;
    then ``num_blocks + 1`` blocks that each take one encoder skip (popped from ``skips``) and output
    ``width`` channels, with attention in the blocks numbered in ``attention_blocks``. Returns the
    output width."""
    if lowest:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
    else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
    for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), width
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=idx in attention_blocks, **block)
    return cout


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ (Song et al. 2021, arXiv 2011.13456) as configured by EDM (Karras et al. 2022).

    ``forward(x, noise_labels, class_labels=None, augment_labels=None)``. The noise embedding
    (positional with ``endpoint`` or random Fourier) has its [cos | sin] halves swapped to [sin | cos],
    then emb = emb + map_label(labels sqrt(label_dim)) + map_augment(augment_labels) and two
    Linear + SiLU layers (``map_layer0``, ``map_layer1``). ``class_labels=None`` on a conditional net means
    an all-zero row; ``augment_labels=None`` skips ``map_augment`` (which has no bias, so zeros are the same).

    Blocks live in the ``ModuleDict``s ``enc`` and ``dec`` under EDM's names (``32x32_conv``,
    ``16x16_down``, ``32x32_block0``, ``8x8_in0``, ``16x16_up``, ``32x32_aux_norm``, ...) and run in that
    order. The encoder pushes every non-auxiliary output; a decoder block whose input is wider than the
    current width concatenates the next skip. Attention: every encoder block at ``attn_resolutions``,
    ``{lowest}_in0``, and the last decoder block of each attention resolution.

    ``encoder_type``: 'standard', 'skip' (auxiliary downsampled input added through 1x1 convs) or
    'residual' (NCSN++: the auxiliary path is a fused strided conv, averaged with the main path by
    1/sqrt(2)); ``decoder_type``: 'standard' or 'skip' (an auxiliary output at every resolution, upsampled
    and summed). The NCSN++ configuration (fourier, residual, ``channel_mult_noise=2``, resample filter
    [1,3,3,1]) builds with EDM's names and shapes, but its outputs have not been compared with EDM.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"init_mode": "xavier_uniform"}
        init_zero = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block = {"emb_channels": emb_channels, "num_heads": 1, "dropout": dropout, "skip_scale": math.sqrt(0.5),
                 "eps": 1e-6, "resample_filter": resample_filter, "resample_proj": True, "adaptive_scale": False,
                 "init": init, "init_zero": init_zero, "init_attn": init_attn}

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            # SongUNet: attention only in the last block of an attention resolution
            cout = _add_decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, model_channels * mult,
                                      skips, num_blocks, {num_blocks} if res in attn_resolutions else set(), block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # [cos | sin] -> [sin | cos]
        if self.map_label is not None:
            labels = _drop_labels(_labels_or_zero(class_labels, self.map_label.in_features, emb), self.label_dropout,
                                  self.training, x.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux, tmp = None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                x = _run_decoder_block(block, x, skips, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021, arXiv 2105.05233) as configured by EDM (Karras et al. 2022).

    ``forward(x, noise_labels, class_labels=None, augment_labels=None)``. emb = PositionalEmbedding
    (no endpoint, [cos | sin]) + map_augment(augment_labels); SiLU(map_layer0); map_layer1; + map_label
    (bias-free, unscaled); SiLU. Blocks use adaptive scale (FiLM from the embedding), GroupNorm eps
    1e-5, 64 channels per attention head, attention at every block of ``attn_resolutions`` and at
    ``{lowest}_in0``; kernel-0 skips (bare resampling) in the up/down blocks. Output:
    out_conv(SiLU(out_norm(x))).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        init = {"init_mode": "kaiming_uniform", "init_weight": math.sqrt(1 / 3), "init_bias": math.sqrt(1 / 3)}
        init_zero = {"init_mode": "kaiming_uniform", "init_weight": 0, "init_bias": 0}
        block = {"emb_channels": emb_channels, "channels_per_head": 64, "dropout": dropout, "init": init,
                 "init_zero": init_zero}

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            # ADM: attention in every block of an attention resolution
            cout = _add_decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, model_channels * mult,
                                      skips, num_blocks, set(range(num_blocks + 1)) if res in attn_resolutions
                                      else set(), block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = _drop_labels(_labels_or_zero(class_labels, self.map_label.in_features, emb), self.label_dropout,
                                  self.training, x.shape[0])
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            x = _run_decoder_block(block, x, skips, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BadInput(f"unknown {name} {value!r}: expected one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1)

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

# EDM's generate.py samples with sigma in [0.002, 80], clipped to the wrapper's own range.
SAMPLER_SIGMA_MIN = 0.002
SAMPLER_SIGMA_MAX = 80.0


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a constructor argument (numpy scalars -> Python numbers, tuples -> lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if not isinstance(value, (bool, int, float, str, type(None))) and callable(getattr(value, "item", None)):
        return value.item()
    return value


class _Precond(nn.Module):
    """What the three wrappers share: the U-Net as ``model``, labels, precision, the sigma range.

    ``sigma_min`` / ``sigma_max`` are the range our solvers sample in: EDM's sampler defaults (0.002, 80)
    clipped to the wrapper's own range, exactly as EDM's generate.py does. The wrapper's own range as
    EDM stores it (EDMPrecond: 0 and inf) is ``precond_sigma_min`` / ``precond_sigma_max``.
    ``init_kwargs`` are the constructor's keyword arguments (JSON-friendly), so that
    ``build_precond(type(w).__name__, w.init_kwargs)`` rebuilds the same architecture.

    ``adapters.raw_network`` finds the U-Net through ``network_attribute``."""

    network_attribute = "model"

    def __init__(self, init_kwargs: dict, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool,
                 model_type: str, model_kwargs: dict, precond_sigma_min: float, precond_sigma_max: float):
        super().__init__()
        _check_choice("model_type", model_type, tuple(MODEL_TYPES))
        self.init_kwargs = _plain(init_kwargs)
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim, self.use_fp16 = int(label_dim), bool(use_fp16)
        self.precond_sigma_min, self.precond_sigma_max = float(precond_sigma_min), float(precond_sigma_max)
        self.sigma_min = max(SAMPLER_SIGMA_MIN, self.precond_sigma_min)
        self.sigma_max = min(SAMPLER_SIGMA_MAX, self.precond_sigma_max)
        self.model = MODEL_TYPES[model_type](img_resolution=self.img_resolution, in_channels=self.img_channels,
                                             out_channels=self.img_channels, label_dim=self.label_dim,
                                             **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [N, 1, 1, 1] (float32)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **cond: Any) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), computed in float32 (F in float16 when
        ``use_fp16``, x is on CUDA and not ``force_fp32``), returned in x's dtype. ``cond`` (e.g.
        ``augment_labels``, ``step_condition``) is passed to the U-Net."""
        dtype_in = x.dtype
        x = x.to(torch.float32)
        sigma = batch_sigma(sigma, x).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros(1, self.label_dim, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f_x = self.model((c_in * x).to(torch.float16 if half else torch.float32), c_noise.flatten(),
                         class_labels=class_labels, **cond)
        return (c_skip * x + c_out * f_x.to(torch.float32)).to(dtype_in)


class EDMPrecond(_Precond):
    """EDM's preconditioning (Karras et al. 2022, Table 1): c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sd^2 + sigma^2), c_noise = ln(sigma) / 4,
    the same formulas as ``sfdbench.diffusion.denoiser.EDMPrecond`` (which wraps any network as ``net``)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        init_kwargs = {"img_resolution": img_resolution, "img_channels": img_channels, "label_dim": label_dim,
                       "use_fp16": use_fp16, "sigma_min": sigma_min, "sigma_max": sigma_max,
                       "sigma_data": sigma_data, "model_type": model_type, **model_kwargs}
        super().__init__(init_kwargs, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         sigma_min, sigma_max)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """The variance-preserving preconditioning of Song et al. 2021 in EDM's form (Karras et al. 2022,
    Table 1): c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma) with
    t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d, the inverse of
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1). Its own range is [sigma(epsilon_t), sigma(1)]."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        init_kwargs = {"img_resolution": img_resolution, "img_channels": img_channels, "label_dim": label_dim,
                       "use_fp16": use_fp16, "beta_d": beta_d, "beta_min": beta_min, "M": M, "epsilon_t": epsilon_t,
                       "model_type": model_type, **model_kwargs}
        self_sigma = _vp_sigma(float(beta_d), float(beta_min))
        super().__init__(init_kwargs, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         self_sigma(float(epsilon_t)), self_sigma(1.0))
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)

    def coefficients(self, sigma):
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * t


def _vp_sigma(beta_d: float, beta_min: float):
    return lambda t: math.sqrt(math.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


class VEPrecond(_Precond):
    """The variance-exploding preconditioning of Song et al. 2021 in EDM's form (Karras et al. 2022,
    Table 1): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2); own range [0.02, 100]."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        init_kwargs = {"img_resolution": img_resolution, "img_channels": img_channels, "label_dim": label_dim,
                       "use_fp16": use_fp16, "sigma_min": sigma_min, "sigma_max": sigma_max,
                       "model_type": model_type, **model_kwargs}
        super().__init__(init_kwargs, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         sigma_min, sigma_max)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


PRECOND_CLASSES: dict[str, type[_Precond]] = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond,
                                              "VEPrecond": VEPrecond}

_FROM_WRAPPER = ("img_resolution", "in_channels", "out_channels", "label_dim")


def _keyword_names(cls: type) -> set[str]:
    return {name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_precond(precond_class: str, init_kwargs: Mapping[str, Any]) -> nn.Module:
    """EDM's wrapper ``precond_class`` ('EDMPrecond' | 'VPPrecond' | 'VEPrecond') with its U-Net, built from
    the keyword arguments EDM stores with it (``_init_kwargs``; numpy scalars are fine), randomly
    initialised. Unknown classes, model types or arguments are refused with one line (BadInput)."""
    if precond_class not in PRECOND_CLASSES:
        raise BadInput(f"unknown EDM preconditioning class {precond_class!r}: expected one of "
                       f"{', '.join(PRECOND_CLASSES)}")
    if not isinstance(init_kwargs, Mapping) or not all(isinstance(k, str) for k in init_kwargs):
        raise BadInput(f"{precond_class} arguments must be a dict of keyword arguments, "
                       f"got {type(init_kwargs).__name__}")
    cls = PRECOND_CLASSES[precond_class]
    kwargs = copy.deepcopy(dict(init_kwargs))
    default_model = inspect.signature(cls.__init__).parameters["model_type"].default
    model_type = kwargs.get("model_type", default_model)
    if model_type not in MODEL_TYPES:
        raise BadInput(f"unknown EDM model_type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    allowed = _keyword_names(cls) | (_keyword_names(MODEL_TYPES[model_type]) - set(_FROM_WRAPPER))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise BadInput(f"unknown {precond_class}/{model_type} arguments: {', '.join(unknown)}")
    missing = [k for k in ("img_resolution", "img_channels") if k not in kwargs]
    if missing:
        raise BadInput(f"{precond_class} needs {', '.join(missing)}")
    try:
        return cls(**_plain(kwargs))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"cannot build {precond_class}/{model_type} from {kwargs}: {exc}") from exc


CIFAR10_DDPMPP_CONFIG: dict[str, Any] = {
    "precond_class": "EDMPrecond",
    "init_kwargs": {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
                    "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
                    "model_channels": 128, "channel_mult": [2, 2, 2], "augment_dim": 9, "dropout": 0.13,
                    "use_fp16": False, "img_resolution": 32, "img_channels": 3, "label_dim": 0},
}
"""``edm-cifar10-32x32-uncond-vp.pkl`` (SFD's CIFAR-10 teacher): wrapper class and stored arguments;
``build_precond(**CIFAR10_DDPMPP_CONFIG)`` builds it (55,733,891 parameters)."""

IMAGENET64_ADM_CONFIG: dict[str, Any] = {
    "precond_class": "EDMPrecond",
    "init_kwargs": {"model_type": "DhariwalUNet", "model_channels": 192, "channel_mult": [1, 2, 3, 4],
                    "dropout": 0.1, "use_fp16": True, "img_resolution": 64, "img_channels": 3, "label_dim": 1000},
}
"""``edm-imagenet-64x64-cond-adm.pkl`` (SFD's ImageNet-64 teacher); 295,899,267 parameters."""
