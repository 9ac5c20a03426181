"""The real suites' metrics, proven offline with stand-in weights (tests/standin_weights.py).

* Inception FID (torch-fidelity ``inception-v3-compat``, EDM's protocol): ours equals
  ``torch_fidelity.calculate_metrics`` on the same uint8 images; an EDM-style mu/sigma npz gives FID
  and reports PRDC/KID unavailable; a reference built from images gives PRDC equal to ``prdc``.
* FD-DINOv2: Meta's checkpoint layout loads through timm's conversion into our extractor (full-size
  layout on the meta device, a 2-block stand-in of real width end to end), and its features equal an
  independent transcription of Meta's forward with EDM2's preprocessing.
* Missing weights are ``MissingAsset`` (exit 3) naming the download command; wrong files ``BadInput``.

On one CPU thread Inception at 299x299 costs ~0.2 s per image and one 2048-d FID ~2 s (torch-fidelity's
eigvals), hence the small image sets and few FIDs.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from standin_weights import (
    dinov2_standin_state_dict,
    meta_dinov2_layout,
    write_standin_dinov2,
    write_standin_inception,
)

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.metrics import dinov2 as dinov2_module
from sfdbench.metrics import features as features_module
from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics
from sfdbench.metrics.fid import TensorImages
from sfdbench.metrics.reference import ReferenceStats, cache_path, reference_from_images

N_GENERATED, N_REFERENCE = 7, 8  # the prdc package with k=5 needs 7


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 [n, 3, size, size]: upsampled low-resolution noise (image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """sfdbench's and torch hub's caches point into an empty home; downloads fail loudly."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "SFDBENCH_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load", no_download)
    return home


# ----------------------------------------------------------------------------- Inception FID


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """Stand-in weights, the feature space (features memoised per tensor: every path below runs the
    real extraction once per image set), the two image sets and torch-fidelity's own numbers."""
    import torch_fidelity

    weights = write_standin_inception(tmp_path_factory.mktemp("inception-weights"))
    space = features_module.inception_feature_space(weights)
    extract, memo = space.features, {}

    def features(images, device="cpu"):
        key = (images.data_ptr(), tuple(images.shape))
        if key not in memo:
            memo[key] = extract(images, device)
        return memo[key]

    space.features = features
    generated, reference_images = smooth_images(N_GENERATED, 1), smooth_images(N_REFERENCE, 2)
    tf = torch_fidelity.calculate_metrics(
        input1=TensorImages(generated), input2=TensorImages(reference_images), fid=True, kid=True,
        kid_subset_size=N_GENERATED, rng_seed=0, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    ref = reference_from_images(space, reference_images, cache=False)
    return {"weights": weights, "space": space, "generated": generated, "reference_images": reference_images,
            "tf": tf, "ref": ref}


def test_standin_inception_has_the_real_file_structure(inception):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    sd = torch.load(inception["weights"], weights_only=True)
    assert len(sd) == 566 and sd["fc.weight"].shape == (1008, 2048)
    # torch-fidelity's own constructor loads it strictly (the way it loads the real file)
    net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(inception["weights"]))
    assert set(net.state_dict()) == set(sd)
    feats = inception["space"].features(inception["generated"])
    assert feats.shape == (N_GENERATED, 2048) and feats.dtype == torch.float64
    assert feats.std(0).mean() > 1e-3 * feats.abs().mean()  # not degenerate: features differ across images


