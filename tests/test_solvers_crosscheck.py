"""Cross-check sfdbench's ODE solvers against diffusers' reference schedulers.

Both sides are driven with the SAME analytic denoiser (the exact posterior mean of a small
Gaussian mixture, smooth and nonlinear in x) and the SAME sigma sequence, in float64, and
the states are compared step by step.

Conventions (EDM, Karras et al. 2022): our state is x = x0 + sigma * eps ("VE" scaling) and
the model is D(x, sigma) -> x0_hat. diffusers is fed an epsilon-prediction model,
eps = (x_ve - D(x_ve, sigma)) / sigma, always evaluated at the VE (unscaled) state and at the
scheduler's current sigma.

* Euler/Heun (``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``) keep the sample in VE
  scaling; ``scale_model_input`` only scales the *network input* by 1/sqrt(1 + sigma^2), which
  an EDM denoiser undoes, so we evaluate D at the unscaled sample.
* ``DPMSolverMultistepScheduler`` keeps the sample in VP scaling:
  x_vp = x_ve / sqrt(1 + sigma^2) (alpha_t = 1/sqrt(1+sigma^2), sigma_t = sigma * alpha_t), so
  we convert on the way in and out. Its lambda = ln(alpha_t / sigma_t) = -ln(sigma), the same
  lambda our VE-form DPM-Solver++ uses.

How the sigma lists are made identical:

* Euler: ``set_timesteps(sigmas=...)`` takes our full list (no sigma = 0 is appended); it is
  stored as float32, so we read ``scheduler.sigmas`` back and give exactly those values
  (as float64) to our solver.
* Heun: ``set_timesteps`` has no ``sigmas`` argument. We let it build its Karras (= our
  ``polynomial``, rho = 7) or exponential (= our ``logsnr``) schedule, read the distinct sigmas
  back (its list is [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]) and compare the states after each
  full Heun step, i.e. before the final Euler step to sigma = 0 that diffusers always appends.
* DPM-Solver: no ``sigmas`` argument either. With ``final_sigmas_type="sigma_min"`` and the
  default "linspace" timestep spacing, diffusers' K steps run over K + 1 *distinct* sigmas
  ending at the training sigma_min > 0 (with Karras/exponential sigmas the last two would
  coincide), which we read back and feed to our solver with N = K + 1 timestamps.

Order rule (``lower_order_final``): ours uses p_i = i + 1 during warm-up (i + 1 < max_order)
and min(max_order, N - (i + 1)) afterwards, for every N. diffusers warms up the same way but
lowers the order at the end only for K < 15 steps (last step order 1 even inside the warm-up,
second to last <= 2; ``euler_at_final`` forces only the order-1 last step for any K). The rules
coincide for every K < 15 except (max_order = 3, K = 2), and for K >= 15 only for max_order = 1
or max_order = 2 with ``euler_at_final=True``; ``test_dpmpp_order_rule_differs`` documents the
cases where they legitimately differ.

The schedulers added for issue 3 (drivers below; each test says what coincides and what not):

* ``DDIMScheduler`` (eta = 0) keeps the VP sample x_vp = sqrt(abar) x_ve; its update
  sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps, divided by sqrt(abar_prev), is
  x_ve + (sigma_prev - sigma) eps: exactly our Euler step on sigma = sqrt((1 - abar)/abar) of its
  timesteps. "leading" spacing with steps_offset = 1 (Stable Diffusion's setting) so that its
  prev_timestep = t - 1000 // K is the next listed timestep, and set_alpha_to_one=False so the
  last sigma is sigma(abar_0) > 0. Its alphas_cumprod table is upcast to float64 (exact).
* ``KDPM2DiscreteScheduler`` is DPM-Solver-2 with r = 1/2: sigma_interpol is the geometric mean
  of consecutive sigmas (the log-sigma midpoint), and the two half steps are our predictor and
  x_{i+1} = x_i + (t_{i+1} - t_i) d_mid. It coincides; its sigmas_interpol stays float32
  (computed inside set_timesteps), which limits agreement to ~1e-7.
* ``UniPCMultistepScheduler`` (VP sample like DPM-Solver) corrects x_k inside the step call at
  index k with the model value at the predicted x_k, then predicts x_{k+1}; the corrected state is
  ``last_sample``. Its order rule min(max_order, k + 1, K - k) coincides with ours except during
  the warm-up at the very end (K = 2, order 3); it never corrects the final state, as ours.
* ``DEISMultistepScheduler`` implements only "logrho" DEIS: eps interpolated by a Lagrange
  polynomial in ln(sigma) and integrated exactly in sigma. The reference's (and our default) tAB
  interpolates in the VP time s instead, so from order 2 on the two differ; our
  ``multistep_coefficients(..., "log_sigma")`` is diffusers' method and is compared at 1e-5.

Precision: diffusers stores ``scheduler.sigmas`` as float32 and computes dt, alpha_t, lambda and
h from them in float32. After ``set_timesteps`` we upcast that tensor to float64 (an exact
conversion: the sigma values, which our solver also gets, do not change), so diffusers'
coefficient arithmetic runs in float64 (``float64_sigmas``). Without it a single DPM-Solver++
step from sigma = 157 to 0.01 already differs by 1.1e-5 (1.1e-9 with it), purely from float32
coefficients. diffusers' Euler and DPM ``step`` still cast the *sample* to float32, so
agreement is ~1e-7 relative, not 1e-15 (Heun, which has no cast, agrees to round-off). The
tolerance is 1e-5 relative to the largest entry of the reference state (``rel_diff``).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.schedulers.scheduling_ddim import DDIMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_deis_multistep import DEISMultistepScheduler  # noqa: E402
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler  # noqa: E402
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler  # noqa: E402

from sfdbench.diffusion import schedules, solvers  # noqa: E402
from sfdbench.diffusion.denoiser import batch_sigma  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver is deprecated:FutureWarning"),
    # diffusers' DEIS applies np.log to torch tensors
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

DTYPE = torch.float64
RTOL = 1e-5
SHAPE = (3, 1, 4, 4)  # [B, C, H, W]; diffusers' thresholding needs a channel dimension


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class GaussianMixtureDenoiser:
    """Exact denoiser E[x0 | x0 + sigma * n = x] of p(x0) = sum_k w_k N(mu_k, v_k I) on R^d.

    Given component k, x ~ N(mu_k, (v_k + sigma^2) I) and E[x0 | x, k] = mu_k + v_k / (v_k +
    sigma^2) (x - mu_k); the responsibilities make D smooth but nonlinear in x."""

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor):
        self.means = means.to(DTYPE)  # [K, *sample_shape]
        self.variances = variances.to(DTYPE)  # [K]
        self.log_weights = torch.log(weights.to(DTYPE) / weights.sum())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        b, k = x.shape[0], self.means.shape[0]
        sig = batch_sigma(sigma, x)  # [B]
        xf = x.reshape(b, 1, -1)
        mu = self.means.reshape(1, k, -1)
        var = self.variances[None, :] + sig[:, None] ** 2  # [B, K]
        dim = xf.shape[-1]
        logits = self.log_weights[None, :] - 0.5 * ((xf - mu) ** 2).sum(-1) / var - 0.5 * dim * torch.log(var)
        # exp(logits - logsumexp) == softmax; torch.softmax is ~1000x slower on tiny CPU tensors here
        resp = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))  # [B, K]
        post = mu + (self.variances[None, :] / var)[..., None] * (xf - mu)  # [B, K, d]
        return (resp[..., None] * post).sum(1).reshape(x.shape)


def make_denoiser(scale: float = 1.0) -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(1234)
    means = scale * torch.randn(3, *SHAPE[1:], generator=g, dtype=DTYPE)
    return GaussianMixtureDenoiser(means, torch.tensor([0.05, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2]))


def make_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (relative to the state's scale; entries near 0 do not blow up)."""
    return ((a - ref).abs().max() / ref.abs().max()).item()


