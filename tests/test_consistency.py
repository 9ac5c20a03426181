"""CD and ECT (``sfdbench/methods/consistency.py``) against the baseline spec's minimal tests: the
boundary condition and the CM parametrisation, the CD loss at the exact consistency function of a
Gaussian, Heun's local error, shared dropout, the target EMA, ECT's r(t) mapping, stages and loss
weighting, the multistep sampler, and tiny fits (model file, load, counted NFE, budget, resume) on
the digits suite and the toy latent suite."""

import json
import math

import pytest
import torch
import toy_suite
from conftest import FitInterrupted, progress_that_dies

from sfdbench.diffusion.denoiser import CountingDenoiser, EDMPrecond
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, get_method, load_model
from sfdbench.methods.consistency import (
    cd_loss,
    consistency_function,
    consistency_sample,
    ect_loss,
    ect_r,
    ema_update,
    halflife_beta,
    heun_teacher_step,
    sampling_sigmas,
    step_noise,
    warmup_lr,
)
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits import DigitsSuite

EPS, SD = 0.002, 0.5
TINY = {"iterations": 3, "batch": 6, "checkpoint_every": 2}


def tiny_denoiser(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return EDMPrecond(DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16, dropout=dropout))


# ---------------------------------------------------------------------------------------------
# Parametrisation and sampler


def test_boundary_condition_holds_for_any_network_output():
    x = torch.randn(4, 1, 8, 8)
    wild = lambda x, sigma: 100 * torch.randn_like(x)  # noqa: E731
    torch.testing.assert_close(consistency_function(wild, x, EPS, EPS, SD), x, rtol=0, atol=0)
    torch.testing.assert_close(consistency_function(wild, x, torch.full((4,), EPS), EPS, SD), x, rtol=0, atol=0)


def test_wrapping_an_edm_denoiser_is_the_cm_parametrisation():
    """f = c_skip^eps x + c_out^eps F(c_in x, c_noise) with the network F inside EDM's D."""
    den = tiny_denoiser().double()
    x, sigma = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0.01, 0.821, 40.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = SD**2 / ((s - EPS) ** 2 + SD**2)
    c_out = SD * (s - EPS) / (s**2 + SD**2).sqrt()
    with torch.no_grad():
        raw = den.net(x / (s**2 + SD**2).sqrt(), sigma.log() / 4)
        torch.testing.assert_close(consistency_function(den, x, sigma, EPS, SD), c_skip * x + c_out * raw)
        torch.testing.assert_close(consistency_function(den, x, sigma, 0.0, SD), den(x, sigma))  # eps = 0: f = D


def test_sampling_sigmas_rule():
    assert sampling_sigmas(1, 80.0) == [80.0]
    assert sampling_sigmas(2, 80.0) == pytest.approx([80.0, 0.821])
    four = [80.0, math.sqrt(80 * 0.821), 0.821, 0.821 * math.sqrt(0.821 / 80)]
    assert sampling_sigmas(4, 80.0) == pytest.approx(four)


def test_step_noise_is_per_sample_and_unit_gaussian():
    latents = torch.randn(2000, 1, 8, 8)
    z = step_noise(latents, 1)
    torch.testing.assert_close(step_noise(latents[7:8], 1), z[7:8], rtol=0, atol=0)  # batch-independent
    assert not torch.equal(step_noise(latents, 2), z)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([z.flatten(), latents.flatten()]))[0, 1])) < 0.01


