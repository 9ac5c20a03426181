"""Our solvers on the wrapped U-Net equal diffusers' own samplers on the same latents and prompts.

What is compared (``docs/suites.md#latent-suites``, "equality with diffusers"):

* both sides get the same discrete timesteps: diffusers' ``scheduler.timesteps`` after ``set_timesteps(T)``;
  our schedule is sigma_i = sqrt((1 - abar[t_i]) / abar[t_i]) at those timesteps plus the final level
  (DDIM with ``set_alpha_to_one=False``: abar[0]; DPM-Solver++ with ``final_sigmas_type="sigma_min"``: the same
  sigma(t=0)), so our wrapper feeds the U-Net c_noise = M tau(sigma) - 1 = t_i exactly (up to float64 rounding);
* states map as x_VP = x_EDM / sqrt(1 + sigma^2): diffusers starts from z * sigma_0 / sqrt(1 + sigma_0^2) (its
  ``init_noise_sigma`` is 1) where we start from z * sigma_0, and its final latents are compared with ours
  divided by sqrt(1 + sigma_final^2);
* DDIM (eta 0) = our Euler; ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint",
  lower_order_final=True, use_karras_sigmas=False, thresholding=False)`` = our ``dpmpp_multistep`` with
  ``predict_x0=True, lower_order_final=True, thresholding=False`` (same orders for T >= 3 steps: 1, 2, ..., then
  2 and 1 at the end; they differ at T = 2 with max order 3, where diffusers ends with order 1);
* guidance: ``StableDiffusionPipeline(..., guidance_scale=w, output_type="latent")`` against our
  ``ClassifierFreeGuidance`` with the empty prompt as the unconditional branch.

Relative difference = max |ours - diffusers| / max |diffusers| over all latents; the tolerance is 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from latent_tiny import PROMPTS, quiet, write_ldm, write_sd

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser
from sfdbench.suites.latent import lsun_bedroom, ms_coco

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
TOL = 1e-4
STEPS = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"ldm": write_ldm(root / "ldm"), "sd": write_sd(root / "sd")}


def scheduler(kind: str, config: dict, order: int = 2):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint", lower_order_final=True,
        use_karras_sigmas=False, final_sigmas_type="sigma_min", thresholding=False)


def our_sigmas(vp, timesteps) -> torch.Tensor:
    abar = vp.alphas_cumprod
    ts = [int(t) for t in timesteps] + [0]
    return torch.tensor([math.sqrt((1 - abar[t]) / abar[t]) for t in ts], dtype=torch.float64)


def ours(kind: str, denoiser, z: torch.Tensor, sigmas: torch.Tensor, cond: dict, order: int = 2) -> torch.Tensor:
    if kind == "ddim":
        x = solvers.sample(solvers.euler, denoiser, z, sigmas, cond=cond)
    else:
        x = solvers.sample(solvers.dpmpp_multistep, denoiser, z, sigmas, cond=cond, max_order=order,
                           predict_x0=True, lower_order_final=True, thresholding=False)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # EDM state -> VP latents


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ldm_case(folder, kind: str, order: int = 2) -> dict:
    quiet()
    suite = lsun_bedroom((3, 8, 8), 16)
    teacher = suite.load_teacher(folder)
    unet = teacher.net.unet
    sch = scheduler(kind, dict(_scheduler_config(folder)), order)
    sch.set_timesteps(STEPS)
    sigmas = our_sigmas(suite.discrete_vp, sch.timesteps)
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = z * float(sigmas[0]) / math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
        mine = ours(kind, teacher, z, sigmas, {}, order)
    return {"suite": "lsun_bedroom (UNet2DModel)", "sampler": _name(kind, order), "guidance": 1.0,
            "diffusers": f"{type(sch).__name__} manual loop", "rel": rel(mine, x)}


def sd_case(folder, kind: str, guidance: float, order: int = 2) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet()
    suite = ms_coco((4, 8, 8), 16)
    suite._captions = list(PROMPTS)
    teacher = suite.load_teacher(folder)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=CLIPTextModel.from_pretrained(
            folder / "text_encoder"), tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=scheduler(kind, dict(_scheduler_config(folder)), order), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(suite.discrete_vp, pipe.scheduler.timesteps)
    n = 4
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    start = z * float(sigmas[0]) / math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS[:n], num_inference_steps=STEPS, guidance_scale=guidance, latents=start.clone(),
                      output_type="latent", height=16, width=16).images
        counted = CountingDenoiser(teacher)
        denoiser = counted if guidance == 1.0 else ClassifierFreeGuidance(counted, guidance, suite.unconditional)
        mine = ours(kind, denoiser, z, sigmas, {"caption_index": torch.arange(n)}, order)
    per_call = 1 if guidance == 1.0 else 2
    assert counted.samples == n * STEPS * per_call  # CFG counted exactly: 2 network evaluations per guided call
    return {"suite": "ms_coco (StableDiffusionPipeline)", "sampler": _name(kind, order), "guidance": guidance,
            "diffusers": f"StableDiffusionPipeline + {type(pipe.scheduler).__name__}", "rel": rel(mine, theirs)}


def _scheduler_config(folder):
    from diffusers import DDIMScheduler

    return DDIMScheduler.load_config(folder / "scheduler")


def _name(kind: str, order: int) -> str:
    return "DDIM (eta 0) = Euler" if kind == "ddim" else f"DPM-Solver++({order}M)"


CASES = [("ddim", 2), ("dpmpp", 2), ("dpmpp", 3)]


@pytest.mark.parametrize("kind,order", CASES)
def test_ldm_solvers_equal_diffusers_schedulers(folders, kind, order):
    row = ldm_case(folders["ldm"], kind, order)
    assert row["rel"] <= TOL, row


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("kind,order", CASES)
def test_sd_solvers_equal_the_stable_diffusion_pipeline(folders, kind, order, guidance):
    row = sd_case(folders["sd"], kind, guidance, order)
    assert row["rel"] <= TOL, row


def test_a_different_prompt_changes_the_result(folders):
    """The comparison is sensitive: captions shifted by one give a clearly different result."""
    suite = ms_coco((4, 8, 8), 16)
    suite._captions = list(PROMPTS)
    teacher = suite.load_teacher(folders["sd"])
    sigmas = suite.discrete_vp.schedule(4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    guided = ClassifierFreeGuidance(teacher, 7.5, suite.unconditional)
    with torch.no_grad():
        a = solvers.sample(solvers.euler, guided, z, sigmas, cond={"caption_index": torch.tensor([0, 1])})
        b = solvers.sample(solvers.euler, guided, z, sigmas, cond={"caption_index": torch.tensor([1, 2])})
    assert rel(a, b) > 1e-3


def equality_table(root) -> list[dict]:
    """Every row of the comparison (for the report: ``python tests/test_diffusers_equality.py``)."""
    from pathlib import Path

    root = Path(root)
    ldm, sd = write_ldm(root / "ldm"), write_sd(root / "sd")
    rows = [ldm_case(ldm, k, o) for k, o in CASES]
    rows += [sd_case(sd, k, w, o) for k, o in CASES for w in (1.0, 7.5)]
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("| suite | diffusers side | our sampler | guidance | max rel. diff |")
        print("|---|---|---|---|---|")
        for r in equality_table(tmp):
            print(f"| {r['suite']} | {r['diffusers']} | {r['sampler']} | {r['guidance']:g} | {r['rel']:.2e} |")
