"""Progressive distillation (pd) and guided distillation (guided-pd): the PD target and its
identities, the student equal to its teacher at initialisation, counted NFE = declared NFE, model
files that load and sample, the FLOP budget, refusal on an unconditional suite, and resume."""

import json

import pytest
import torch
import toy_suite
from conftest import FitInterrupted, progress_that_dies

from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, get_method, load_model
from sfdbench.methods.pd import (
    Stage,
    euler_target,
    guided_target,
    pd_grid,
    plan_stages,
    truncated_snr_weight,
    two_teacher_steps,
)
from sfdbench.networks.checkpoint import load_weights
from sfdbench.suites.digits import DigitsCondSuite, DigitsSuite

TINY = {"start_steps": 8, "iterations": 2, "batch": 4, "checkpoint_every": 1}


def tiny(cls=DigitsSuite, name="pd", **options):
    suite = cls()
    suite.method_options = {name: {**TINY, **options}}
    return suite


@pytest.fixture(scope="module")
def teacher():
    return DigitsSuite().load_teacher()


@pytest.fixture(scope="module")
def cond_teacher():
    return DigitsCondSuite().load_teacher()


def fit(name, suite, teacher, nfe, workdir, progress=None):
    return get_method(name).fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=workdir,
                                           progress=progress))


def sample(fitted, suite, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *suite.latent_shape, generator=gen)
    cond = suite.training_conditioning(n, gen)
    counter = CountingDenoiser(fitted.denoiser)
    with torch.no_grad():
        out = fitted.sample(counter, latents, cond)
    return out, counter


# ---------------------------------------------------------------------------------------------
# The math


def test_one_euler_step_with_the_target_lands_on_the_two_step_state():
    gen = torch.Generator().manual_seed(0)
    x_t, x_end = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(5, 1, 4, 4, generator=gen,
                                                                                         dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64) * 10 + 0.5
    s = t * torch.rand(5, generator=gen, dtype=torch.float64) * 0.9
    target = euler_target(x_t, t, s, x_end)

    def col(v):
        return v.reshape(-1, 1, 1, 1)

    one_step = x_t + (col(s) - col(t)) * (x_t - target) / col(t)
    torch.testing.assert_close(one_step, x_end, rtol=1e-6, atol=1e-6)
    # the other form: x_t - t (x_end - x_t) / (s - t)
    torch.testing.assert_close(target, x_t - col(t) * (x_end - x_t) / (col(s) - col(t)))


def test_grids_nest_and_stages_halve():
    fine = pd_grid("polynomial", 4, 0.002, 80.0, 7.0)
    coarse = pd_grid("polynomial", 2, 0.002, 80.0, 7.0)
    assert len(fine) == 9 and len(coarse) == 5
    torch.testing.assert_close(fine[::2], coarse, rtol=1e-12, atol=0)
    assert [s.student_steps for s in plan_stages(64, 2, False)] == [32, 16, 8, 4, 2]
    assert [(s.kind, s.student_steps) for s in plan_stages(8, 2, True)] == [("guide", 8), ("round", 4), ("round", 2)]
    assert truncated_snr_weight(torch.tensor([0.1, 1.0, 5.0])).tolist() == pytest.approx([100.0, 1.0, 1.0])


