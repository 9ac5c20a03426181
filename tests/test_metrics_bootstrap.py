"""Bootstrap confidence interval of FID from one sample set."""

import numpy as np
import pytest
import torch

from sfdbench.errors import BadInput
from sfdbench.metrics import digits_features
from sfdbench.metrics.bootstrap import bootstrap_fid, bootstrap_fids
from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
from sfdbench.metrics.images import to_uint8
from sfdbench.metrics.reference import ReferenceStats
from sfdbench.suites.digits import FEATURE_WEIGHTS, load_digits


@pytest.fixture(scope="module")
def digits():
    space = digits_features.feature_space(FEATURE_WEIGHTS)
    ref = ReferenceStats.from_features(space.features(to_uint8(load_digits("train")[0])))
    return space.features(to_uint8(load_digits("test")[0])), ref


def test_deterministic_for_a_seed(digits):
    feats, ref = digits
    a = bootstrap_fid(feats, ref, n_boot=30, seed=7)
    assert a == bootstrap_fid(feats, ref, n_boot=30, seed=7)
    assert a != bootstrap_fid(feats, ref, n_boot=30, seed=8)


def test_interval_contains_the_point_estimate(digits):
    feats, ref = digits
    point = fid_from_statistics(fid_statistics(feats), ref.fid_stats())
    low, high, std = bootstrap_fid(feats, ref, n_boot=100, seed=0, level=0.95)
    assert 0 <= low < point < high and std > 0
    assert high - low == pytest.approx(2 * 1.96 * std, rel=0.5)  # roughly normal spread
    narrow = bootstrap_fid(feats, ref, n_boot=100, seed=0, level=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_replicates_resample_with_replacement(digits):
    feats, ref = digits
    fids = bootstrap_fids(feats, {"mu": ref.mu, "sigma": ref.sigma}, n_boot=20, seed=0)
    rng = np.random.Generator(np.random.PCG64(0))
    idx = torch.from_numpy(rng.integers(0, len(feats), size=len(feats)))
    assert fids[0] == fid_from_statistics(fid_statistics(feats[idx]), ref.fid_stats())


def test_percentile_interval_is_the_raw_quantiles(digits):
    feats, ref = digits
    fids = bootstrap_fids(feats, ref, n_boot=40, seed=1)
    low, high, std = bootstrap_fid(feats, ref, n_boot=40, seed=1, method="percentile")
    assert (low, high) == tuple(np.quantile(fids, [0.025, 0.975]))
    assert std == pytest.approx(np.std(fids, ddof=1))


def test_bad_arguments(digits):
    feats, ref = digits
    with pytest.raises(BadInput, match="level"):
        bootstrap_fid(feats, ref, level=95)
    with pytest.raises(BadInput, match="method"):
        bootstrap_fid(feats, ref, method="bca")
    with pytest.raises(BadInput, match="64-d but features are 3-d"):
        bootstrap_fid(torch.zeros(10, 3), ref)