def test_multistep_sampler_nfe_and_added_noise_variance():
    """A denoiser whose f is 0 shows the sampler's inputs: step k sees sqrt(tau_k^2 - eps^2) z_k."""
    seen = []

    def zero_f(x, sigma):  # D with c_skip^eps x + (s - eps) / s (D - c_skip x) = 0
        seen.append((x.clone(), float(sigma[0])))
        s = sigma.reshape(-1, 1, 1, 1)
        return SD**2 / (s**2 + SD**2) * x - s / (s - EPS) * SD**2 / ((s - EPS) ** 2 + SD**2) * x

    taus = sampling_sigmas(4, 80.0)
    counter = CountingDenoiser(zero_f)
    out = consistency_sample(counter, torch.randn(3000, 1, 4, 4), sigmas=tuple(taus), eps=EPS, sigma_data=SD)
    assert counter.calls == 4 and counter.samples == 4 * 3000
    assert out.abs().max() < 1e-4
    for (x, sigma), tau in zip(seen[1:], taus[1:]):
        assert sigma == pytest.approx(tau)
        assert float(x.var()) == pytest.approx(tau**2 - EPS**2, rel=0.03)


# ---------------------------------------------------------------------------------------------
# CD on a Gaussian: data N(mu, s^2 I)

MU, S = 0.3, 0.7


def gauss_teacher(x, sigma):
    """The exact denoiser E[x0 | x] of N(mu, s^2 I) data."""
    v = sigma.reshape(-1, 1, 1, 1) ** 2
    return MU + S**2 / (S**2 + v) * (x - MU)


def exact_f(x, sigma):
    """The exact consistency function mu + (x - mu) sqrt((s^2 + eps^2) / (s^2 + sigma^2))."""
    return MU + (x - MU) * ((S**2 + EPS**2) / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2)).sqrt()


def denoiser_of(f):
    """The D whose consistency function is f: D = c_skip x + sigma / (sigma - eps) (f - c_skip^eps x)."""

    def d(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        ratio = torch.where(s > EPS, s / (s - EPS).clamp(min=1e-300), torch.zeros_like(s))
        return SD**2 / (s**2 + SD**2) * x + ratio * (f(x, sigma) - SD**2 / ((s - EPS) ** 2 + SD**2) * x)

    return d


def exact_ode_step(teacher, x, t, t_next, cond):
    """The PF-ODE solution map of the Gaussian: mu + (x - mu) sqrt((s^2 + t_next^2) / (s^2 + t^2))."""
    return MU + (x - MU) * ((S**2 + t_next**2) / (S**2 + t**2)).sqrt().reshape(-1, 1, 1, 1)


def gaussian_batch(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    return x0, torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["l2", "l1", "pseudo-huber"])
def test_cd_loss_is_zero_at_the_exact_consistency_function(kind):
    x0, noise = gaussian_batch()
    grid = torch.tensor([80.0, 5.0, 0.821, 0.1, EPS], dtype=torch.float64)
    i = torch.randint(len(grid) - 1, (len(x0),), generator=torch.Generator().manual_seed(1))
    f_star = denoiser_of(exact_f)
    torch.testing.assert_close(consistency_function(f_star, x0, grid[i], EPS, SD), exact_f(x0, grid[i]))
    loss = cd_loss(f_star, f_star, gauss_teacher, x0, noise, grid[i], grid[i + 1], eps=EPS, sigma_data=SD, kind=kind,
                   teacher_step=exact_ode_step, huber_c=0.0)
    assert float(loss.max()) < 1e-12
    heun = cd_loss(f_star, f_star, gauss_teacher, x0, noise, grid[i], grid[i + 1], eps=EPS, sigma_data=SD, kind=kind,
                   huber_c=0.0)
    assert float(heun.mean()) > 1e-8  # Heun is not exact


def test_cd_loss_with_heun_shrinks_like_h_cubed_per_step():
    """Local error of one Heun step is O(h^3); the L2 (squared) loss therefore O(h^6)."""
    x0, noise = gaussian_batch(256)
    f_star = denoiser_of(exact_f)
    losses = []
    for h in (0.1, 0.05, 0.025):
        t = torch.full((len(x0),), 1.0, dtype=torch.float64)
        loss = cd_loss(f_star, f_star, gauss_teacher, x0, noise, t, t - h, eps=EPS, sigma_data=SD, kind="l2")
        losses.append(float(loss.mean()))
    for a, b in zip(losses, losses[1:]):
        assert 5.5 < math.log2(a / b) < 6.5, losses


def test_heun_teacher_step_matches_two_evaluation_heun():
    counted = CountingDenoiser(gauss_teacher)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t, t_next = torch.full((5,), 2.0, dtype=torch.float64), torch.full((5,), 1.5, dtype=torch.float64)
    out = heun_teacher_step(counted, x, t, t_next, {})
    assert counted.samples == 10
    d = (x - gauss_teacher(x, t)) / 2.0
    pred = x - 0.5 * d
    torch.testing.assert_close(out, x - 0.5 * 0.5 * (d + (pred - gauss_teacher(pred, t_next)) / 1.5))


def test_shared_dropout_makes_a_degenerate_pair_exactly_zero():
    """With dropout on and t_next = t (test only), online and target see the same mask: loss 0."""
    net = tiny_denoiser(dropout=0.5).train()
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 1.0)
    loss = cd_loss(net, net, gauss_teacher, x0, noise, t, t.clone(), eps=EPS, sigma_data=SD, kind="l2")
    assert float(loss.detach().max()) == 0.0
    with torch.no_grad():  # without the replayed RNG state two calls differ
        assert not torch.equal(net(x0, t), net(x0, t))