def test_target_is_exact_for_a_point_mass_and_converges_for_a_gaussian():
    """A point-mass teacher (D = mu) has straight ODE paths, so Euler is exact and D~ = D; for a
    Gaussian teacher D~ -> D as the grid gets finer (the spec's toy check)."""
    mu = torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64)

    def point(x, sigma, **cond):
        return mu.expand_as(x)

    def gauss(x, sigma, **cond):
        s2 = 0.25
        return mu + s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu)

    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    errors = []
    for n in (4, 32, 256):
        g = pd_grid("polynomial", n, 0.002, 80.0, 7.0)
        i = torch.full((3,), n // 2)
        t, tm, s = g[2 * i], g[2 * i + 1], g[2 * i + 2]
        x = x0 + t.reshape(-1, 1, 1, 1) * eps
        target = euler_target(x, t, s, two_teacher_steps(point, x, t, tm, s, {}))
        torch.testing.assert_close(target, mu.expand_as(x))
        target = euler_target(x, t, s, two_teacher_steps(gauss, x, t, tm, s, {}))
        errors.append(float((target - gauss(x, t)).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2 * errors[0]


def test_guided_target_at_w_one_and_zero():
    def model(x, sigma, class_labels):
        return x * 0 + class_labels.sum(1).reshape(-1, 1, 1, 1) * 2 + 1  # 3 labelled, 1 unlabelled

    def uncond(c):
        return {**c, "class_labels": torch.zeros_like(c["class_labels"])}

    x, labels = torch.randn(3, 1, 2, 2), torch.eye(3)
    w = torch.tensor([1.0, 0.0, 2.5])
    out = guided_target(model, x, torch.ones(3), w, {"class_labels": labels}, uncond)
    assert out[:, 0, 0, 0].tolist() == pytest.approx([3.0, 1.0, 1 + 2.5 * 2])


# ---------------------------------------------------------------------------------------------
# Initialisation, NFE, model files


def test_round_zero_student_equals_teacher_and_its_target_at_init(teacher, tmp_path):
    """Round 0: the student is the teacher's copy with dropout 0, so at initialisation it outputs
    exactly what the teacher does, i.e. the teacher's D at x_t, from which the two-step target
    differs only by the teacher's own discretisation error."""
    suite = tiny()
    method = get_method("pd")
    hp = method.hyperparameters(suite, 2)
    ctx = FitContext(suite=suite, teacher=teacher, nfe=2, workdir=tmp_path)
    frozen, student = method.stage_teacher_student(ctx, hp, Stage(0, "round", 4), None)
    assert frozen is teacher and student is not teacher and not student.training
    assert all(p.requires_grad for p in student.parameters())
    g = pd_grid("polynomial", 4, 0.002, 80.0, 7.0).float()
    x = torch.randn(4, 1, 8, 8)
    sigma = g[torch.tensor([0, 2, 4, 6])]
    with torch.no_grad():
        assert torch.equal(student(x, sigma), teacher(x, sigma))
        assert torch.equal(student(x, sigma), student(x, sigma))  # no dropout
        target = euler_target(x, sigma, g[[2, 4, 6, 8]], two_teacher_steps(teacher, x, sigma, g[[1, 3, 5, 7]],
                                                                           g[[2, 4, 6, 8]], {}))
    assert torch.isfinite(target).all()


def test_guided_stage_student_equals_the_conditional_teacher_for_every_w(cond_teacher, tmp_path):
    suite = tiny(DigitsCondSuite, "guided-pd")
    method = get_method("guided-pd")
    hp = method.hyperparameters(suite, 2)
    ctx = FitContext(suite=suite, teacher=cond_teacher, nfe=2, workdir=tmp_path)
    _, student = method.stage_teacher_student(ctx, hp, Stage(0, "guide", 8), None)
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 3.0, 40.0])
    labels = suite.training_conditioning(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = cond_teacher(x, sigma, **labels)
        for w in (1.0, 2.0, 5.0):
            torch.testing.assert_close(student(x, sigma, **labels, step_condition=w), reference, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["digits", "toy"])
def test_counted_nfe_equals_declared_for_1_2_4(which, teacher, tmp_path):
    if which == "toy":
        suite = toy_suite.ToyLatentSuite()
        suite.method_options = {"pd": {**TINY, "pool_size": 8, "pool_num_steps": 3}}
        net = suite.load_teacher()
    else:
        suite, net = tiny(), teacher
    method = get_method("pd")
    assert [n for n in range(1, 10) if method.supports_in(suite, n)] == [1, 2, 4]
    assert method.hyperparameters(suite, 1)["data"] == ("teacher-samples" if which == "toy" else "real")
    for nfe in (4, 2, 1):
        fitted = fit("pd", suite, net, nfe, tmp_path / f"nfe{nfe}")
        out, counter = sample(fitted, suite)
        assert fitted.nfe == nfe and counter.samples == 3 * nfe and counter.calls == nfe
        assert out.shape == (3, *suite.latent_shape) and torch.isfinite(out).all()
    info = fitted.info
    assert [s["student_steps"] for s in info["stages"]] == [4, 2, 1]
    # the chain is shared: NFE 1 continued NFE 2's rounds, and reports the whole cost of all three
    assert len(list(tmp_path.glob("pd-chain-*"))) == 1
    assert info["teacher_evaluations"] == (8 * 5 if which == "toy" else 0) + 3 * 2 * 2 * 4  # pool + 3 x 2 x 2B
    assert info["student_evaluations"] == 3 * 2 * 4
    assert info["real_images"] == (0 if which == "toy" else 3 * 2 * 4)
    assert fitted.fine_tuning["flops"] > 0


def test_a_fit_writes_a_model_that_loads_and_samples(teacher, tmp_path):
    suite = tiny()
    fitted = fit("pd", suite, teacher, 2, tmp_path / "fit")
    path = tmp_path / "fit" / "model.safetensors"
    fit_json = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit_json["requested_nfe_reached"] and fit_json["distilled_nfe"] == 2 and fit_json["data"] == "real"
    assert fit_json["fine_tuning"]["flops"] == pytest.approx(sum(s["flops"] for s in fit_json["stages"]))
    assert fit_json["fine_tuning"]["wall_seconds"] >= sum(s["wall_seconds"] for s in fit_json["stages"]) - 1e-9
    again = load_model(path, suite, teacher, "cpu")
    a, _ = sample(fitted, suite)
    b, counter = sample(again, suite)
    assert torch.equal(a, b) and counter.calls == 2
    with pytest.raises(BadInput, match="NFE 2 only"):
        get_method("pd").load(path, suite, teacher, "cpu", nfe=4)
    # the intermediate round's student (4 steps) is a model file of its own
    four = next(tmp_path.glob("pd-chain-*/stage-0-pd-8to4/model.safetensors"))
    assert load_model(four, suite, teacher, "cpu").nfe == 4
    # a refit is a reload (idempotent)
    assert torch.equal(sample(fit("pd", suite, teacher, 2, tmp_path / "fit"), suite)[0], a)


def test_bad_hyperparameters_are_bad_input():
    method = get_method("pd")
    with pytest.raises(BadInput, match="start_steps"):
        method.hyperparameters(tiny(start_steps=6), 2)
    with pytest.raises(BadInput, match="budget_flops"):
        method.hyperparameters(tiny(budget_flops=-1), 2)
    with pytest.raises(BadInput, match="data"):
        method.hyperparameters(tiny(data="web"), 2)
    assert not method.supports_in(tiny(), 8) and not method.supports(3)


# ---------------------------------------------------------------------------------------------
# Budget


def test_budget_even_split_reaches_the_nfe_with_fewer_iterations(teacher, tmp_path):
    suite = tiny(iterations=5, budget_flops=1.0)  # far below one iteration: each round gets its minimum, 1
    fitted = fit("pd", suite, teacher, 2, tmp_path / "fit")
    info = fitted.info
    assert [s["iterations"] for s in info["stages"]] == [1, 1]
    assert info["requested_nfe_reached"] and info["distilled_nfe"] == 2
    assert info["stopped_at_budget"]["split"] == "even" and info["stopped_at_budget"]["stages_cut"] == [0, 1]
    assert not list(tmp_path.glob("pd-chain-*"))  # a budgeted fit keeps its stages in its own folder


def test_budget_sequential_stops_where_it_ends_and_says_so(teacher, tmp_path):
    suite = tiny(iterations=5, budget_flops=1.0, budget_split="sequential")
    fitted = fit("pd", suite, teacher, 2, tmp_path / "fit")
    info = fitted.info
    assert [(s["stage"], s["iterations"]) for s in info["stages"]] == [(0, 1)]
    assert not info["requested_nfe_reached"] and info["distilled_nfe"] == 8
    assert "budget ended before NFE 2" in info["budget_note"]
    assert info["stopped_at_budget"]["stages_run"] == 1 and info["stopped_at_budget"]["stages_planned"] == 2
    _, counter = sample(fitted, suite)
    assert counter.calls == 2  # still samples at the requested NFE (labelled by the fit info)


# ---------------------------------------------------------------------------------------------
# Guided distillation


def test_guided_pd_refuses_an_unconditional_suite(teacher, tmp_path):
    method = get_method("guided-pd")
    with pytest.raises(BadInput, match="class-conditional"):
        method.check_suite(DigitsSuite())
    with pytest.raises(BadInput, match="class-conditional"):
        fit("guided-pd", tiny(name="guided-pd"), teacher, 2, tmp_path)
    from sfdbench.harness.runner import RunPlan, validate

    with pytest.raises(BadInput, match="class-conditional"):
        validate(RunPlan(suite="digits", grid=[("guided-pd", 2)], seeds=[0], samples=4, out=tmp_path))


def test_guided_pd_fits_and_samples_with_one_call_per_step(cond_teacher, tmp_path):
    suite = tiny(DigitsCondSuite, "guided-pd", guidance_range=[1.0, 2.0], guidance=1.5)
    fitted = fit("guided-pd", suite, cond_teacher, 2, tmp_path / "fit")
    assert [(s["kind"], s["student_steps"]) for s in fitted.info["stages"]] == [("guide", 8), ("round", 4),
                                                                               ("round", 2)]
    assert fitted.info["sampling"]["guidance"] == 1.5
    assert fitted.info["teacher_evaluations"] == 3 * 2 * 2 * 4  # guide: 2 branches; rounds: 2 steps
    out, counter = sample(fitted, suite)
    assert counter.calls == 2 and counter.samples == 6 and torch.isfinite(out).all()
    again = load_model(tmp_path / "fit" / "model.safetensors", suite, cond_teacher, "cpu")
    assert torch.equal(sample(again, suite)[0], out)
    with pytest.raises(BadInput, match="outside the trained guidance_range"):
        get_method("guided-pd").hyperparameters(tiny(DigitsCondSuite, "guided-pd", guidance=7.0), 2)


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_gives_the_weights_of_an_uninterrupted_fit(teacher, tmp_path):
    suite = tiny(iterations=3, budget_flops=1e30)  # a budget keeps the stages in each fit's own folder
    whole = tmp_path / "whole"
    fit("pd", suite, teacher, 2, whole)
    broken = tmp_path / "broken"
    with pytest.raises(FitInterrupted):
        fit("pd", suite, teacher, 2, broken, progress=progress_that_dies(2, "fit pd NFE 2: round 4 -> 2"))
    assert (broken / "stage-0-pd-8to4" / "model.safetensors").is_file()
    assert (broken / "stage-1-pd-4to2" / "checkpoint.pt").is_file() and not (broken / "model.safetensors").exists()
    fit("pd", suite, teacher, 2, broken)
    a = load_weights(suite.make_student(teacher), whole / "model.safetensors").state_dict()
    b = load_weights(suite.make_student(teacher), broken / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((broken / "fit.json").read_text())["student_evaluations"] == 2 * 3 * 4
