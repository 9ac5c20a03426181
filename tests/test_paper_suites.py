"""`sfdbench run --suite cifar10 | imagenet64` end to end on CPU, offline: tiny teachers written in
EDM's pickle format (tests/edm_format.py), stand-in Inception weights of the real file's structure
(tests/standin_weights.py) and a tiny mu/sigma reference in the asset cache; then the LaTeX table
with the published rows beside the (flagged) tiny rows. Real-size teachers sample through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from edm_format import TINY_ADM, TINY_DDPMPP, tiny_net, write_edm_pickle
from standin_weights import write_standin_inception

from sfdbench.cli import main
from sfdbench.suites import assets, get_suite

TINY_CIFAR = {**TINY_DDPMPP, "img_resolution": 32, "attn_resolutions": [16]}
TINY_IMAGENET = {**TINY_ADM, "model_channels": 16, "channel_mult": [1, 2], "attn_resolutions": [],
                 "img_resolution": 64, "label_dim": 1000}
FAST = ["--set", "sfd.iterations=2", "--set", "sfd.batch=4", "--set", "sfd.checkpoint_every=1",
        "--set", "sfd.precision=\"fp32\"", "--set", "sfd-v.iterations=2", "--set", "sfd-v.precision=\"fp32\""]


def cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.fixture
def cache(monkeypatch, tmp_path):
    return stand_in_asset_cache(monkeypatch, tmp_path)


def stand_in_asset_cache(monkeypatch, tmp_path):
    """An asset cache with stand-in Inception weights (unpinned: they are not the real file) and
    tiny EDM-style reference statistics for both suites."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SFDBENCH_CACHE", str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    inception = assets.ASSETS["inception-v3-compat"]
    monkeypatch.setitem(assets.ASSETS, "inception-v3-compat", dataclasses.replace(inception, sha256_prefix=None))
    write_standin_inception(root / "assets", filename=inception.filename)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64)) * 0.1
    for key in ("cifar10-fid-ref", "imagenet64-fid-ref"):
        np.savez(assets.ASSETS[key].path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T + 0.01 * np.eye(2048))
    return root


def records(out: Path, suite: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / suite / "records").glob("*.json"))]


def check_records(recs: list[dict], methods: set[str], teacher_source: str) -> None:
    assert {r["method"] for r in recs} == methods
    for r in recs:
        assert r["nfe"] == 2 and r["nfe_counted"] == 2 and r["n_samples"] == 8
        assert np.isfinite(r["metrics"]["fid"]) and r["metrics"]["fid"] > 0
        assert r["metrics"]["fd_dinov2"] is None and "--reference-images" in r["metrics"]["notes"]
        assert r["metrics"]["precision"] is None  # EDM-style reference: mu/sigma only
        assert r["metric_protocol"]["feature_extractor"] == "inception-v3-compat"
        assert r["metric_protocol"]["n_generated"] == 50_000
        provenance = r["assets"]
        assert provenance["inception-v3-compat"]["source"] == "unverified local file"
        teacher = provenance.get("teacher") or provenance[next(k for k in provenance if k.startswith("edm-"))]
        assert teacher["source"] == teacher_source and len(teacher["sha256"]) == 64
        if r["group"] == "distillation":
            assert r["fine_tuning"]["flops"] > 0 and r["fine_tuning"]["wall_seconds"] > 0


def test_cifar10_runs_end_to_end_and_tables_with_the_published_rows(cache, tmp_path, monkeypatch, capsys):
    teacher = write_edm_pickle(tmp_path / "tiny-cifar10.pkl", tiny_net("EDMPrecond", TINY_CIFAR), "EDMPrecond",
                               TINY_CIFAR)
    out = tmp_path / "results"
    code = cli(monkeypatch, "run", "--suite", "cifar10", "--teacher", str(teacher), "--methods",
               "heun,dpmpp3m,sfd,sfd-v", "--nfe", "2", "--samples", "8", "--out", str(out), *FAST)
    assert code == 0
    check_records(records(out, "cifar10"), {"heun", "dpmpp3m", "sfd", "sfd-v"}, "unverified local file (--teacher)")
    capsys.readouterr()
    assert cli(monkeypatch, "table", "--suite", "cifar10", "--format", "latex", "--results", str(out)) == 0
    latex = capsys.readouterr().out
    assert r"\begin{tabular}" in latex and "4.53" in latex  # the paper's SFD NFE 2 row
    measured = [line for line in latex.splitlines() if line.endswith(r"& measured \\")]
    assert len(measured) == 4 and all("not the protocol" in line for line in measured)