def test_target_with_mu_zero_is_the_online_network_and_gets_no_gradient():
    online, target = tiny_denoiser(seed=0), tiny_denoiser(seed=1)
    for p in target.parameters():
        p.requires_grad_(False)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, t_next = torch.full((4,), 2.0), torch.full((4,), 1.0)
    cd_loss(online, target, gauss_teacher, x0, noise, t, t_next, eps=EPS, kind="l2").mean().backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    ema_update(target, online, 0.0)
    for a, b in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    half = tiny_denoiser(seed=2)
    before = [p.detach().clone() for p in half.parameters()]
    ema_update(half, online, 0.75)
    for a, b0, p in zip(half.parameters(), before, online.parameters()):
        torch.testing.assert_close(a, 0.75 * b0 + 0.25 * p)


def test_ema_half_life_and_warmup():
    beta = halflife_beta(0.05, 2000)
    assert beta**100 == pytest.approx(0.5)
    lr = warmup_lr(2e-4, 0.024, 2000)  # 48 warm-up iterations
    assert lr(0) == pytest.approx(2e-4 / 48) and lr(47) == pytest.approx(2e-4) and lr(1000) == 2e-4
    assert warmup_lr(1e-3, 0.0, 10)(0) == 1e-3


# ---------------------------------------------------------------------------------------------
# ECT


def test_ect_r_mapping_hand_computed():
    sig1, sig10 = 1 / (1 + math.e), 1 / (1 + math.exp(10))
    t = torch.tensor([1.0, 10.0], dtype=torch.float64)
    # stage 0, q = 2, k = 8, b = 1: dt / t = (1 + 8 sigmoid(-t)) / 2
    torch.testing.assert_close(ect_r(t, 0), torch.tensor([0.0, 10 * (1 - (1 + 8 * sig10) / 2)], dtype=torch.float64))
    torch.testing.assert_close(ect_r(t, 2), torch.tensor([1 - (1 + 8 * sig1) / 8, 10 * (1 - (1 + 8 * sig10) / 8)],
                                                         dtype=torch.float64))
    assert float(ect_r(t, 0)[1]) == pytest.approx(4.99818, abs=1e-5)
    assert float(ect_r(t, 2)[0]) == pytest.approx(0.606059, abs=1e-6)
    ts = torch.exp(-1.1 + 2.0 * torch.randn(5000, dtype=torch.float64))
    previous = torch.zeros_like(ts)
    for a in range(8):
        r = ect_r(ts, a)
        assert (r >= 0).all() and (r < ts).all() and (r >= previous).all()
        pos = r > 0
        torch.testing.assert_close((ts - r)[pos] / ts[pos], (1 + 8 * torch.sigmoid(-ts[pos])) / 2 ** (a + 1))
        previous = r


