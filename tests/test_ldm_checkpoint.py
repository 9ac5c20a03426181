"""`sfdbench teacher convert model.ckpt DIR`: a CompVis-layout LatentDiffusion checkpoint (written here from tiny
random diffusers models through the inverse name mapping, which this test spells out block by block) becomes a
diffusers folder whose U-Net and VQ first stage compute exactly what the source models compute; the EMA copy is
the one used; a hostile global in the checkpoint is never called.

What this does not show: that LDM's own ``openaimodel.UNetModel`` / taming ``VQModel`` compute what diffusers'
classes compute with these weights (LDM's code is not available here); the layouts follow diffusers' own
conversion script."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from sfdbench.cli import main
from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.errors import BadInput
from sfdbench.networks.ldm_checkpoint import convert_ldm, read_checkpoint

HEAD = 16


def cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


class Hostile:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_models(seed: int = 0):
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=HEAD, norm_num_groups=32)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=32, scaling_factor=1.0)
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight clearly non-trivial
        for p in [*unet.parameters(), *vq.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval(), vq.eval()


# ------------------------------------------------------------------ the inverse mapping (diffusers -> CompVis)

def ldm_resnet(out, s, sd, d):
    for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                         ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        for p in ("weight", "bias"):
            if f"{d}.{ours}.{p}" in sd:
                out[f"{s}.{theirs}.{p}"] = sd[f"{d}.{ours}.{p}"]


def ldm_attention(out, s, sd, d):
    q, k, v = (sd[f"{d}.{n}.weight"] for n in ("to_q", "to_k", "to_v"))
    c = q.shape[0]
    heads = c // HEAD
    # legacy QKV order: channel h*3*hc + part*hc + i holds head h, part (q, k, v), channel i
    w = torch.stack([t.reshape(heads, HEAD, c) for t in (q, k, v)], dim=1).reshape(3 * c, c, 1)
    b = torch.stack([sd[f"{d}.{n}.bias"].reshape(heads, HEAD) for n in ("to_q", "to_k", "to_v")], 1).reshape(3 * c)
    out[f"{s}.qkv.weight"], out[f"{s}.qkv.bias"] = w, b
    out[f"{s}.proj_out.weight"] = sd[f"{d}.to_out.0.weight"].reshape(c, c, 1)
    out[f"{s}.proj_out.bias"] = sd[f"{d}.to_out.0.bias"]
    out[f"{s}.norm.weight"], out[f"{s}.norm.bias"] = sd[f"{d}.group_norm.weight"], sd[f"{d}.group_norm.bias"]


def compvis_unet(unet) -> dict:
    sd, out = unet.state_dict(), {}
    for theirs, ours in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                         ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = sd[f"{ours}.weight"], sd[f"{ours}.bias"]
    # input_blocks: 1 = level-0 ResBlock, 2 = Downsample, 3 = level-1 ResBlock + attention
    ldm_resnet(out, "input_blocks.1.0", sd, "down_blocks.0.resnets.0")
    out["input_blocks.2.0.op.weight"] = sd["down_blocks.0.downsamplers.0.conv.weight"]
    out["input_blocks.2.0.op.bias"] = sd["down_blocks.0.downsamplers.0.conv.bias"]
    ldm_resnet(out, "input_blocks.3.0", sd, "down_blocks.1.resnets.0")
    ldm_attention(out, "input_blocks.3.1", sd, "down_blocks.1.attentions.0")
    ldm_resnet(out, "middle_block.0", sd, "mid_block.resnets.0")
    ldm_attention(out, "middle_block.1", sd, "mid_block.attentions.0")
    ldm_resnet(out, "middle_block.2", sd, "mid_block.resnets.1")
    # output_blocks 0, 1: level 1 (attention; block 1 also upsamples), 2, 3: level 0
    for o, j in ((0, 0), (1, 1)):
        ldm_resnet(out, f"output_blocks.{o}.0", sd, f"up_blocks.0.resnets.{j}")
        ldm_attention(out, f"output_blocks.{o}.1", sd, f"up_blocks.0.attentions.{j}")
    out["output_blocks.1.2.conv.weight"] = sd["up_blocks.0.upsamplers.0.conv.weight"]
    out["output_blocks.1.2.conv.bias"] = sd["up_blocks.0.upsamplers.0.conv.bias"]
    for o, j in ((2, 0), (3, 1)):
        ldm_resnet(out, f"output_blocks.{o}.0", sd, f"up_blocks.1.resnets.{j}")
    assert len(out) == len(sd) + sum(1 for k in sd if ".to_k." in k or ".to_v." in k) * -1
    return out


def compvis_vq(vq) -> dict:
    sd, out = vq.state_dict(), {}

    def res(s, d):
        for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                             ("conv_shortcut", "nin_shortcut")):
            for p in ("weight", "bias"):
                if f"{d}.{ours}.{p}" in sd:
                    out[f"{s}.{theirs}.{p}"] = sd[f"{d}.{ours}.{p}"]

    def attn(s, d):
        for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            w = sd[f"{d}.{ours}.weight"]
            out[f"{s}.{theirs}.weight"], out[f"{s}.{theirs}.bias"] = w[:, :, None, None], sd[f"{d}.{ours}.bias"]
        out[f"{s}.norm.weight"], out[f"{s}.norm.bias"] = sd[f"{d}.group_norm.weight"], sd[f"{d}.group_norm.bias"]

    for part in ("encoder", "decoder"):
        for theirs, ours in (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
            out[f"{part}.{theirs}.weight"] = sd[f"{part}.{ours}.weight"]
            out[f"{part}.{theirs}.bias"] = sd[f"{part}.{ours}.bias"]
        res(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        res(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
    for i in range(2):
        res(f"encoder.down.{i}.block.0", f"encoder.down_blocks.{i}.resnets.0")
        for j in range(2):  # taming's decoder level i is diffusers' up block 1 - i
            res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{1 - i}.resnets.{j}")
    out["encoder.down.0.downsample.conv.weight"] = sd["encoder.down_blocks.0.downsamplers.0.conv.weight"]
    out["encoder.down.0.downsample.conv.bias"] = sd["encoder.down_blocks.0.downsamplers.0.conv.bias"]
    out["decoder.up.1.upsample.conv.weight"] = sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    out["decoder.up.1.upsample.conv.bias"] = sd["decoder.up_blocks.0.upsamplers.0.conv.bias"]
    for name in ("quant_conv", "post_quant_conv"):
        out[f"{name}.weight"], out[f"{name}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
    out["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    return out


@pytest.fixture
def checkpoint(tmp_path):
    """model.ckpt: raw U-Net = seed 1, EMA U-Net = seed 0 (what the conversion must pick), the VQ stage, LDM's
    betas, and Lightning-style extras including a hostile object."""
    ema_unet, vq = tiny_models(0)
    raw_unet, _ = tiny_models(1)
    sd = {f"model.diffusion_model.{k}": v for k, v in compvis_unet(raw_unet).items()}
    sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in compvis_unet(ema_unet).items()})
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    sd.update({f"first_stage_model.{k}": v for k, v in compvis_vq(vq).items()})
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "epoch": 1, "callbacks": {torch.nn.Linear: {"best": torch.tensor(1.0)}},
                "hyper_parameters": Hostile(marker)}, path)
    return path, ema_unet, raw_unet, vq, marker


def test_conversion_computes_what_the_source_models_compute(checkpoint, tmp_path, monkeypatch, capsys):
    from sfdbench.suites.latent import lsun_bedroom

    path, ema_unet, raw_unet, vq, marker = checkpoint
    out = tmp_path / "converted"
    assert cli(monkeypatch, "teacher", "convert", str(path), str(out), "--head-channels", str(HEAD),
               "--sample-size", "8") == 0
    assert not marker.exists()  # the hostile global was never called
    record = (out / "conversion.json").read_text()
    assert "posix.system" in record or "os.system" in record
    suite = lsun_bedroom((3, 8, 8), 16)
    teacher = suite.load_teacher(out)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        got = teacher.net.unet(x, t).sample
        want = ema_unet(x, t).sample
        raw = raw_unet(x, t).sample
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert (got - raw).abs().max() > 1e-3  # the EMA copy, not the raw weights
        assert torch.allclose(suite.decode(x), vq.decode(x).sample, rtol=1e-5, atol=1e-6)
    # the noise table: LDM's square-root spacing recognised, so the suite's float64 table is exact
    assert torch.allclose(suite.discrete_vp.alphas_cumprod, DiscreteVP.ldm().alphas_cumprod, rtol=1e-12)
    assert teacher.sigma_max == pytest.approx(DiscreteVP.ldm().sigma_range()[1])


def test_no_ema_and_wrong_head_width(checkpoint, tmp_path):
    path, ema_unet, raw_unet, _, _ = checkpoint
    convert_ldm(path, tmp_path / "raw", use_ema=False, head_channels=HEAD, sample_size=8)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(tmp_path / "raw" / "unet")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([100.0])
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, raw_unet(x, t).sample, rtol=1e-5, atol=1e-6)
        # a wrong head width converts (shapes cannot tell) but computes something else: the flag matters
        convert_ldm(path, tmp_path / "wrong", head_channels=HEAD * 2, sample_size=8)
        wrong = UNet2DModel.from_pretrained(tmp_path / "wrong" / "unet")
        assert (wrong(x, t).sample - ema_unet(x, t).sample).abs().max() > 1e-4


def test_refusals(tmp_path, monkeypatch, capsys):
    torch.save({"state_dict": {"x": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(BadInput, match="not a CompVis LatentDiffusion"):
        convert_ldm(tmp_path / "other.ckpt", tmp_path / "o")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    assert cli(monkeypatch, "teacher", "convert", str(tmp_path / "junk.ckpt"), str(tmp_path / "j")) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    tensors, inert = read_checkpoint(tmp_path / "other.ckpt")
    assert list(tensors) == ["x"] and inert == []