def test_imagenet64_runs_with_labels_from_each_samples_generator(cache, tmp_path, monkeypatch):
    teacher_asset = assets.ASSETS["edm-imagenet64-teacher"]
    write_edm_pickle(teacher_asset.path, tiny_net("EDMPrecond", TINY_IMAGENET), "EDMPrecond", TINY_IMAGENET)
    out = tmp_path / "results"
    code = cli(monkeypatch, "run", "--suite", "imagenet64", "--methods", "heun,dpmpp3m,sfd,sfd-v", "--nfe", "2",
               "--samples", "8", "--out", str(out), *FAST)
    assert code == 0
    recs = records(out, "imagenet64")
    check_records(recs, {"heun", "dpmpp3m", "sfd", "sfd-v"}, "unverified local file")
    assert all(r["sampling"]["conditioning"].startswith("drawn from each sample's generator") for r in recs)


def test_imagenet64_labels_are_uniform_one_hot_and_a_function_of_the_seed():
    suite = get_suite("imagenet64")
    first = [suite.conditioning(torch.Generator().manual_seed(s), s)["class_labels"] for s in range(50)]
    again = [suite.conditioning(torch.Generator().manual_seed(s), s)["class_labels"] for s in range(50)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(x.shape == (1000,) and x.sum() == 1 and set(x.unique().tolist()) == {0.0, 1.0} for x in first)
    # drawn after the latent from the same generator, as EDM's generate.py: randn([C, H, W]) then randint(1000)
    g, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.randn(3, 64, 64, generator=g)
    torch.randn(3, 64, 64, generator=g2)
    assert suite.conditioning(g2, 7)["class_labels"].argmax() == torch.randint(1000, (), generator=g)
    batch = suite.training_conditioning(4096, torch.Generator().manual_seed(0))["class_labels"]
    counts = batch.sum(0)
    assert batch.shape == (4096, 1000) and counts.sum() == 4096 and counts.max() < 20  # uniform, not one class


def test_paper_grids_and_hyperparameters():
    from sfdbench.methods import get_method

    cifar, imagenet = get_suite("cifar10"), get_suite("imagenet64")
    grid = {e.method: e.nfes for e in cifar.default_grid}
    assert grid["heun-edm"] == (35,) and grid["sfd"] == (2, 3, 4, 5) and grid["sfd-v"] == (2, 3, 4, 5)
    assert grid["sfd-stage2"] == (1,) and grid["ddim"] == (10, 50)
    assert all(grid[m] == (5, 10) for m in ("dpmpp3m", "ipndm", "unipc", "deis"))
    assert {e.method: e.nfes for e in imagenet.default_grid}["heun-edm"] == (79,)
    sfd = get_method("sfd").hyperparameters(cifar, 2)
    assert (sfd["iterations"], sfd["batch"], sfd["lr"], sfd["sigma_min"]) == (1563, 128, 5e-5, 0.006)
    assert get_method("sfd").hyperparameters(imagenet, 2)["lr"] == 1e-5
    assert get_method("sfd-v").hyperparameters(cifar, 3)["iterations"] == 6250
    stage2 = get_method("sfd-stage2").hyperparameters(cifar, 1)
    assert (stage2["iterations"], stage2["lr"]) == (15625, 5e-4)
    assert cifar.default_samples == 50_000 and cifar.default_seeds == (0,)
    for nfe in (35, 79):  # EDM's own sampler: 18 and 40 noise levels, the last step Euler to 0
        assert get_method("heun-edm").hyperparameters(cifar, nfe)["num_steps"] == (nfe + 1) // 2


def test_offline_run_without_assets_names_every_missing_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert cli(monkeypatch, "run", "--suite", "cifar10", "--out", str(tmp_path / "r")) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sfdbench assets download edm-cifar10-teacher cifar10-fid-ref" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("config", ["CIFAR10_DDPMPP_CONFIG", "IMAGENET64_ADM_CONFIG"])
def test_real_size_teacher_samples_8_images_at_nfe_2_through_the_cli(config, cache, tmp_path, monkeypatch, capsys):
    from sfdbench.networks import edm

    spec = getattr(edm, config)
    torch.manual_seed(0)
    net = edm.build_precond(spec["precond_class"], spec["init_kwargs"]).eval()
    suite = "cifar10" if config.startswith("CIFAR") else "imagenet64"
    teacher = tmp_path / f"{suite}.safetensors"
    from sfdbench.networks.checkpoint import save_weights

    save_weights(net, teacher, {"format": "sfdbench-edm-teacher", "format_version": 1,
                                "precond_class": spec["precond_class"], "precond_init_kwargs": spec["init_kwargs"]})
    del net
    code = cli(monkeypatch, "sample", "--suite", suite, "--teacher", str(teacher), "--method", "dpmpp3m", "--nfe", "2",
               "--samples", "8", "--out", str(tmp_path / "grid.npz"))
    assert code == 0, capsys.readouterr().err
    images = np.load(tmp_path / "grid.npz")["images"]
    assert images.shape == (8, 3, *(2 * [32 if suite == "cifar10" else 64])) and images.dtype == np.uint8
    assert "NFE 2" in capsys.readouterr().out


def test_teacher_inspect_and_convert_then_run_from_the_safetensors(cache, tmp_path, monkeypatch, capsys):
    pkl = write_edm_pickle(tmp_path / "t.pkl", tiny_net("EDMPrecond", TINY_CIFAR), "EDMPrecond", TINY_CIFAR)
    assert cli(monkeypatch, "teacher", "inspect", str(pkl)) == 0
    shown = capsys.readouterr().out
    assert "SongUNet" in shown and "EDMPrecond" in shown and "edm-pickle" in shown
    converted = tmp_path / "t.safetensors"
    assert cli(monkeypatch, "teacher", "convert", str(pkl), str(converted)) == 0
    capsys.readouterr()
    assert cli(monkeypatch, "teacher", "inspect", str(converted)) == 0
    assert "safetensors" in capsys.readouterr().out
    from sfdbench.networks import load_teacher

    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 3.0])
    assert torch.equal(load_teacher(pkl)(x, sigma), load_teacher(converted)(x, sigma))
    out = tmp_path / "results"
    assert cli(monkeypatch, "run", "--suite", "cifar10", "--teacher", str(converted), "--methods", "ddim", "--nfe",
               "2", "--samples", "4", "--out", str(out)) == 0
    assert records(out, "cifar10")[0]["assets"]["teacher"]["sha256"] != records(out, "cifar10")[0]["teacher"]


