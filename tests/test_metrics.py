"""Metrics: the uint8 conversion, FID through torch-fidelity vs scipy, the shipped feature net."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sfdbench.errors import BadInput
from sfdbench.metrics import digits_features
from sfdbench.metrics.fid import extract_features, fid_from_statistics, fid_statistics
from sfdbench.metrics.images import to_uint8
from sfdbench.networks.checkpoint import read_metadata
from sfdbench.suites.digits import FEATURE_WEIGHTS, DigitsSuite, load_digits


def test_to_uint8_matches_reference_formula():
    x = torch.linspace(-1.2, 1.2, 1001)
    expected = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # the reference's numpy path
    assert np.array_equal(to_uint8(x).numpy(), expected)
    assert to_uint8(torch.tensor([-1.0, 1.0])).tolist() == [0, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_bad_input(bad):
    x = torch.zeros(3, 1, 8, 8)
    x[1, 0, 2, 2] = bad
    with pytest.raises(BadInput, match="1 generated image"):
        to_uint8(x)


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to a and b, written with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real  # singular: ReLU features have dead units
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_equals_scipy_on_the_same_features():
    extractor = digits_features.create(FEATURE_WEIGHTS)
    real, _ = load_digits("train")
    test, _ = load_digits("test")
    fa = extract_features(extractor, to_uint8(real), digits_features.FEATURE_LAYER)
    fb = extract_features(extractor, to_uint8(test), digits_features.FEATURE_LAYER)
    ours = fid_from_statistics(fid_statistics(fa), fid_statistics(fb))
    ref = scipy_frechet(fa.numpy(), fb.numpy())
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours > 0


def test_suite_fid_is_small_for_real_and_large_for_noise():
    suite = DigitsSuite()
    real = suite.evaluate(to_uint8(load_digits("train")[0][:1000]))["fid"]
    noise = suite.evaluate(to_uint8(torch.rand(1000, 1, 8, 8) * 2 - 1))["fid"]
    assert 0 < real < 5 < 100 < noise


def test_feature_network_accuracy_on_held_out_digits():
    from sfdbench.networks.checkpoint import load_weights
    from sfdbench.networks.digits_classifier import DigitsClassifier
    from sfdbench.suites.digits_training import classifier_accuracy

    meta = read_metadata(FEATURE_WEIGHTS)
    net = load_weights(DigitsClassifier(**meta["config"]), FEATURE_WEIGHTS)
    acc = classifier_accuracy(net, *load_digits("test"))
    assert acc >= 0.97
    assert meta["test_accuracy"] == pytest.approx(acc)
    assert meta["command"].startswith("sfdbench features train") and "seed" in meta


def test_metrics_reject_wrong_dtype():
    with pytest.raises(BadInput, match="uint8"):
        DigitsSuite().evaluate(torch.zeros(4, 1, 8, 8))
