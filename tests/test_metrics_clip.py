"""CLIP score with a small *untrained* open_clip model (no weights offline) against the formula
written out by hand from the same model's embeddings."""

import numpy as np
import pytest
import torch
from PIL import Image

from sfdbench.errors import BadInput
from sfdbench.metrics.clip_score import ClipModel, clip_cosines, clip_score, load_clip
from sfdbench.metrics.evaluate import compute_metrics

MODEL = "ViT-S-32"  # ~63M parameters, well under a second per batch on CPU
PROMPTS = ["a photo of a cat", "a red square", "two dogs on a beach", "handwritten digit seven", "noise", "sky"]


@pytest.fixture(scope="module")
def clip():
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer(MODEL), MODEL, None)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (len(PROMPTS), 3, 32, 32), dtype=torch.uint8, generator=g)


def hand_cosines(clip, images, prompts):
    with torch.no_grad():
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        e_img = clip.model.encode_image(torch.stack([clip.preprocess(p) for p in pil])).double().numpy()
        e_txt = clip.model.encode_text(clip.tokenizer(prompts)).double().numpy()
    e_img /= np.linalg.norm(e_img, axis=1, keepdims=True)
    e_txt /= np.linalg.norm(e_txt, axis=1, keepdims=True)
    return (e_img * e_txt).sum(1)


def test_clip_score_equals_hand_formula(clip, images):
    cos = hand_cosines(clip, images, PROMPTS)
    assert np.allclose(clip_cosines(images, PROMPTS, clip, batch_size=4).numpy(), cos, atol=1e-6)
    assert clip_score(images, PROMPTS, clip) == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-4)
    assert clip_score(images, PROMPTS, clip, clip_at_zero=False) == pytest.approx(np.mean(100 * cos), abs=1e-4)
    via_entry_point = compute_metrics(images, None, None, ("clip_score",), prompts=PROMPTS, clip=clip)
    assert via_entry_point == {"clip_score": pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-4)}


def test_clipping_at_zero_only_raises_negative_pairs(clip, images):
    cos = hand_cosines(clip, images, PROMPTS)
    clipped, raw = clip_score(images, PROMPTS, clip), clip_score(images, PROMPTS, clip, clip_at_zero=False)
    assert clipped >= raw and (clipped > raw) == bool((cos < 0).any())
    assert clip.protocol(True)["clip_score_formula"] == "mean 100*max(cos,0)"


def test_grayscale_images_are_accepted(clip, images):
    gray = images[:, :1]
    assert np.allclose(clip_cosines(gray, PROMPTS, clip).numpy(), hand_cosines(clip, gray.expand(-1, 3, -1, -1),
                                                                                PROMPTS), atol=1e-6)


def test_load_clip_from_a_local_weights_file(clip, images, tmp_path):
    path = tmp_path / "vit-s-32.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(MODEL, str(path))
    assert loaded.weights_file == str(path)
    assert torch.allclose(clip_cosines(images, PROMPTS, loaded), clip_cosines(images, PROMPTS, clip), atol=1e-6)


def test_prompt_count_must_match(clip, images):
    with pytest.raises(BadInput, match="one prompt per image"):
        clip_cosines(images, PROMPTS[:2], clip)
    with pytest.raises(BadInput, match=r"one prompt per image \(6\), got 2"):
        compute_metrics(images, None, None, ("clip_score",), prompts=PROMPTS[:2], clip=clip)
