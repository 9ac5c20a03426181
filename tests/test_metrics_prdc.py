"""Our tiled precision/recall/density/coverage against the ``prdc`` package (Naeem et al. 2020), and
which precision/recall definition agrees with it where.

Definition used by ``sfdbench.metrics.knn`` (and by ``prdc``): radius = distance to the k-th neighbour
excluding self, inside a ball iff ``d < radius`` (strict). torch-fidelity's ``prc`` uses ``d <= radius``.
"""

import contextlib
import io

import numpy as np
import pytest
import torch
from prdc import compute_prdc

from sfdbench.errors import BadInput
from sfdbench.metrics.evaluate import compute_metrics_from_features, torch_fidelity_precision_recall
from sfdbench.metrics.knn import knn_sq_radii, prdc
from sfdbench.metrics.reference import ReferenceStats

KEYS = ("precision", "recall", "density", "coverage")


def reference_prdc(real, fake, k=5):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the sample counts
        return {key: float(v) for key, v in compute_prdc(real, fake, k).items()}


def max_abs_diff(a, b):
    return max(abs(a[key] - b[key]) for key in KEYS)


def clustered(rng, n, centers, spread=0.3):
    """``n`` points around the rows of ``centers``."""
    return centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, centers.shape[1]))


def clustered_pair(rng, dim=16, n_centers=10):
    """Real and fake sets around the SAME cluster centres, the fake ones wider and missing two
    clusters: every metric is strictly between 0 and 1."""
    centers = rng.standard_normal((n_centers, dim)) * 3
    return clustered(rng, 2000, centers, 0.3), clustered(rng, 1500, centers[2:], 0.4)


CASES = {
    # name: (real, fake, k, tile) -- tiles smaller than the sets exercise the tiled merge
    "gaussian-shifted": lambda r: (r.standard_normal((1200, 32)), r.standard_normal((900, 32)) + 0.25, 5, 256),
    "clustered": lambda r: (*clustered_pair(r), 5, 512),
    "few-thousand-2048d": lambda r: (np.abs(r.standard_normal((2500, 2048))),
                                     np.abs(r.standard_normal((2500, 2048))) * 1.05, 5, 1024),
    "k3-uneven": lambda r: (r.standard_normal((301, 8)), 1.5 * r.standard_normal((77, 8)), 3, 64),
    "single-tile": lambda r: (r.standard_normal((200, 4)), r.standard_normal((150, 4)), 5, 4096),
}


@pytest.mark.parametrize("case", CASES)
def test_prdc_equals_prdc_package(case):
    real, fake, k, tile = CASES[case](np.random.default_rng(0))
    ours = prdc(real, fake, k=k, tile=tile)
    assert max_abs_diff(ours, reference_prdc(real, fake, k)) <= 1e-6
    assert set(ours) == set(KEYS)


def test_ties_and_duplicates_follow_strict_inequality_like_prdc():
    """Small-integer features: every distance is exact in float64 in both implementations, so
    ties between a distance and a radius are real and decided by the definition (strict <)."""
    rng = np.random.default_rng(1)
    real = rng.integers(0, 3, (700, 3)).astype(np.float64)  # 27 grid points, many duplicates
    fake = rng.integers(0, 4, (500, 3)).astype(np.float64)
    expected = reference_prdc(real, fake)
    ours = prdc(real, fake, tile=128)
    assert max_abs_diff(ours, expected) == 0.0
    # the radius of every real point is 0 (>= 6 copies of each grid point): nothing is strictly inside
    assert float(knn_sq_radii(real).max()) == 0.0
    assert ours["precision"] == ours["density"] == ours["coverage"] == 0.0
    # torch-fidelity's "<=" counts the ties: every fake point on the real grid {0,1,2}^3 (radius 0,
    # distance 0) is inside -- it disagrees with prdc here, by definition
    tf = torch_fidelity_precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=5)
    on_real_grid = float((fake <= 2).all(1).mean())
    assert tf["precision"] == pytest.approx(on_real_grid, abs=1e-6) and on_real_grid > 0.3


def test_exact_copies_of_real_points_are_inside_their_balls():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((400, 16))
    fake = np.concatenate([real[:100], rng.standard_normal((100, 16)) + 3.0])
    ours, expected = prdc(real, fake), reference_prdc(real, fake)
    assert max_abs_diff(ours, expected) <= 1e-12
    assert ours["precision"] == pytest.approx(0.5)  # the copies, and none of the far-away points


def test_float32_input_is_upcast_per_tile():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((600, 64)).astype(np.float32)
    fake = (rng.standard_normal((500, 64)) + 0.2).astype(np.float32)
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), tile=100)
    expected = reference_prdc(real.astype(np.float64), fake.astype(np.float64))
    assert max_abs_diff(ours, expected) <= 1e-6


def test_result_does_not_depend_on_tile_size():
    rng = np.random.default_rng(4)
    real, fake = clustered_pair(rng, dim=8, n_centers=5)
    results = [prdc(real, fake, tile=t) for t in (7, 64, 333, 10_000)]
    assert all(r == results[0] for r in results)


def test_knn_radii_match_sorted_distances():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((150, 6))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = np.sort(d, axis=1)[:, 5]  # k=5: the 6th smallest, counting self
    assert np.allclose(np.sqrt(knn_sq_radii(x, 5, tile=32).numpy()), expected, rtol=0, atol=1e-10)


def test_both_precision_recall_definitions_agree_with_prdc_on_continuous_features():
    """No exact ties: the k-NN version ("knn", ours) and torch-fidelity's prc give prdc's numbers."""
    rng = np.random.default_rng(6)
    real, fake = rng.standard_normal((800, 24)), rng.standard_normal((700, 24)) * 1.1 + 0.1
    expected = reference_prdc(real, fake)
    ref = ReferenceStats.from_features(torch.from_numpy(real))
    for definition in ("knn", "torch-fidelity"):
        got = compute_metrics_from_features(torch.from_numpy(fake), ref, KEYS, pr_definition=definition)
        assert max_abs_diff(got, expected) <= 1e-6, definition


@pytest.mark.parametrize("n_real,n_fake", [(5, 100), (100, 5)])
def test_too_few_samples_for_k(n_real, n_fake):
    rng = np.random.default_rng(7)
    with pytest.raises(BadInput, match="at least 6"):
        prdc(rng.standard_normal((n_real, 3)), rng.standard_normal((n_fake, 3)), k=5)


def test_dimension_mismatch_is_bad_input():
    with pytest.raises(BadInput, match="dimension"):
        prdc(np.zeros((10, 3)), np.zeros((10, 4)))
