"""The latent suites ``lsun_bedroom`` and ``ms_coco`` end to end on CPU with tiny random diffusers pipelines
(tests/latent_tiny.py) loaded through ``--teacher FOLDER``: every solver, SFD and SFD-v fit, sample, decode and
evaluate; classifier-free guidance counted 2 per call; text embeddings once per caption; SFD-v's step condition
on the diffusers U-Net; the CLIP score of the streaming rows against the hand formula; reference statistics
built by streaming; the offline run without assets (exit 3, one line per asset)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from latent_tiny import LDM_IMAGE, LDM_LATENT, PROMPTS, SD_IMAGE, SD_LATENT, tiny_clip, write_ldm, write_sd
from standin_weights import write_standin_inception

from sfdbench.cli import main
from sfdbench.suites import SUITES, assets, get_suite
from sfdbench.suites.latent import lsun_bedroom, ms_coco

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")
SOLVERS = ["ddim", "heun", "dpm2", "dpmpp2m", "dpmpp3m", "ipndm", "ipndm_v", "deis", "unipc"]
FAST = ["--set", "sfd.iterations=2", "--set", "sfd.batch=4", "--set", "sfd.checkpoint_every=1",
        "--set", "sfd.precision=\"fp32\"", "--set", "sfd-v.iterations=2", "--set", "sfd-v.batch=4",
        "--set", "sfd-v.precision=\"fp32\"", "--set", "sfd-v.checkpoint_every=1"]


def cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"lsun_bedroom": write_ldm(root / "ldm"), "ms_coco": write_sd(root / "sd")}


class PooledPixels:
    """A cheap stand-in feature space (4x4 average-pooled pixels, 48-d) for the runs over every method; the
    Inception stand-in is exercised by the streaming-rows, reference and CLIP tests."""

    name, layer, dim, weights_id = "pooled-pixels", "48", 48, "none"
    channels, image_size, gray_to_rgb = (3,), None, False

    def features(self, images_u8, device="cpu"):
        x = torch.nn.functional.adaptive_avg_pool2d(images_u8.double() / 255, 4).flatten(1)
        return torch.cat([x[:, :24] + x[:, 24:] ** 2, x[:, 24:]], 1)

    def protocol(self):
        return {"feature_extractor": self.name}


def tiny(name: str, pooled: bool = False):
    suite = lsun_bedroom(LDM_LATENT, LDM_IMAGE) if name == "lsun_bedroom" else ms_coco(SD_LATENT, SD_IMAGE)
    suite.clip_loader = tiny_clip
    if pooled:
        suite.feature_space_factory = PooledPixels
    return suite


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An asset cache with stand-in Inception weights, the caption CSV, tiny mu/sigma references for both suites,
    and the tiny suites registered under the real names."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SFDBENCH_CACHE", str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    inception = assets.ASSETS["inception-v3-compat"]
    monkeypatch.setitem(assets.ASSETS, "inception-v3-compat", dataclasses.replace(inception, sha256_prefix=None))
    write_standin_inception(root / "assets", filename=inception.filename)
    captions = assets.ASSETS["ms-coco-captions-30k"].path
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text("id,text\n" + "".join(f"{i},\"{p}\"\n" for i, p in enumerate(PROMPTS)))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64)) * 0.1
    for name in ("lsun_bedroom", "ms_coco"):
        monkeypatch.setitem(SUITES, name, lambda name=name: tiny(name))
        path = get_suite(name).reference_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T + 0.01 * np.eye(2048))
    return root


def records(out: Path, suite: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / suite / "records").glob("*.json"))]


@pytest.mark.parametrize("name", ["lsun_bedroom", "ms_coco"])
def test_every_solver_sfd_and_sfd_v_run_end_to_end(name, pipelines, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(SUITES, name, lambda: tiny(name, pooled=True))
    rng = np.random.default_rng(1)
    a = rng.normal(size=(48, 8))
    np.savez(get_suite(name).reference_path("pooled-pixels"), mu=rng.normal(size=48), sigma=a @ a.T + np.eye(48))
    out = tmp_path / "results"
    methods = [*SOLVERS, "sfd", "sfd-v"]
    rounds = ["--set", "sfd.micro_batch=3", "--set", "sfd-v.micro_batch=3"] if name == "ms_coco" else []
    code = cli(monkeypatch, "run", "--suite", name, "--teacher", str(pipelines[name]), "--methods", ",".join(methods),
               "--nfe", "2", "--samples", "4", "--out", str(out), *FAST, *rounds)
    assert code == 0, capsys.readouterr().err
    recs = records(out, name)
    assert {r["method"] for r in recs} == set(methods)
    guided = name == "ms_coco"
    for r in recs:
        assert r["nfe"] == 2 and r["n_samples"] == 4
        assert r["nfe_counted"] == (4 if guided else 2)  # classifier-free guidance: 2 network evaluations per call
        assert np.isfinite(r["metrics"]["fid"]) and r["metrics"]["fid"] > 0
        if guided:
            assert 0 <= r["metrics"]["clip_score"] <= 100
        else:
            assert "clip_score" not in r["metrics"]
        assert r["assets"]["teacher"]["source"].endswith("(--teacher)")
        if r["group"] == "distillation":
            assert r["fine_tuning"]["flops"] > 0 and r["hyperparameters"]["schedule"] == "discrete"
            assert r["hyperparameters"]["sigma_min"] == (0.1 if guided else 0.006)
            assert r["hyperparameters"].get("micro_batch") == (3 if guided else None)  # SD: batch 4 in rounds 3 + 1
    if guided:
        capsys.readouterr()
        assert cli(monkeypatch, "table", "--suite", name, "--results", str(out)) == 0
        table = capsys.readouterr().out.lower()
        header = next(line for line in table.splitlines() if "| method" in line)
        assert "fid" in header and "clip score" in header


def test_grids_sigma_ranges_and_hyperparameters():
    from sfdbench.methods import get_method

    coco, lsun = get_suite("ms_coco"), get_suite("lsun_bedroom")
    assert coco.latent_shape == (4, 64, 64) and coco.image_size == 512 and coco.guidance == 7.5
    assert lsun.latent_shape == (3, 64, 64) and lsun.image_size == 256 and lsun.guidance == 1.0
    assert coco.sigma_max == pytest.approx(14.61, abs=0.01) and coco.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert lsun.sigma_max == pytest.approx(83.8, abs=0.1) and lsun.sigma_min == pytest.approx(0.0388, abs=1e-4)
    for suite, guidance in ((coco, 7.5), (lsun, None)):
        grid = {e.method: e for e in suite.default_grid}
        assert grid["sfd"].nfes == (2, 3, 4, 5) and grid["sfd-v"].nfes == (2, 3, 4, 5)
        assert "dpmpp2m" in grid and "dpmpp3m" in grid
        assert all(e.guidance == guidance for e in suite.default_grid)
    sfd = get_method("sfd").hyperparameters(coco, 2)
    assert (sfd["sigma_min"], sfd["schedule"], sfd["rho"], sfd["batch"]) == (0.1, "discrete", 1.0, 128)
    assert get_method("sfd").hyperparameters(lsun, 3)["sigma_min"] == 0.006
    dpm = get_method("dpmpp3m").hyperparameters(coco, 5)
    assert (dpm["schedule"], dpm["thresholding"], dpm["sigma_min"]) == ("discrete", False, coco.sigma_min)
    assert coco.default_samples == 30_000 and coco.conditional and not lsun.conditional


def test_captions_cfg_branch_and_text_embeddings_once_per_caption(pipelines, cache):
    from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser

    suite = get_suite("ms_coco")
    teacher = suite.load_teacher(pipelines["ms_coco"])
    cond = suite.conditioning(torch.Generator().manual_seed(0), 3)
    assert cond["caption_index"].item() == 3 and suite.caption(3) == PROMPTS[3]
    assert suite.unconditional({"caption_index": torch.tensor([2, 5])})["caption_index"].tolist() == [-1, -1]
    text = teacher.net.text
    counted = CountingDenoiser(teacher)
    guided = ClassifierFreeGuidance(counted, 7.5, suite.unconditional)
    x = torch.randn(4, *SD_LATENT)
    idx = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        first = guided(x, torch.tensor(3.0), caption_index=idx)
        again = guided(x, torch.tensor(3.0), caption_index=idx)
        cond_only = teacher(x, torch.tensor(3.0), caption_index=idx)
    assert torch.equal(first, again)
    assert text.encoded == 3  # captions 0, 1 and the empty prompt, each encoded once
    assert counted.samples == 2 * 2 * 4  # two guided calls, 2 network evaluations per sample each
    assert (first - cond_only).abs().max() > 1e-4  # guidance changes the output
    batch = suite.training_conditioning(64, torch.Generator().manual_seed(0))["caption_index"]
    assert batch.min() >= 0 and batch.max() < len(PROMPTS) and len(batch.unique()) == len(PROMPTS)


def test_decoders_map_latents_to_images(pipelines, cache):
    for name, channels in (("lsun_bedroom", 3), ("ms_coco", 3)):
        suite = get_suite(name)
        suite.load_teacher(pipelines[name])
        images = suite.decode(torch.randn(3, *suite.latent_shape))
        assert images.shape == (3, channels, suite.image_size, suite.image_size) and torch.isfinite(images).all()


def test_sfd_v_step_condition_on_the_diffusers_unet(pipelines, cache):
    from diffusers.models.resnet import ResnetBlock2D

    from sfdbench.networks.adapters import StepConditioned, attach_step_condition

    suite = get_suite("ms_coco")
    teacher = suite.load_teacher(pipelines["ms_coco"])
    student = attach_step_condition(teacher, seed=0)
    assert isinstance(student.net, StepConditioned)
    blocks = [m for m in teacher.net.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert len(student.net.step_proj) == len(blocks) > 0
    assert student.net.step_map[0].in_features == teacher.net.unet.config.block_out_channels[0]
    x = torch.randn(2, *SD_LATENT)
    cond = {"caption_index": torch.tensor([0, 1])}
    with torch.no_grad():
        base = teacher(x, torch.tensor(2.0), **cond)
        same = student(x, torch.tensor(2.0), **cond)
        n4 = student(x, torch.tensor(2.0), **cond, step_condition=4)
        n6 = student(x, torch.tensor(2.0), **cond, step_condition=6)
    assert torch.allclose(base, same, atol=1e-6)  # without a step condition: the teacher
    assert (n4 - n6).abs().max() > 1e-5 and (n4 - base).abs().max() > 1e-5
    assert student.net.net.text is teacher.net.text  # the text cache is shared, never copied or trained
    assert not any(k.startswith("net.text") for k in student.state_dict())


def test_clip_score_of_the_streaming_rows_equals_the_hand_formula(pipelines, cache):
    suite = get_suite("ms_coco")
    suite.load_teacher(pipelines["ms_coco"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, SD_IMAGE, SD_IMAGE), dtype=torch.uint8, generator=g)
    idx = torch.tensor([5, 0, 3, 1, 4, 2])
    rows = {}
    for s in (0, 4):  # two batches, concatenated in sample order as the sampler does
        part = suite.summarize(images[s:s + 4], {"caption_index": idx[s:s + 4]})
        for k, v in part.items():
            rows.setdefault(k, []).append(v)
    rows = {k: torch.cat(v) for k, v in rows.items()}
    assert rows["inception"].shape == (6, 2048) and rows["inception"].dtype == torch.float32
    metrics = suite.evaluate_summaries(rows)
    clip = suite.clip_model()
    from torchvision.transforms.functional import to_pil_image

    with torch.no_grad():
        pix = torch.stack([clip.preprocess(to_pil_image(im)) for im in images])
        e_img = clip.model.encode_image(pix).double()
        e_txt = clip.model.encode_text(clip.tokenizer([PROMPTS[i] for i in idx])).double()
    cos = (e_img / e_img.norm(dim=-1, keepdim=True) * (e_txt / e_txt.norm(dim=-1, keepdim=True))).sum(-1)
    hand = float((100 * cos.clamp_min(0)).mean())
    assert metrics["clip_score"] == pytest.approx(hand, rel=1e-6, abs=1e-6)
    shuffled = suite.evaluate_summaries({**rows, "clip_cos": rows["clip_cos"].flip(0) * 0.5})
    assert shuffled["clip_score"] != pytest.approx(hand, rel=1e-3)
    assert metrics["fid"] == pytest.approx(suite.evaluate(images, {"caption_index": idx})["fid"], rel=1e-9)


def test_reference_build_streams_and_caches(cache, tmp_path, monkeypatch, capsys):
    import PIL.Image

    from sfdbench.metrics.fid import fid_statistics
    from sfdbench.suites.latent import center_crop_resize

    folder = tmp_path / "bedrooms"
    (folder / "sub").mkdir(parents=True)
    g = np.random.default_rng(1)
    sizes = [(20, 24), (16, 16), (30, 18), (17, 17), (40, 32)]
    for i, (w, h) in enumerate(sizes):
        arr = g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        PIL.Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    suite = get_suite("lsun_bedroom")
    target = suite.reference_path()
    target.unlink()
    assert cli(monkeypatch, "reference", "build", "--suite", "lsun_bedroom", "--images", str(folder),
               "--batch", "2") == 0
    meta = json.loads(target.with_suffix(".json").read_text())
    assert meta["n_images"] == 5 and meta["suite"] == "lsun_bedroom" and "command" in meta
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    u8 = torch.from_numpy(np.stack([center_crop_resize(PIL.Image.open(f), LDM_IMAGE) for f in files]))
    expected = fid_statistics(suite.feature_space().features(u8))
    got = np.load(target)
    assert np.allclose(got["mu"], expected["mu"], rtol=1e-6, atol=1e-9)
    assert np.allclose(got["sigma"], expected["sigma"], rtol=1e-5, atol=1e-9)
    stamp = target.stat().st_mtime_ns
    assert cli(monkeypatch, "reference", "build", "--suite", "lsun_bedroom", "--images", str(folder)) == 0
    assert target.stat().st_mtime_ns == stamp  # cached: an unchanged folder is not recomputed
    assert cli(monkeypatch, "reference", "build", "--suite", "lsun_bedroom", "--images", str(tmp_path / "nope")) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_offline_run_without_assets_lists_each_missing_asset(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert cli(monkeypatch, "run", "--suite", "ms_coco", "--out", str(tmp_path / "r")) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    missing = [line for line in lines if line.strip().startswith("missing ")]
    assert len(lines) == 1 + len(missing) and len(missing) == 5
    text = "\n".join(missing)
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in text
    assert "sfdbench assets download ms-coco-captions-30k" in text
    assert "sfdbench assets download inception-v3-compat" in text
    assert "sfdbench reference build --suite ms_coco --images DIR" in text
    assert "sfdbench assets download clip-vit-g14-laion2b" in text
    assert not (tmp_path / "r").exists()


def test_bad_teacher_folder_is_bad_input(cache, tmp_path, monkeypatch, capsys):
    (tmp_path / "notapipe").mkdir()
    assert cli(monkeypatch, "run", "--suite", "lsun_bedroom", "--teacher", str(tmp_path / "notapipe"), "--methods",
               "ddim", "--nfe", "2", "--samples", "2", "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diffusers pipeline folder" in err


def test_pickled_weights_are_refused_by_default(pipelines, tmp_path, cache):
    import shutil

    from sfdbench.errors import BadInput

    copy = tmp_path / "pickled"
    shutil.copytree(pipelines["lsun_bedroom"], copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BadInput, match="pickled weights are refused"):
        get_suite("lsun_bedroom").load_teacher(copy)