def test_fid_equals_torch_fidelity(inception):
    space, ref = inception["space"], inception["ref"]
    out = compute_metrics(inception["generated"], ref, space, ("fid", "kid"))
    tf = inception["tf"]
    assert out["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    # KID is a small difference of large kernel means: torch-fidelity's float32 features vs our float64
    assert out["kid"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-3)
    assert ref.meta["feature_extractor"] == "inception-v3-compat" and ref.meta["n_reference"] == N_REFERENCE
    assert out["fid"] > 0


def test_edm_style_reference_gives_fid_and_no_prdc(inception, tmp_path):
    ref = inception["ref"]
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=ref.mu, sigma=ref.sigma)  # what EDM's fid.py ref writes
    out = compute_metrics(inception["generated"], path, inception["space"], IMAGE_METRICS)
    assert out["fid"] == pytest.approx(inception["tf"]["frechet_inception_distance"], rel=1e-6)
    for m in ("kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert out[m] is None
    assert "unavailable" in out["notes"] and "holds only mu/sigma" in out["notes"] and str(path) in out["notes"]


def test_reference_from_images_gives_prdc_equal_to_the_prdc_package(inception):
    from prdc import compute_prdc

    space, ref = inception["space"], inception["ref"]
    prdc_metrics = ("kid", "precision", "recall", "density", "coverage")  # no FID: 2 s of 2048-d eigvals on CPU
    out = compute_metrics(inception["generated"], ref, space, prdc_metrics)
    assert "notes" not in out and ref.features.shape == (N_REFERENCE, 2048) and out["kid"] is not None
    expected = compute_prdc(real_features=ref.features.double().numpy(),
                            fake_features=space.features(inception["generated"]).numpy(), nearest_k=5)
    for m in ("precision", "recall", "density", "coverage"):
        assert out[m] == pytest.approx(float(expected[m]), abs=1e-12), m


# ----------------------------------------------------------------------------- reference_from_images


@pytest.fixture(scope="module")
def digits():
    """The shipped digits feature space (cheap) and 12 digit images, for the image-source plumbing."""
    from sfdbench.metrics import digits_features
    from sfdbench.metrics.images import to_uint8
    from sfdbench.suites.digits import FEATURE_WEIGHTS, load_digits

    return digits_features.feature_space(FEATURE_WEIGHTS), to_uint8(load_digits("train")[0][:12])


def write_pngs(directory, images_u8):
    import PIL.Image

    for i, img in enumerate(images_u8):
        sub = directory / f"{i - i % 5:06d}"  # EDM --subdirs style
        sub.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        PIL.Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(sub / f"{i:06d}.png")


def test_reference_from_png_dir_npz_and_tensor_agree(digits, tmp_path):
    space, images = digits
    write_pngs(tmp_path / "pngs", images)
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    np.savez(tmp_path / "nhwc.npz", images=images.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "arr0.npz", images.permute(0, 2, 3, 1).numpy())  # arr_0, ADM/EDM batches
    base = reference_from_images(space, images, cache=False)
    for source in ("pngs", "nchw.npz", "nhwc.npz", "arr0.npz"):
        ref = reference_from_images(space, tmp_path / source, cache=False)
        assert np.array_equal(ref.mu, base.mu) and np.array_equal(ref.sigma, base.sigma), source
        assert torch.equal(ref.features, base.features) and ref.meta["reference"].startswith("images-"), source


def test_reference_from_images_is_cached_and_keyed_by_content(digits, tmp_path, monkeypatch):
    import sfdbench.metrics.reference as reference_module

    space, images = digits
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "cache"))
    write_pngs(tmp_path / "pngs", images)
    ref = reference_from_images(space, tmp_path / "pngs")
    path = cache_path(space, ref.meta["reference"], tmp_path / "cache")
    assert path.is_file() and ref.source == str(path)
    reference_module._MEMORY.clear()
    monkeypatch.setattr(reference_module, "load_image_dir", lambda d: pytest.fail("recomputed despite the cache"))
    again = reference_from_images(space, tmp_path / "pngs")
    assert np.array_equal(again.mu, ref.mu) and again.source == str(path)
    monkeypatch.undo()
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "cache"))
    write_pngs(tmp_path / "pngs", images.flip(0))  # same files, new content: a new set
    changed = reference_from_images(space, tmp_path / "pngs")
    assert changed.meta["reference"] != ref.meta["reference"]
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 2


