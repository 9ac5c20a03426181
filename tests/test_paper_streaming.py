"""Streaming evaluation of the paper suites: rows of Inception (and DINOv2) features per batch, concatenated in
sample order, give exactly the metrics the library computes from all images at once (``compute_metrics``);
the rows are features (8 KiB per sample), not images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from standin_weights import write_standin_dinov2
from test_paper_suites import stand_in_asset_cache

from sfdbench.metrics.evaluate import IMAGE_METRICS, compute_metrics
from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
from sfdbench.suites import assets, get_suite


@pytest.fixture
def cache(monkeypatch, tmp_path):
    return stand_in_asset_cache(monkeypatch, tmp_path)


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
    got = suite.evaluate_summaries(rows)
    expected = compute_metrics(u8, suite.reference(), suite.feature_space(), ("fid",))
    assert got["fid"] == pytest.approx(expected["fid"], rel=1e-9) and got["precision"] is None
    assert "unavailable" in got["notes"]


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
    got = suite.evaluate_summaries(rows)
    expected = compute_metrics(u8, suite.reference(), suite.feature_space(), IMAGE_METRICS, k=5)
    dino = suite.dinov2_space()
    expected["fd_dinov2"] = fid_from_statistics(fid_statistics(dino.features(u8)),
                                                suite._images_reference(dino).fid_stats())
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "fd_dinov2"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
