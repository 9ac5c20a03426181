"""Offline behaviour of the real feature networks: a missing weights file is ``MissingAsset`` (exit
code 3) naming the file, its URL and the cache path, raised before anything tries to download."""

import pytest
import torch

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.metrics import features as features_module
from sfdbench.metrics.clip_score import load_clip, resolve_clip_weights

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Every cache an asset could be found in points into an empty temporary home."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "SFDBENCH_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.set_dir() by someone else
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    return home


def test_missing_inception_weights(empty_caches):
    expected_path = empty_caches / ".cache/torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(MissingAsset) as err:
        features_module.inception_feature_space()
    msg = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and INCEPTION_URL in msg
    assert f"put it at {expected_path} " in msg
    assert err.value.exit_code == 3 and "\n" not in msg


def test_torch_home_moves_the_inception_cache_path(empty_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert features_module.inception_weights_path() == tmp_path / "th" / "hub" / "checkpoints" / (
        "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(MissingAsset, match=str(tmp_path / "th" / "hub" / "checkpoints")):
        features_module.inception_feature_space()


def test_corrupt_inception_weights_are_bad_input(empty_caches):
    path = features_module.inception_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated download")
    with pytest.raises(BadInput, match="corrupt.*expected 6726825d.*download .* again"):
        features_module.inception_feature_space()


def test_missing_clip_weights(empty_caches, monkeypatch):
    import open_clip

    def no_model(*args, **kwargs):
        raise AssertionError("the 1B-parameter model was built before the weights check")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_model)
    with pytest.raises(MissingAsset) as err:
        load_clip()  # ViT-g-14 / laion2b_s34b_b88k
    msg = str(err.value)
    assert "ViT-g-14 / laion2b_s34b_b88k" in msg
    url = "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin"
    assert f"download {url} and" in msg
    target = empty_caches / ".cache/sfdbench/clip/ViT-g-14-laion2b_s34b_b88k/open_clip_pytorch_model.bin"
    assert f"put it at {target} " in msg
    assert str(empty_caches / ".cache" / "huggingface" / "hub") in msg and err.value.exit_code == 3


def test_unknown_clip_tag_is_bad_input(empty_caches):
    with pytest.raises(BadInput, match="unknown open_clip weights ViT-g-14 / nope"):
        load_clip("ViT-g-14", "nope")


def test_clip_weights_are_found_in_sfdbench_and_hugging_face_caches(empty_caches):
    with pytest.raises(MissingAsset, match="CLIP-ViT-B-32-laion2B-s34B-b79K"):
        resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    # the Hugging Face hub cache layout (what `huggingface-cli download` leaves behind)
    repo = empty_caches / ".cache" / "huggingface" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"weights")
    assert resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k") == snapshot
    # the plain path our MissingAsset message names wins over the hub cache
    ours = empty_caches / ".cache" / "sfdbench" / "clip" / "ViT-B-32-laion2b_s34b_b79k" / "open_clip_pytorch_model.bin"
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"weights")
    assert resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k") == ours


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """An untrained inception-v3-compat state dict (the real one cannot be downloaded here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    mp = pytest.MonkeyPatch()
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_through_torch_fidelity(random_inception_weights):
    from sfdbench.metrics.evaluate import compute_metrics
    from sfdbench.metrics.reference import ReferenceStats

    space = features_module.inception_feature_space(random_inception_weights)
    assert (space.name, space.layer, space.dim) == ("inception-v3-compat", "2048", 2048)
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    feats = space.features(rgb)
    assert feats.shape == (8, 2048) and feats.dtype == torch.float64
    gray = rgb[:, :1]
    assert torch.equal(space.features(gray), space.features(gray.expand(-1, 3, -1, -1)))  # 1 -> 3 channels
    ref = ReferenceStats.from_features(feats, space.protocol())
    out = compute_metrics(rgb, ref, space, ("fid", "precision", "coverage"))
    assert out["fid"] == pytest.approx(0, abs=1e-3) and out["precision"] == out["coverage"] == 1.0
