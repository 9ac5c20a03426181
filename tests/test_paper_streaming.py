"""Streaming evaluation of the paper suites: rows of Inception (and DINOv2) features per batch, concatenated in
sample order, give exactly the metrics ``evaluate`` computes from all images at once; the rows are features
(8 KiB per sample), not images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from standin_weights import write_standin_dinov2, write_standin_inception

from sfdbench.suites import assets, get_suite


@pytest.fixture
def cache(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("SFDBENCH_CACHE", str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    inception = assets.ASSETS["inception-v3-compat"]
    monkeypatch.setitem(assets.ASSETS, "inception-v3-compat", dataclasses.replace(inception, sha256_prefix=None))
    write_standin_inception(root / "assets", filename=inception.filename)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64)) * 0.1
    np.savez(assets.ASSETS["cifar10-fid-ref"].path, mu=rng.normal(size=2048) * 0.1,
             sigma=a @ a.T + 0.01 * np.eye(2048))
    return root


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear") * 255).to(torch.uint8)


def streamed(suite, u8: torch.Tensor, batch: int) -> dict:
    rows: dict[str, list] = {}
    for s in range(0, u8.shape[0], batch):
        for k, v in suite.summarize(u8[s:s + batch], {}).items():
            rows.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in rows.items()}


def test_rows_give_the_metrics_of_evaluate(cache):
    suite = get_suite("cifar10")
    u8 = images(5, 0)
    rows = streamed(suite, u8, 3)
    assert set(rows) == {"inception"} and rows["inception"].shape == (5, 2048)
    assert rows["inception"].dtype == torch.float32
    got, expected = suite.evaluate_summaries(rows), suite.evaluate(u8)
    assert got["fid"] == pytest.approx(expected["fid"], rel=1e-9) and got["precision"] is None
    assert got["notes"] == expected["notes"]


def test_rows_with_reference_images_give_prdc_kid_and_fd_dinov2(cache, tmp_path, monkeypatch):
    from sfdbench.metrics import dinov2
    from sfdbench.suites.paper import PaperSuite

    weights = write_standin_dinov2(cache / "assets", depth=2, filename=assets.ASSETS["dinov2-vitl14"].filename)
    thin = dataclasses.replace(dinov2.VITL14, depth=2)
    monkeypatch.setattr(PaperSuite, "dinov2_space", lambda self: dinov2.dinov2_feature_space(weights, arch=thin))
    np.savez(tmp_path / "train.npz", images=images(8, 2).numpy())
    suite = get_suite("cifar10")
    suite.use_reference_images(tmp_path / "train.npz")
    u8 = images(6, 3)
    rows = streamed(suite, u8, 4)
    assert rows["dinov2"].shape == (6, 1024)
    got, expected = suite.evaluate_summaries(rows), suite.evaluate(u8)
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "fd_dinov2"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