# test function -> the largest max_rel_diff it measured (``python tests/test_solvers_crosscheck.py``
# prints them as the cross-check table)
MEASURED: dict[str, float] = {}


def max_rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    value = max(rel_diff(o, t) for o, t in zip(ours, theirs, strict=True))
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split("[")[0].split(" ")[0]
    MEASURED[test] = max(MEASURED.get(test, 0.0), value)
    return value


def eps_model(denoiser, x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.to(DTYPE)
    return (x_ve - denoiser(x_ve, sigma)) / sigma


def float64_sigmas(sched) -> torch.Tensor:
    """Upcast the scheduler's float32 sigmas in place (exact) so its step arithmetic is float64."""
    sched.sigmas = sched.sigmas.to(DTYPE)
    return sched.sigmas


# --------------------------------------------------------------------------------------------
# drivers: run a diffusers scheduler to the end of *our* sigma list, return the VE states


def diffusers_euler(denoiser, latents, sigmas_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sigmas actually used, [N, *shape] states at those sigmas)."""
    sched = EulerDiscreteScheduler(prediction_type="epsilon")
    sched.set_timesteps(sigmas=sigmas_in.tolist())
    sched.set_begin_index(0)  # timesteps may repeat (clipped at 0); step by index instead
    sigmas = float64_sigmas(sched)
    assert len(sigmas) == len(sigmas_in)  # nothing appended: the last sigma is ours
    x = latents * sigmas[0]
    states = [x]
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # protocol only; D is evaluated at the unscaled sample
        sigma = sched.sigmas[sched.step_index]
        x = sched.step(eps_model(denoiser, x, sigma), t, x).prev_sample
        assert x.dtype == DTYPE
        states.append(x)
    return sigmas, torch.stack(states)


def diffusers_heun(denoiser, latents, n: int, spacing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct sigmas; returns (sigmas, states after each full Heun step), i.e. without
    diffusers' final Euler step to sigma = 0."""
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"use_exponential_sigmas": True}
    sched = HeunDiscreteScheduler(prediction_type="epsilon", **kw)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    assert sched.sigmas[-1] == 0 and len(sched.sigmas) == 2 * n
    sigmas = float64_sigmas(sched)[0::2]  # [s0, s1, ..., s_{n-1}]
    x = latents * sigmas[0]
    states = [x]
    for k, t in enumerate(sched.timesteps[:-1]):  # the last timestep is the Euler step to 0
        sched.scale_model_input(x, t)
        sigma = sched.sigmas[sched.step_index]  # sigma of the evaluation (predictor or corrector)
        x = sched.step(eps_model(denoiser, x, sigma), t, x).prev_sample
        if k % 2 == 1:  # after the corrector: the state at sigma_{(k+1)/2}
            states.append(x)
    return sigmas, torch.stack(states)


