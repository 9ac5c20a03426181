"""Tiny random diffusers pipelines for the latent suites' tests, built from configs here and written with
``save_pretrained`` (nothing downloaded):

* LDM: ``UNet2DModel`` (3x8x8 latents) + ``VQModel`` (f2: 16x16 images) + ``DDIMScheduler`` with the LDM's table
  (scaled_linear 0.0015 -> 0.0195);
* SD: ``UNet2DConditionModel`` (4x8x8 latents, cross-attention 16) + ``AutoencoderKL`` (f2) + a tiny
  ``CLIPTextModel`` and a byte-level ``CLIPTokenizer`` (256 byte symbols, no merges, 16 tokens) +
  ``DDIMScheduler`` with SD's table (scaled_linear 0.00085 -> 0.012);
* a tiny open_clip CLIP (random weights, open_clip's own tokenizer) for the CLIP score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LDM_LATENT, LDM_IMAGE = (3, 8, 8), 16
SD_LATENT, SD_IMAGE = (4, 8, 8), 16
PROMPTS = ["a photo of a cat", "a red bus on a street", "two dogs on a beach", "a bowl of fruit", "an empty room",
           "a man riding a horse"]


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> unicode table, written out."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(work: Path):
    from transformers import CLIPTokenizer

    work.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (work / "vocab.json").write_text(json.dumps(vocab))
    (work / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=16)


def write_ldm(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    quiet()
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=3,
                 num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=4, sample_size=16, scaling_factor=1.0)
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vq.save_pretrained(folder / "vqvae")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline"}))
    return folder


def write_sd(folder: Path, seed: int = 0, latent: int = 8, vae_blocks: int = 2) -> Path:
    """The tiny SD pipeline: latents 4 x latent x latent, images of latent * 2^(vae_blocks - 1) pixels."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(8,) * vae_blocks,
                        latent_channels=4, norm_num_groups=4, sample_size=latent * 2 ** (vae_blocks - 1))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def tiny_clip():
    """A random open_clip CLIP (ViT 32px, 1 layer) with open_clip's tokenizer and validation transform."""
    import open_clip

    from sfdbench.metrics.clip_score import ClipModel

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 16, "width": 16, "layers": 1,
                                                     "head_width": 8},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1})
    preprocess = open_clip.image_transform(32, is_train=False)
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32"), "tiny-test", None)
