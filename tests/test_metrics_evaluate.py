"""compute_metrics: every metric through one entry point, input validation, reference handling,
and the digits suite wiring."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sfdbench.errors import BadInput
from sfdbench.metrics import digits_features
from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics, compute_metrics_from_features
from sfdbench.metrics.images import to_uint8
from sfdbench.metrics.reference import ReferenceStats, reference_statistics
from sfdbench.suites.digits import FEATURE_WEIGHTS, DigitsSuite, load_digits


@pytest.fixture(scope="module")
def space():
    return digits_features.feature_space(FEATURE_WEIGHTS)


@pytest.fixture(scope="module")
def reference(space):
    return reference_statistics(space, "test-digits-train", lambda: to_uint8(load_digits("train")[0]))


@pytest.fixture(scope="module")
def test_images():
    return to_uint8(load_digits("test")[0])  # 297 held-out digits


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real))


def hand_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, written out."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_all_image_metrics_from_one_call(space, reference, test_images):
    out = compute_metrics(test_images, reference, space, kid_subsets=10)
    assert set(IMAGE_METRICS) <= set(out) and {"kid_std", "kid_subset_size"} <= set(out)
    assert out["kid_subset_size"] == 297  # min(1000, n_generated=297, n_reference=1500), reported
    for key in ("precision", "recall", "density", "coverage"):
        assert 0 <= out[key] <= (1 / 5 * 1500 if key == "density" else 1)
    assert out["precision"] > 0.9 and out["recall"] > 0.9  # held-out real digits
    assert "notes" not in out


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # singular covariances: dead ReLU units
def test_fid_and_kid_equal_independent_formulas(space, reference, test_images):
    feats = space.features(test_images)
    ref_feats = reference.features.to(torch.float64)
    out = compute_metrics_from_features(feats, reference, ("fid", "kid"), kid_subsets=1, kid_subset_size=297)
    assert out["fid"] == pytest.approx(scipy_fid(feats.numpy(), ref_feats.numpy()), rel=1e-6)
    # one subset of all 297 generated vs 297 random reference features: MMD is permutation-invariant on
    # the generated side, so only the reference subset needs reproducing (torch-fidelity's draw order)
    rng = np.random.RandomState(0)
    rng.choice(297, 297, replace=False)
    sub = ref_feats.numpy()[rng.choice(1500, 297, replace=False)]
    assert out["kid"] == pytest.approx(hand_kid(feats.numpy(), sub), rel=1e-9)


def test_real_beats_noise(space, reference):
    real = compute_metrics(to_uint8(load_digits("train")[0][:400]), reference, space, kid_subsets=5)
    noise = compute_metrics(to_uint8(torch.rand(400, 1, 8, 8) * 2 - 1), reference, space, kid_subsets=5)
    assert real["fid"] < noise["fid"] and real["kid"] < noise["kid"]
    assert real["density"] > noise["density"] and real["coverage"] > noise["coverage"]


@pytest.mark.parametrize("images,match", [
    (torch.full((10, 1, 8, 8), float("nan")), "10 of the generated images contain NaN/Inf"),
    (torch.zeros(10, 1, 8, 8), "dtype torch.float32.*to_uint8"),
    (torch.zeros(10, 1, 8, 8, dtype=torch.int64), "dtype torch.int64"),
    (torch.zeros(10, 8, 8, dtype=torch.uint8), r"shape \(10, 8, 8\).*\[N, C, H, W\]"),
    (torch.zeros(10, 3, 8, 8, dtype=torch.uint8), "3 channels.*takes 1"),
    (torch.zeros(10, 8, 8, 1, dtype=torch.uint8), "NHWC"),
    (torch.zeros(10, 1, 16, 16, dtype=torch.uint8), "16x16.*takes 8x8"),
    ("not images", "uint8 tensor"),
])
def test_bad_images(space, reference, images, match):
    with pytest.raises(BadInput, match=match):
        compute_metrics(images, reference, space)


def test_inf_is_named_too(space, reference):
    x = torch.zeros(4, 1, 8, 8)
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(BadInput, match="1 of the generated images contain NaN/Inf"):
        compute_metrics(x, reference, space)


def test_too_few_samples(space, reference, test_images):
    with pytest.raises(BadInput, match="at least 6 samples"):
        compute_metrics(test_images[:5], reference, space, ("precision",))
    with pytest.raises(BadInput, match="FID needs at least 2"):
        compute_metrics(test_images[:1], reference, space, ("fid",))
    assert compute_metrics(test_images[:2], reference, space, ("fid",))["fid"] > 0


def test_kid_subset_size_larger_than_samples(space, reference, test_images):
    with pytest.raises(BadInput, match="KID subset size 1000 is larger than the sample count.*<= 50"):
        compute_metrics(test_images[:50], reference, space, ("kid",), kid_subset_size=1000)
    out = compute_metrics(test_images[:50], reference, space, ("kid",), kid_subsets=3)
    assert out["kid_subset_size"] == 50 and out["kid_subsets"] == 3


def test_reference_file_with_other_dimension(space, test_images, tmp_path):
    path = tmp_path / "inception-ref.npz"
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(BadInput, match=r"inception-ref.npz have 2048-d features but sfdbench-digits:features gives 64"):
        compute_metrics(test_images, path, space)


def test_reference_from_another_extractor_is_refused(space, reference, test_images):
    other = ReferenceStats(reference.mu, reference.sigma, reference.features,
                           {**reference.meta, "feature_weights_sha256": "0123456789abcdef"}, "other.npz")
    with pytest.raises(BadInput, match="other.npz were computed with"):
        compute_metrics(test_images, other, space)


def test_edm_style_reference_gives_fid_and_marks_prdc_unavailable(space, reference, test_images, tmp_path):
    path = tmp_path / "edm-style.npz"
    np.savez(path, mu=reference.mu, sigma=reference.sigma)
    out = compute_metrics(test_images, path, space)
    full = compute_metrics(test_images, reference, space, ("fid",))
    assert out["fid"] == pytest.approx(full["fid"], rel=1e-12)
    for key in ("kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert out[key] is None
    assert "unavailable" in out["notes"] and "mu/sigma" in out["notes"]


def test_prdc_on_a_seeded_subset_of_generated_samples(space, reference):
    images = to_uint8(load_digits("train")[0][:600])
    a = compute_metrics(images, reference, space, ("coverage", "density"), prdc_samples=300, seed=0)
    b = compute_metrics(images, reference, space, ("coverage", "density"), prdc_samples=300, seed=0)
    c = compute_metrics(images, reference, space, ("coverage", "density"), prdc_samples=300, seed=1)
    assert a == b and a != c


def test_unknown_metric_and_missing_prompts(space, reference, test_images):
    with pytest.raises(BadInput, match="unknown metric"):
        compute_metrics(test_images, reference, space, ("fid", "is"))
    with pytest.raises(BadInput, match="one prompt per image"):
        compute_metrics(test_images, reference, space, ("clip_score",))


def test_digits_suite_reports_every_metric_and_its_protocol():
    suite = DigitsSuite()
    out = suite.evaluate(to_uint8(load_digits("test")[0]))
    assert {"fid", "kid", "kid_std", "precision", "recall", "density", "coverage"} <= set(out)
    assert all(isinstance(out[k], float) for k in IMAGE_METRICS)
    proto = suite.metric_protocol()
    assert proto["feature_extractor"] == "sfdbench-digits" and proto["feature_layer"] == "features"
    assert proto["n_reference"] == 1500 and proto["prdc_k"] == 5 and proto["feature_dim"] == 64
    assert proto["kid_subset_size"] == "min(1000, n)"
    assert proto["pr_definition"].startswith("knn") and "torch-fidelity" in proto["fid_implementation"]