def test_bad_reference_images_are_one_line_bad_input(digits, tmp_path):
    import PIL.Image

    space, images = digits
    np.savez(tmp_path / "nokey.npz", x=images.numpy())
    np.savez(tmp_path / "float.npz", images=images.float().numpy())
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "mixed").mkdir()
    PIL.Image.new("L", (8, 8)).save(tmp_path / "mixed" / "a.png")
    PIL.Image.new("L", (9, 8)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "rgba").mkdir()
    for name in ("a.png", "b.png"):
        PIL.Image.new("RGBA", (8, 8)).save(tmp_path / "rgba" / name)
    cases = {"nokey.npz": "expected `images`", "float.npz": "must be uint8", "empty": "hold 0 .png",
             "notes.txt": "not an .npz", "mixed": "must share size", "rgba": "mode RGBA",
             "missing": "not a directory or an .npz"}
    for name, message in cases.items():
        with pytest.raises(BadInput, match=message) as err:
            reference_from_images(space, tmp_path / name, cache=False)
        assert "\n" not in str(err.value) and err.value.exit_code == 2
    with pytest.raises(BadInput, match="channels"):  # RGB images for a 1-channel extractor
        reference_from_images(space, images.expand(-1, 3, -1, -1).contiguous(), cache=False)


# ----------------------------------------------------------------------------- DINOv2


def test_official_layout_from_timm_matches_metas_source():
    layout = dinov2_module.official_layout()
    assert layout == meta_dinov2_layout()  # timm-derived == written out from Meta's source
    assert len(layout) == 24 * 14 + 7 and layout["pos_embed"] == (1, 1370, 1024)


def test_full_size_checkpoint_loads_strictly_on_the_meta_device():
    sd = dinov2_standin_state_dict(device="meta")
    model = dinov2_module.load_dinov2(sd, device="meta")  # check_layout + timm conversion + strict load
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 1024) and len(model.blocks) == 24
    assert model.num_classes == 0 and model.global_pool == "token"
    assert "mask_token" in sd  # the official file has it; timm's conversion drops it (masked training only)


@pytest.fixture(scope="module")
def dinov2_small(tmp_path_factory):
    """A 2-block stand-in of real width (1024) in Meta's layout: ~100 MB, a forward in well under 1 s."""
    arch = dinov2_module.ViTArch(depth=2)
    path = write_standin_dinov2(tmp_path_factory.mktemp("dinov2"), depth=2)
    return arch, path, dinov2_module.dinov2_feature_space(path, arch=arch)


