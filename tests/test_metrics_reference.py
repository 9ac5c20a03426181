"""Reference statistics: computed once, cached atomically as npz, keyed by extractor + weights + set."""

import numpy as np
import pytest
import torch

from sfdbench.errors import BadInput
from sfdbench.io import cache_dir as default_cache_dir
from sfdbench.metrics import digits_features
from sfdbench.metrics.features import FeatureSpace
from sfdbench.metrics.images import to_uint8
from sfdbench.metrics.reference import ReferenceStats, cache_path, reference_statistics
from sfdbench.suites.digits import FEATURE_WEIGHTS, load_digits


@pytest.fixture(scope="module")
def space():
    return digits_features.feature_space(FEATURE_WEIGHTS)


def counting_loader(calls: list, n: int = 300):
    def load():
        calls.append(1)
        return to_uint8(load_digits("train")[0][:n])
    return load


def test_computed_once_then_read_from_npz(space, tmp_path):
    calls = []
    ref = reference_statistics(space, "digits-first-300", counting_loader(calls), cache_dir=tmp_path)
    path = cache_path(space, "digits-first-300", tmp_path)
    assert path.is_file() and calls == [1]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    with np.load(path) as z:
        assert set(z.files) == {"mu", "sigma", "features", "meta"}
        assert z["features"].dtype == np.float32 and z["features"].shape == (300, 64)  # lossless float32
    again = ReferenceStats.load(path)
    assert np.array_equal(again.mu, ref.mu) and np.array_equal(again.sigma, ref.sigma)
    assert torch.equal(again.features.double(), ref.features.double())
    assert again.meta["feature_extractor"] == "sfdbench-digits" and again.meta["n_reference"] == 300
    # another process (memory cache cleared) finds the file and does not recompute
    import sfdbench.metrics.reference as reference_module

    reference_module._MEMORY.clear()
    reference_statistics(space, "digits-first-300", counting_loader(calls), cache_dir=tmp_path)
    assert calls == [1]


def test_key_changes_with_weights_reference_and_subset(space, tmp_path):
    other_weights = FeatureSpace(space.name, space.layer, space.dim, "ffffffffffffffff", space.create,
                                 space.channels, space.image_size)
    paths = {cache_path(space, "a", tmp_path), cache_path(space, "b", tmp_path),
             cache_path(other_weights, "a", tmp_path), cache_path(space, "a", tmp_path, prdc_reference_size=100)}
    assert len(paths) == 4


def test_seeded_prdc_subset_keeps_full_fid_statistics(space, tmp_path):
    calls = []
    full = reference_statistics(space, "digits-first-300", counting_loader(calls), cache_dir=None)
    sub = reference_statistics(space, "digits-first-300", counting_loader(calls), cache_dir=tmp_path,
                               prdc_reference_size=100, seed=3)
    assert sub.features.shape == (100, 64) and sub.meta["n_reference"] == 300
    assert np.array_equal(sub.mu, full.mu)
    idx = np.sort(np.random.RandomState(3).permutation(300)[:100])
    assert torch.equal(sub.features, full.features[torch.from_numpy(idx)])


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SFDBENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "sfdbench"


def test_edm_style_npz_loads_without_features(tmp_path):
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
    ref = ReferenceStats.load(path)
    assert ref.dim == 4 and not ref.has_features and ref.source == str(path)


@pytest.mark.parametrize("content,match", [
    (b"not an npz", "cannot read reference statistics"),
    (None, "lack 'mu'/'sigma'"),
])
def test_bad_reference_files(tmp_path, content, match):
    path = tmp_path / "ref.npz"
    if content is None:
        np.savez(path, mean=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(BadInput, match=match):
        ReferenceStats.load(path)
    with pytest.raises(BadInput, match="do not exist"):
        ReferenceStats.load(tmp_path / "missing.npz")