def vp_multistep_scheduler(scheduler_cls, num_steps: int, **config):
    """A diffusers multistep scheduler set to ``num_steps`` steps over num_steps + 1 distinct sigmas
    (read back in float64), and the VP<->VE scale sqrt(1 + sigma^2) at each of them."""
    sched = scheduler_cls(**config)
    sched.set_timesteps(num_steps)
    sched.set_begin_index(0)
    sigmas = float64_sigmas(sched)
    assert len(sigmas) == num_steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all())
    return sched, sigmas, torch.sqrt(1 + sigmas**2)


def diffusers_dpm(denoiser, latents, num_steps: int, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """num_steps steps over num_steps + 1 distinct sigmas (final_sigmas_type="sigma_min")."""
    config = {"prediction_type": "epsilon", "final_sigmas_type": "sigma_min", "thresholding": False, **config}
    sched, sigmas, vp_scale = vp_multistep_scheduler(DPMSolverMultistepScheduler, num_steps, **config)
    x_ve = latents * sigmas[0]
    x_vp = x_ve / vp_scale[0]
    states = [x_ve]
    for k, t in enumerate(sched.timesteps):
        x_ve = x_vp * vp_scale[k]
        x_vp = sched.step(eps_model(denoiser, x_ve, sigmas[k]), t, x_vp).prev_sample
        assert sched.step_index == k + 1 and x_vp.dtype == DTYPE
        states.append(x_vp * vp_scale[k + 1])
    return sigmas, torch.stack(states)


def ours(solver, denoiser, latents, sigmas, **options) -> torch.Tensor:
    states = solvers.trajectory(solver, denoiser, latents * sigmas[0], sigmas, **options)
    final = solvers.sample(solver, denoiser, latents, sigmas, **options)
    assert torch.equal(final, states[-1])
    return states


# --------------------------------------------------------------------------------------------


# n = 2 is a single step from 80 to 0.002: x (~200) shrinks to O(1), so the float32 cast of the
# sample inside diffusers' step shows up at ~7e-6 relative; every longer run agrees to ~1e-6
@pytest.mark.parametrize("schedule", ["polynomial", "logsnr"])
@pytest.mark.parametrize("n", [2, 4, 7, 13, 26])
def test_euler_matches_diffusers_euler(schedule, n):
    den, z = make_denoiser(), make_latents()
    sigmas, theirs = diffusers_euler(den, z, schedules.get_schedule(schedule, n, 0.002, 80.0))
    mine = ours(solvers.euler, den, z, sigmas, afs=False)
    assert mine.shape == theirs.shape == (n, *SHAPE)
    assert max_rel_diff(mine, theirs) <= RTOL
    assert rel_diff(mine[-1], theirs[-1]) <= RTOL


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("n", [2, 3, 6, 11])
def test_heun_matches_diffusers_heun(spacing, n):
    den, z = make_denoiser(), make_latents(1)
    sigmas, theirs = diffusers_heun(den, z, n, spacing)
    # diffusers' Karras / exponential sigmas are our polynomial (rho = 7) / logsnr schedules
    # over its training range, up to float32 rounding
    kind = "polynomial" if spacing == "karras" else "logsnr"
    expected = schedules.get_schedule(kind, n, float(sigmas[-1]), float(sigmas[0]))
    torch.testing.assert_close(sigmas, expected, rtol=1e-6, atol=0)
    mine = ours(solvers.heun, den, z, sigmas, afs=False)
    assert mine.shape == theirs.shape == (n, *SHAPE)
    assert max_rel_diff(mine, theirs) <= RTOL


# (max_order, diffusers steps K, extra diffusers config): cases where both order rules coincide
DPM_CASES = [
    (1, 1, {}), (1, 5, {}), (1, 12, {}), (1, 20, {}),
    (2, 2, {}), (2, 3, {}), (2, 6, {}), (2, 12, {}),
    # K >= 15: diffusers no longer lowers the order at the end, except with euler_at_final,
    # which for max_order = 2 reproduces our rule (last step 1st order, the one before 2nd)
    (2, 20, {"euler_at_final": True}),
    (3, 1, {}), (3, 3, {}), (3, 4, {}), (3, 6, {}), (3, 9, {}), (3, 14, {}),
]


@pytest.mark.parametrize("max_order,num_steps,extra", DPM_CASES)
def test_dpmpp_data_prediction_matches_diffusers(max_order, num_steps, extra):
    den, z = make_denoiser(), make_latents(2)
    sigmas, theirs = diffusers_dpm(den, z, num_steps, algorithm_type="dpmsolver++", solver_order=max_order, **extra)
    mine = ours(solvers.dpmpp_multistep, den, z, sigmas, afs=False, max_order=max_order,
                lower_order_final=True, predict_x0=True, thresholding=False)
    assert mine.shape == theirs.shape == (num_steps + 1, *SHAPE)
    assert max_rel_diff(mine, theirs) <= RTOL


# Noise-prediction mode: diffusers' algorithm_type="dpmsolver" (multistep DPM-Solver, "midpoint"
# 2nd-order and the 3rd-order multistep update) in VP form,
#   x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_0 - 0.5 sigma_t (e^h - 1) D1 [- ...],
# becomes, divided by alpha_t, x_t = x_s - t (e^h - 1) eps_0 - 0.5 t (e^h - 1) D1 in VE form,
# which is term by term our predict_x0=False update (phi_1 = expm1(h), phi_2 = phi_1/h - 1,
# phi_3 = phi_2/h - 0.5). The noise prediction eps_hat = (x - D)/sigma is the same in both
# scalings, so the formulas coincide and the comparison needs no extra tolerance.
@pytest.mark.parametrize("max_order,num_steps", [(1, 6), (2, 3), (2, 8), (3, 5), (3, 10)])
def test_dpm_noise_prediction_matches_diffusers_dpmsolver(max_order, num_steps):
    den, z = make_denoiser(), make_latents(3)
    sigmas, theirs = diffusers_dpm(den, z, num_steps, algorithm_type="dpmsolver", solver_order=max_order)
    mine = ours(solvers.dpmpp_multistep, den, z, sigmas, max_order=max_order, predict_x0=False)
    assert max_rel_diff(mine, theirs) <= RTOL


@pytest.mark.parametrize("max_order,num_steps", [(1, 5), (2, 6), (3, 8)])
def test_dpmpp_dynamic_thresholding_matches_diffusers(max_order, num_steps):
    # mixture means of size ~2.5, so x0 estimates leave [-1, 1] and thresholding is active;
    # sample_max_value is huge so diffusers' upper clamp of s (absent in ours) never acts
    den, z = make_denoiser(scale=2.5), make_latents(4)
    sigmas, theirs = diffusers_dpm(den, z, num_steps, algorithm_type="dpmsolver++", solver_order=max_order,
                                   thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e6)
    opts = {"max_order": max_order, "predict_x0": True}
    mine = ours(solvers.dpmpp_multistep, den, z, sigmas, thresholding=True, **opts)
    assert max_rel_diff(mine, theirs) <= RTOL
    unthresholded = ours(solvers.dpmpp_multistep, den, z, sigmas, thresholding=False, **opts)
    assert rel_diff(unthresholded[-1], mine[-1]) > 1e-2  # the test exercises the clipping


@pytest.mark.parametrize("max_order,num_steps", [(3, 2), (2, 20), (3, 20)])
def test_dpmpp_order_rule_differs(max_order, num_steps):
    """Documented, legitimate differences of the lower_order_final rule (not bugs):

    * K = 2 steps, max_order = 3: ours is still in warm-up at the last step (i + 1 = 2 <
      max_order, so order 2, as in the DPM-Solver reference code); diffusers forces order 1
      on the last step.
    * K = 20 >= 15 steps: diffusers only lowers the final orders for K < 15, so its last step
      is of order max_order; ours lowers it for every N (last step order 1, for max_order = 3
      the one before order 2).

    Every state before the first step that differs agrees to RTOL; the final states differ by
    far more than RTOL."""
    den, z = make_denoiser(), make_latents(5)
    sigmas, theirs = diffusers_dpm(den, z, num_steps, algorithm_type="dpmsolver++", solver_order=max_order)
    mine = ours(solvers.dpmpp_multistep, den, z, sigmas, max_order=max_order, thresholding=False)
    n = len(sigmas)
    ours_orders = [solvers.dpmpp_order(i, n, max_order, True) for i in range(n - 1)]
    theirs_orders = [min(i + 1, max_order) for i in range(n - 1)]
    if num_steps < 15:
        theirs_orders[-1] = 1
        theirs_orders[-2] = min(theirs_orders[-2], 2)
    first = next(i for i in range(n - 1) if ours_orders[i] != theirs_orders[i])
    assert max_rel_diff(mine[: first + 1], theirs[: first + 1]) <= RTOL
    assert rel_diff(mine[-1], theirs[-1]) > 100 * RTOL


# --------------------------------------------------------------------------------------------
# issue 3: DDIM, KDPM2 (DPM-Solver-2), UniPC, DEIS, and the discrete VP tables

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def diffusers_ddim(denoiser, latents, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, DDIMScheduler]:
    """K = num_steps DDIM steps (eta = 0) over K + 1 distinct sigmas; VE states."""
    sched = DDIMScheduler(prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading", clip_sample=False, **SD_BETAS)
    sched.set_timesteps(num_steps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(DTYPE)  # exact upcast, float64 step arithmetic
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(DTYPE)
    abar = torch.stack([*(sched.alphas_cumprod[t] for t in sched.timesteps), sched.final_alpha_cumprod])
    sigmas = torch.sqrt((1 - abar) / abar)
    x_ve = latents * sigmas[0]
    states = [x_ve]
    for k, t in enumerate(sched.timesteps):
        x_vp = sched.step(eps_model(denoiser, x_ve, sigmas[k]), t, x_ve * abar[k].sqrt(), eta=0.0).prev_sample
        x_ve = x_vp / abar[k + 1].sqrt()
        states.append(x_ve)
    return sigmas, torch.stack(states), sched


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 50])
def test_ddim_matches_diffusers_ddim(num_steps):
    den, z = make_denoiser(), make_latents(6)
    sigmas, theirs, sched = diffusers_ddim(den, z, num_steps)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    for name in ("euler", "ddim"):
        mine = ours(solvers.SOLVERS[name], den, z, sigmas, afs=False)
        assert max_rel_diff(mine, theirs) <= RTOL
    # its sigmas are our DiscreteVP of its own table at tau = (t + 1) / 1000
    vp = schedules.DiscreteVP(sched.alphas_cumprod)
    torch.testing.assert_close(vp.sigma((sched.timesteps.to(DTYPE) + 1) / 1000), sigmas[:-1], rtol=1e-13, atol=0)


def diffusers_kdpm2(denoiser, latents, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct (Karras) sigmas; the states after each full DPM-Solver-2 step (without
    diffusers' final half step towards sigma = 0)."""
    sched = KDPM2DiscreteScheduler(prediction_type="epsilon", use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = float64_sigmas(sched)[0::2][:n]  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0, 0]
    x = latents * sigmas[0]
    states = [x]
    for k, t in enumerate(sched.timesteps[: 2 * (n - 1)]):
        sched.scale_model_input(x, t)  # initialises the step index; D sees the unscaled sample
        first = sched.state_in_first_order
        sigma = (sched.sigmas[sched.step_index] if first else sched.sigmas_interpol[sched.step_index]).to(DTYPE)
        if not first:  # the evaluation point is the log-sigma midpoint, as in ours
            assert math.isclose(float(sigma), math.sqrt(float(sigmas[k // 2] * sigmas[k // 2 + 1])), rel_tol=1e-6)
        x = sched.step(eps_model(denoiser, x, sigma), t, x).prev_sample
        if k % 2 == 1:
            states.append(x)
    return sigmas, torch.stack(states)


@pytest.mark.parametrize("n", [2, 3, 6, 11])
def test_dpm_solver_2_matches_diffusers_kdpm2(n):
    den, z = make_denoiser(), make_latents(7)
    sigmas, theirs = diffusers_kdpm2(den, z, n)
    mine = ours(solvers.dpm_solver_2, den, z, sigmas, afs=False)
    assert mine.shape == theirs.shape == (n, *SHAPE)
    assert max_rel_diff(mine, theirs) <= RTOL


def diffusers_unipc(denoiser, latents, num_steps: int, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """num_steps steps over num_steps + 1 distinct sigmas; VE states: the corrected x_k (the
    scheduler's ``last_sample`` after the step call at k) and the uncorrected final state."""
    config = {"prediction_type": "epsilon", "final_sigmas_type": "sigma_min", "thresholding": False, **config}
    sched, sigmas, vp_scale = vp_multistep_scheduler(UniPCMultistepScheduler, num_steps, **config)
    x_vp = latents * sigmas[0] / vp_scale[0]
    states = [latents * sigmas[0]]
    for k, t in enumerate(sched.timesteps):
        x_ve = x_vp * vp_scale[k]  # the predicted state: where the model is evaluated
        x_vp = sched.step(eps_model(denoiser, x_ve, sigmas[k]), t, x_vp).prev_sample
        if k >= 1:
            states.append(sched.last_sample * vp_scale[k])
    states.append(x_vp * vp_scale[-1])
    return sigmas, torch.stack(states)


# (max_order, K steps, diffusers config): every case where the order rules coincide
UNIPC_CASES = [
    (1, 1, {}), (1, 5, {}), (2, 2, {}), (2, 6, {}), (3, 1, {}), (3, 3, {}), (3, 8, {}), (3, 20, {}),
    (2, 7, {"solver_type": "bh1"}), (3, 8, {"solver_type": "bh1"}),
    (2, 6, {"predict_x0": False}), (3, 8, {"predict_x0": False}),
    (3, 8, {"lower_order_final": False}),
]


@pytest.mark.parametrize("max_order,num_steps,extra", UNIPC_CASES)
def test_unipc_matches_diffusers_unipc(max_order, num_steps, extra):
    den, z = make_denoiser(), make_latents(8)
    sigmas, theirs = diffusers_unipc(den, z, num_steps, solver_order=max_order, **extra)
    mine = ours(solvers.unipc, den, z, sigmas, afs=False, max_order=max_order, thresholding=False,
                variant=extra.get("solver_type", "bh2"), predict_x0=extra.get("predict_x0", True),
                lower_order_final=extra.get("lower_order_final", True))
    assert mine.shape == theirs.shape == (num_steps + 1, *SHAPE)
    assert max_rel_diff(mine, theirs) <= RTOL


def test_unipc_dynamic_thresholding_matches_diffusers():
    den, z = make_denoiser(scale=2.5), make_latents(9)
    sigmas, theirs = diffusers_unipc(den, z, 8, solver_order=3, thresholding=True, dynamic_thresholding_ratio=0.995,
                                     sample_max_value=1e6)
    mine = ours(solvers.unipc, den, z, sigmas, max_order=3, thresholding=True)
    assert max_rel_diff(mine, theirs) <= RTOL
    plain = ours(solvers.unipc, den, z, sigmas, max_order=3, thresholding=False)
    assert rel_diff(plain[-1], mine[-1]) > 1e-2


def test_unipc_order_rule_differs_at_two_steps_order_three():
    """K = 2, max_order = 3: our (the reference's) rule is still in warm-up at the last step
    (order 2); diffusers' min(max_order, k + 1, K - k) gives order 1. The first state agrees,
    the final one does not."""
    den, z = make_denoiser(), make_latents(10)
    sigmas, theirs = diffusers_unipc(den, z, 2, solver_order=3)
    mine = ours(solvers.unipc, den, z, sigmas, max_order=3, thresholding=False)
    assert [solvers.unipc_order(i, 3, 3, True) for i in range(2)] == [1, 2]
    assert max_rel_diff(mine[:2], theirs[:2]) <= RTOL
    assert rel_diff(mine[-1], theirs[-1]) > 100 * RTOL


def diffusers_deis(denoiser, latents, num_steps: int, **config) -> tuple[torch.Tensor, torch.Tensor]:
    config = {"prediction_type": "epsilon", "lower_order_final": False, **config}
    sched, sigmas, vp_scale = vp_multistep_scheduler(DEISMultistepScheduler, num_steps, **config)
    x_vp = latents * sigmas[0] / vp_scale[0]
    states = [latents * sigmas[0]]
    for k, t in enumerate(sched.timesteps):
        x_vp = sched.step(eps_model(denoiser, x_vp * vp_scale[k], sigmas[k]), t, x_vp).prev_sample
        states.append(x_vp * vp_scale[k + 1])
    return sigmas, torch.stack(states)


@pytest.mark.parametrize("max_order,num_steps", [(1, 5), (2, 3), (2, 8), (3, 4), (3, 10), (3, 20)])
def test_deis_logrho_matches_diffusers_and_tab_differs(max_order, num_steps):
    """diffusers' DEIS ("logrho", lower_order_final off: the reference's order rule
    min(max_order, i + 1)) equals our multistep weights with interpolation in ln(sigma) at every
    order. The reference's tAB (interpolation in VP time) equals it at order 1 (both DDIM) and on
    the first step of every order, and differs from the second step on for orders 2 and 3."""
    den, z = make_denoiser(), make_latents(11)
    sigmas, theirs = diffusers_deis(den, z, num_steps, solver_order=max_order)
    logrho = ours(solvers.deis, den, z, sigmas, max_order=max_order, interpolation="log_sigma")
    assert max_rel_diff(logrho, theirs) <= RTOL
    tab = ours(solvers.deis, den, z, sigmas, max_order=max_order)
    assert max_rel_diff(tab[:2], theirs[:2]) <= RTOL
    if max_order == 1:
        assert max_rel_diff(tab, theirs) <= RTOL
    else:
        assert rel_diff(tab[-1], theirs[-1]) > 1e-3


@pytest.mark.parametrize("name,betas", [("sd", (0.00085, 0.012)), ("ldm", (0.0015, 0.0195))])
def test_discrete_vp_table_matches_diffusers_scaled_linear(name, betas):
    """LDM's "linear" betas are diffusers' "scaled_linear" (square-root spacing); diffusers builds
    the table in float32 (a cumulative product of 1000 factors), hence 1e-5."""
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=betas[0], beta_end=betas[1])
    vp = getattr(schedules.DiscreteVP, name)()
    torch.testing.assert_close(vp.alphas_cumprod, sched.alphas_cumprod.to(DTYPE), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [4, 10, 7])
def test_discrete_schedule_vs_diffusers_linspace_timesteps(n):
    """Our rho = 1 discrete schedule is uniform in tau, i.e. its fractional timesteps M tau - 1 are
    diffusers' "linspace" timesteps linspace(999, 0, N) exactly. The sigmas there: diffusers
    interpolates sigma linearly in t, the reference log alpha; identical at integer timesteps
    (999 / (N - 1) integral: N = 4, 10), ~3e-6 apart at fractional ones (N = 7: 832.5, ...), which is
    below the 1.3e-5 of diffusers' float32 table (1 - abar_0 = 8.5e-4 loses digits), so that
    difference is measured on a float64 emulation of diffusers' interpolation."""
    sched = EulerDiscreteScheduler(timestep_spacing="linspace", **SD_BETAS)
    sched.set_timesteps(n)
    vp = schedules.DiscreteVP.sd()
    mine = schedules.get_schedule("discrete", n, *vp.sigma_range(), vp=vp)
    torch.testing.assert_close(vp.timestep(mine), sched.timesteps.to(DTYPE), rtol=0, atol=1e-9)
    torch.testing.assert_close(mine, sched.sigmas[:-1].to(DTYPE), rtol=5e-5, atol=0)  # diffusers appends 0
    table = torch.sqrt((1 - vp.alphas_cumprod) / vp.alphas_cumprod)
    sigma_linear = torch.from_numpy(np.interp(sched.timesteps.double().numpy(), np.arange(1000), table.numpy()))
    diff = ((mine - sigma_linear).abs() / mine).max().item()
    if 999 % (n - 1) == 0:
        assert diff <= 1e-13
    else:
        assert 1e-7 < diff < 1e-5


# (test, ours, diffusers' scheduler and settings) for the printed table
TABLE = [
    ("test_euler_matches_diffusers_euler", "euler", "EulerDiscreteScheduler (sigmas given)"),
    ("test_ddim_matches_diffusers_ddim", "euler / ddim", "DDIMScheduler (eta 0, VP<->EDM)"),
    ("test_heun_matches_diffusers_heun", "heun", "HeunDiscreteScheduler (karras, exponential)"),
    ("test_dpm_solver_2_matches_diffusers_kdpm2", "dpm2", "KDPM2DiscreteScheduler (karras)"),
    ("test_dpmpp_data_prediction_matches_diffusers", "dpmpp 1-3M", "DPMSolverMultistep dpmsolver++"),
    ("test_dpm_noise_prediction_matches_diffusers_dpmsolver", "dpmpp predict_x0=False",
     "DPMSolverMultistep dpmsolver"),
    ("test_dpmpp_dynamic_thresholding_matches_diffusers", "dpmpp thresholding", "DPMSolverMultistep thresholding"),
    ("test_unipc_matches_diffusers_unipc", "unipc bh1/bh2 1-3", "UniPCMultistepScheduler"),
    ("test_unipc_dynamic_thresholding_matches_diffusers", "unipc thresholding", "UniPCMultistep thresholding"),
    ("test_deis_logrho_matches_diffusers_and_tab_differs", "deis log_sigma 1-3", "DEISMultistepScheduler logrho"),
]

if __name__ == "__main__":
    # The cross-check table: run this module's tests, then print the largest relative difference
    # each comparison measured (every one is also asserted <= RTOL by its test).
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider"])
    measured = sys.modules["test_solvers_crosscheck"].MEASURED  # the module as pytest imported it
    print("\n| ours | diffusers | max relative difference (float64, all cases) |\n|---|---|---|")
    for test, mine, theirs in TABLE:
        print(f"| {mine} | {theirs} | {measured.get(test, float('nan')):.1e} |")
    sys.exit(code)
