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


def _fid_ci_numbers(stdout: str) -> tuple[float, float, float]:
    import re

    m = re.search(r"FID ([\d.]+), 90% CI \[([\d.]+), ([\d.]+)\]", stdout)
    assert m, stdout
    return tuple(float(v) for v in m.groups())


def test_fid_ci_command(cli, tmp_path):
    """`sfdbench fid-ci`: the point FID equals the suite's FID on the same images, the interval
    comes from bootstrap_fid, NCHW `images` and NHWC `arr_0` (ADM/EDM npz) give the same answer."""
    from sfdbench.suites.digits import DigitsSuite

    images = to_uint8(load_digits("test")[0])
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    np.savez(tmp_path / "nhwc.npz", images.permute(0, 2, 3, 1).numpy())
    args = ["--n-boot", "40", "--level", "0.9", "--seed", "3"]
    a = cli("fid-ci", "--samples", str(tmp_path / "nchw.npz"), *args)
    b = cli("fid-ci", "--samples", str(tmp_path / "nhwc.npz"), *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert _fid_ci_numbers(a.stdout) == _fid_ci_numbers(b.stdout)
    point, low, high = _fid_ci_numbers(a.stdout)
    suite = DigitsSuite()
    assert point == pytest.approx(suite.evaluate(images)["fid"], rel=1e-3)
    feats, ref = suite.fid_features_and_reference(images)
    assert (low, high) == pytest.approx(bootstrap_fid(feats, ref, n_boot=40, seed=3, level=0.9)[:2], abs=1e-3)
    assert low < point < high


def test_fid_ci_bad_input(cli, tmp_path):
    np.savez(tmp_path / "other.npz", labels=np.zeros(3))
    np.savez(tmp_path / "float.npz", images=np.zeros((10, 1, 8, 8), np.float32))
    np.save(tmp_path / "single.npy", np.zeros((10, 1, 8, 8), np.uint8))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    cases = {"missing.npz": "cannot read", "other.npz": "expected `images`", "float.npz": "dtype torch.float32",
             "single.npy": "not an npz", "garbage.npz": "cannot read"}
    for name, message in cases.items():
        r = cli("fid-ci", "--samples", str(tmp_path / name))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (name, r.stderr)
    np.savez(tmp_path / "good.npz", images=to_uint8(load_digits("test")[0]).numpy())
    for bad, message in ((["--method", "magic"], "unknown bootstrap interval method"),
                         (["--level", "1.5"], "confidence level"), (["--n-boot", "1"], "n_boot >= 2")):
        r = cli("fid-ci", "--samples", str(tmp_path / "good.npz"), *bad)
        assert r.returncode == 2 and message in r.stderr, r.stderr