def test_a_hostile_teacher_is_refused_through_the_cli_before_anything_runs(cache, tmp_path, monkeypatch, capsys):
    from edm_format import global_call, touch_command

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(global_call("os", "system", touch_command(marker)))
    out = tmp_path / "results"
    assert cli(monkeypatch, "run", "--suite", "cifar10", "--teacher", str(evil), "--methods", "ddim", "--nfe", "2",
               "--samples", "4", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GLOBAL os.system" in err
    assert cli(monkeypatch, "teacher", "inspect", str(evil)) == 2
    assert not marker.exists() and not (out / "cifar10" / "records").exists()


def test_reference_images_give_prdc_kid_and_fd_dinov2(cache, tmp_path, monkeypatch):
    """--reference-images: Inception features of the given images (PRDC, KID) and FD-DINOv2. The DINOv2
    weights are a 2-block stand-in of ViT-L/14's width in Meta's layout (the full 24 blocks are 1.2 GB;
    tests/test_real_metrics.py checks that layout on the meta device)."""
    from standin_weights import write_standin_dinov2

    from sfdbench.metrics import dinov2
    from sfdbench.suites.paper import PaperSuite

    weights = write_standin_dinov2(cache / "assets", depth=2, filename=assets.ASSETS["dinov2-vitl14"].filename)
    thin = dataclasses.replace(dinov2.VITL14, depth=2)
    monkeypatch.setattr(PaperSuite, "dinov2_space", lambda self: dinov2.dinov2_feature_space(weights, arch=thin))
    g = torch.Generator().manual_seed(0)
    low = torch.rand(12, 3, 4, 4, generator=g)
    images = (torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear") * 255).to(torch.uint8)
    np.savez(tmp_path / "train.npz", images=images.numpy())
    teacher = write_edm_pickle(tmp_path / "t.pkl", tiny_net("EDMPrecond", TINY_CIFAR), "EDMPrecond", TINY_CIFAR)
    out = tmp_path / "results"
    assert cli(monkeypatch, "run", "--suite", "cifar10", "--teacher", str(teacher), "--reference-images",
               str(tmp_path / "train.npz"), "--methods", "dpmpp3m", "--nfe", "2", "--samples", "8", "--out",
               str(out)) == 0
    (rec,) = records(out, "cifar10")
    m = rec["metrics"]
    assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "coverage")) and m["density"] >= 0
    assert np.isfinite(m["kid"]) and np.isfinite(m["fd_dinov2"]) and m["fd_dinov2"] > 0
    assert "dinov2-vitl14" in rec["assets"] and "train.npz" in rec["metric_protocol"]["reference_set"]