def test_ect_stages_run_over_the_whole_fit():
    ect = get_method("ect")
    hp = {"iterations": 2000, "stages": 8}
    assert [ect.stage(i, hp) for i in (0, 249, 250, 1000, 1999)] == [0, 0, 1, 4, 7]


def test_ect_loss_weighting_hand_computed():
    def half(x, sigma):
        return 0.5 * x

    y, noise = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t, r = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    loss = ect_loss(half, half, y, noise, t, r)
    x_t, x_r = y + t.reshape(-1, 1, 1, 1) * noise, y + r.reshape(-1, 1, 1, 1) * noise
    first = (0.5 * x_t[0] - y[0]).norm() / 2.0  # r = 0: the target is the clean image, weight 1 / t
    second = (0.5 * x_t[1] - 0.5 * x_r[1]).norm() / (3.0 - 1.0)
    torch.testing.assert_close(loss, torch.stack([first, second]))
    c = 0.1
    huber = ect_loss(half, half, y, noise, t, r, huber_c=c)
    torch.testing.assert_close(huber[1], ((0.5 * x_t[1] - 0.5 * x_r[1]).square().sum() + c**2).sqrt().sub(c) / 2.0)


# ---------------------------------------------------------------------------------------------
# Fits


@pytest.fixture(scope="module")
def digits():
    suite = DigitsSuite()
    suite.method_options = {"cd": dict(TINY), "ect": dict(TINY)}
    return suite, suite.load_teacher()


@pytest.mark.parametrize("name", ["cd", "ect"])
def test_tiny_fit_writes_a_model_that_loads_and_counts_nfe(name, digits, tmp_path):
    suite, teacher = digits
    method = get_method(name)
    for nfe in (1, 2, 4):
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"nfe{nfe}"))
        counter = CountingDenoiser(fitted.denoiser)
        with torch.no_grad():
            out = fitted.sample(counter, torch.randn(3, *suite.latent_shape))
        assert torch.isfinite(out).all() and counter.samples == 3 * nfe and counter.calls == nfe == fitted.nfe
        assert json.loads((tmp_path / f"nfe{nfe}" / "shared.json").read_text())["nfe"] == nfe
    shared = sorted(tmp_path.glob(f"{name}-shared-*"))
    assert len(shared) == 1  # one model for every NFE
    fit = json.loads((shared[0] / "fit.json").read_text())
    per = fit["flops"]
    assert fit["real_images_used"] == 3 * 6 and fit["student_evaluations"] == 3 * 6
    assert fit["teacher_evaluations"] == (2 * 3 * 6 if name == "cd" else 0)
    assert fit["fine_tuning"]["flops"] == pytest.approx(fit["teacher_evaluations"] * per["teacher_forward_per_sample"]
                                                        + 18 * per["student_forward_backward_per_sample"])
    parts = fit["flops_parts"]
    assert per["student_forward_backward_per_sample"] == parts["online_forward_backward_per_sample"] + \
        parts["target_forward_per_sample"]
    assert fit["fine_tuning"]["wall_seconds"] > 0 and fit["stopped_at_budget"] is None
    assert fit["distance"].startswith("l2, uniform weight" if name == "cd" else "L2 norm / (t - r)")
    loaded = load_model(shared[0] / "model.safetensors", suite, teacher, "cpu", nfe=4)
    counter = CountingDenoiser(loaded.denoiser)
    with torch.no_grad():
        again = loaded.sample(counter, torch.randn(2, *suite.latent_shape))
    assert counter.samples == 8 and loaded.nfe == 4 and torch.isfinite(again).all()
    # the saved weights are the evaluation EMA, not the teacher's any more
    assert any(not torch.equal(a, b) for a, b in zip(loaded.denoiser.parameters(), teacher.parameters()))


def test_cd_default_distance_is_recorded(digits):
    suite, _ = digits
    hp = get_method("cd").hyperparameters(suite, 2)
    assert hp["distance"] in ("lpips", "l2")
    if hp["distance"] == "l2":
        assert "lpips unavailable" in hp["distance_fallback"]
    assert hp["sampling_sigmas"] == pytest.approx([80.0, 0.821]) and hp["N"] == 18 and hp["target_ema"] == 0.0