def meta_reference_features(sd: dict, x_u8: torch.Tensor, num_heads: int = 16, patch: int = 14) -> torch.Tensor:
    """Independent transcription: EDM2's ``DINOv2Detector.__call__`` (resize_mode='torch') followed by
    Meta's ``DinoVisionTransformer.forward`` (interpolate_pos_encoding with offset 0.1, Attention with
    explicit softmax, LayerScale, Mlp), eval mode, float32."""
    x = F.interpolate(x_u8.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)
    x = x / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
    b, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    pos = sd["pos_embed"].float()
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    dim = t.shape[-1]
    w0, h0 = w // patch, h // patch
    pp = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                       scale_factor=(float(w0 + 0.1) / m, float(h0 + 0.1) / m))
    t = t + torch.cat([pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(t, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"])
        qkv = qkv.reshape(b, -1, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // num_heads) ** -0.5, qkv[1], qkv[2]
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, -1, dim)
        t = t + p["ls1.gamma"] * F.linear(y, p["attn.proj.weight"], p["attn.proj.bias"])
        y = F.layer_norm(t, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                     p["mlp.fc2.bias"])
        t = t + p["ls2.gamma"] * y
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def test_dinov2_features_equal_metas_forward_with_edm2_preprocessing(dinov2_small):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    arch, path, space = dinov2_small
    assert (space.name, space.layer, space.dim) == ("sfdbench-dinov2-vit-l-14", "dinov2", 1024)
    images = smooth_images(3, 5, size=40)
    feats = space.features(images)
    assert feats.shape == (3, 1024) and feats.dtype == torch.float64
    assert torch.equal(space.features(images), feats)  # deterministic
    assert FEATURE_EXTRACTORS_REGISTRY[space.name] is dinov2_module.Dinov2FeatureExtractor
    sd = torch.load(path, weights_only=True)
    expected = meta_reference_features(sd, images).double()
    assert torch.allclose(feats, expected, rtol=1e-5, atol=1e-5), (feats - expected).abs().max()
    # timm's own pos_embed resampling (size=16, antialias) is not DINOv2's: the override matters
    from timm.models.vision_transformer import checkpoint_filter_fn

    timm_pos = checkpoint_filter_fn(dict(sd), dinov2_module._timm_model(arch, 224))["pos_embed"]
    assert (timm_pos - dinov2_module.dinov2_pos_embed(sd["pos_embed"], 16)).abs().max() > 1e-2
    # the registered extractor runs inside torch-fidelity's own metric loop, too
    tf = torch_fidelity.calculate_metrics(
        input1=TensorImages(images), input2=TensorImages(images.flip(0)), fid=True, feature_extractor=space.name,
        feature_extractor_weights_path=str(path), sfdbench_dinov2_arch=arch, cuda=False, cache=False,
        save_cpu_ram=True, verbose=False)
    ref = ReferenceStats.from_features(feats, space.protocol())
    ours = compute_metrics(images.flip(0), ref, space, ("fid",))["fid"]
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-5, abs=1e-6)


def test_missing_weights_are_missing_asset_with_the_download_command(empty_caches):
    with pytest.raises(MissingAsset) as err:
        dinov2_module.dinov2_feature_space()
    msg = str(err.value)
    target = empty_caches / ".cache" / "sfdbench" / "assets" / "dinov2_vitl14_pretrain.pth"
    assert "run `sfdbench assets download dinov2-vitl14`" in msg and str(target) in msg
    assert dinov2_module.DINOV2_URL in msg and err.value.exit_code == 3 and "\n" not in msg
    with pytest.raises(MissingAsset) as err:
        features_module.inception_feature_space()
    msg = str(err.value)
    assert "run `sfdbench assets download inception-v3-compat`" in msg and err.value.exit_code == 3
    assert str(empty_caches / ".cache/sfdbench/assets/weights-inception-2015-12-05-6726825d.pth") in msg


def test_inception_lookup_prefers_the_sfdbench_asset(empty_caches):
    asset, hub = features_module.inception_asset_path(), features_module.inception_weights_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"hub copy")
    with pytest.raises(BadInput, match=f"{hub} are corrupt"):
        features_module.inception_feature_space()
    asset.parent.mkdir(parents=True)
    asset.write_bytes(b"asset copy")
    with pytest.raises(BadInput, match=f"{asset} are corrupt.*sfdbench assets download inception-v3-compat"):
        features_module.inception_feature_space()


def test_wrong_dinov2_files_are_bad_input(dinov2_small, tmp_path):
    _, small, _ = dinov2_small
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>403 Forbidden</html>")
    not_tensors = tmp_path / "not-tensors.pth"
    torch.save({"epoch": 3}, not_tensors)
    inception_file = write_standin_inception(tmp_path)
    cases = {garbage: "cannot read .* as a PyTorch state dict",
             not_tensors: "not a state dict of tensors",
             small: r"not a DINOv2 ViT-L/14 state dict in Meta's layout .*308 missing keys \(e\.g\. blocks\.2\.",
             inception_file: "not a DINOv2 ViT-L/14 state dict.*unexpected keys"}
    for path, message in cases.items():
        with pytest.raises(BadInput, match=message) as err:
            dinov2_module.dinov2_feature_space(path)
        assert "\n" not in str(err.value) and err.value.exit_code == 2
    sd = dinov2_standin_state_dict(device="meta")
    sd["pos_embed"] = torch.empty(1, 257, 1024, device="meta")
    with pytest.raises(BadInput, match=r"wrong shapes \(e\.g\. pos_embed \(1, 257, 1024\) \(expected"):
        dinov2_module.load_dinov2(sd, device="meta")