@pytest.mark.parametrize("name", ["cd", "ect"])
def test_budget_stops_the_fit_and_is_recorded(name, digits, tmp_path):
    suite, teacher = digits
    s = DigitsSuite()
    s.method_options = {name: {**TINY, "iterations": 50, "budget_flops": 1.0}}
    get_method(name).fit(FitContext(suite=s, teacher=teacher, nfe=1, workdir=tmp_path / "b"))
    fit = json.loads(next(tmp_path.glob(f"{name}-shared-*/fit.json")).read_text())
    assert fit["stopped_at_budget"]["iteration"] == 1 and fit["iterations_done"] == 1
    assert fit["real_images_used"] == 6


def test_resumed_fit_ends_with_the_same_weights(digits, tmp_path):
    suite, teacher = digits
    s = DigitsSuite()
    s.method_options = {"cd": {**TINY, "iterations": 4, "target_ema": 0.5, "dropout": "on"}}
    method = get_method("cd")
    whole = method.fit(FitContext(suite=s, teacher=teacher, nfe=2, workdir=tmp_path / "a" / "w"))
    with pytest.raises(FitInterrupted):
        method.fit(FitContext(suite=s, teacher=teacher, nfe=2, workdir=tmp_path / "b" / "w",
                              progress=progress_that_dies(3)))
    assert next((tmp_path / "b").glob("cd-shared-*/checkpoint.pt")).is_file()
    resumed = method.fit(FitContext(suite=s, teacher=teacher, nfe=2, workdir=tmp_path / "b" / "w"))
    for a, b in zip(whole.denoiser.parameters(), resumed.denoiser.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    a, b = (json.loads(next((tmp_path / d).glob("cd-shared-*/fit.json")).read_text()) for d in ("a", "b"))
    assert a["teacher_evaluations"] == b["teacher_evaluations"] and a["real_images_used"] == b["real_images_used"]


@pytest.mark.parametrize("name", ["cd", "ect"])
def test_toy_latent_suite_with_teacher_samples(name, tmp_path):
    suite = toy_suite.ToyLatentSuite()
    teacher = suite.load_teacher()
    suite.method_options = {name: {**TINY, "data": "real"}}
    with pytest.raises(BadInput, match="teacher-samples"):
        get_method(name).hyperparameters(suite, 1)
    suite.method_options = {name: {**TINY, "data": "teacher-samples", "teacher_pool": 20}}
    method = get_method(name)
    assert method.display_name(method.hyperparameters(suite, 1)).endswith("[data=teacher-samples]")
    cond = {"class_labels": torch.eye(3)[[0, 1, 2]]}
    for nfe in (1, 2, 4):
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"n{nfe}"))
        counter = CountingDenoiser(fitted.denoiser)
        with torch.no_grad():
            out = fitted.sample(counter, torch.randn(3, *suite.latent_shape), cond)
        assert torch.isfinite(out).all() and counter.samples == 3 * nfe
    fit = json.loads(next(tmp_path.glob(f"{name}-shared-*/fit.json")).read_text())
    assert fit["real_images_used"] == 0 and fit["teacher_trajectories"] == 20
    assert fit["teacher_evaluations"] == 20 * 35 + (2 * 3 * 6 if name == "cd" else 0)


def test_bad_settings_are_bad_input(digits):
    suite, _ = digits
    for name, key, value in [("cd", "distance", "ssim"), ("cd", "N", 1), ("cd", "target_ema", 1.0),
                             ("ect", "stages", 0), ("ect", "dropout", "maybe"), ("cd", "budget_flops", -1),
                             ("ect", "sampling_sigmas", [80.0])]:
        s = DigitsSuite()
        s.method_options = {name: {key: value}}
        with pytest.raises(BadInput):
            get_method(name).hyperparameters(s, 2)
    assert not get_method("cd").supports(0) and get_method("ect").supports(4)
