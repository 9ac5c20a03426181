"""EPD-Solver (``sfdbench.methods.epd``): identity = base solver, counted and parallel NFE, the fit,
its model file and accounting, and the record / table carrying the parallel NFE."""

import json

import pandas as pd
import pytest
import torch
import toy_suite

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.harness.runner import RunPlan, run
from sfdbench.methods import get_method, load_model
from sfdbench.methods.base import FitContext
from sfdbench.methods.epd import EPDParameters, epd, parallel_nfe, steps_for_nfe
from sfdbench.records import load_records
from sfdbench.report.tables import render, summarize
from sfdbench.suites import SUITES, get_suite, register_suite

MU, S = 0.3, 0.7


def gaussian_denoiser(x, sigma, **cond):
    """The exact denoiser of N(MU, S^2) data: D = MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def table_of(params: EPDParameters) -> list[tuple]:
    return [tuple(p.detach() for p in params.step(n)) for n in range(params.steps)]


@pytest.fixture(scope="module")
def toy_registered():
    register_suite(toy_suite.NAME, toy_suite.ToyLatentSuite)
    yield
    SUITES.pop(toy_suite.NAME, None)


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_identity_parameters_give_dpm_solver_2(k, afs):
    """All logits 0: r = 1/2, lambda = 1/K, c = a = 1 -> exactly DPM-Solver-2 (r = 1/2) on the same
    points, whatever the scale ranges (equal directions; K = 3 differs by rounding of 1/3 only)."""
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = get_schedule("polynomial", 4, 0.002, 80.0, 7.0)
    params = table_of(EPDParameters(3, k, scale_dir=0.05, scale_time=0.2, init="zero"))
    ours = solvers.sample(epd, gaussian_denoiser, z, sigmas, params=params, afs=afs)
    base = solvers.sample(solvers.dpm_solver_2, gaussian_denoiser, z, sigmas, afs=afs, r=0.5)
    if k in (1, 2):
        assert torch.equal(ours, base)
    torch.testing.assert_close(ours, base, rtol=1e-13, atol=1e-13)


def ipndm_midpoint(denoiser, x, sigmas, max_order):
    """The identity of the iPNDM plugin written out: the log-sigma midpoint reached with iPNDM's fixed
    Adams-Bashforth slope, then x_{n+1} = x_n + h d_mid."""
    history = []
    for n in range(len(sigmas) - 1):
        t, t_next = sigmas[n], sigmas[n + 1]
        d = (x - denoiser(x, t)) / t
        terms = [d, *history][:max_order]
        slope = sum(c * v for c, v in zip(solvers.IPNDM_COEFFICIENTS[len(terms)], terms))
        t_mid = (t * t_next).sqrt()
        x_mid = x + (t_mid - t) * slope
        x = x + (t_next - t) * (x_mid - denoiser(x_mid, t_mid)) / t_mid
        history = terms[: max_order - 1]
    return x


def test_identity_of_the_ipndm_plugin():
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = get_schedule("polynomial", 6, 0.002, 80.0, 7.0)
    for order in (1, 3, 4):
        params = table_of(EPDParameters(5, 2, init="zero"))
        ours = solvers.sample(epd, gaussian_denoiser, z, sigmas, params=params, base="ipndm", max_order=order)
        torch.testing.assert_close(ours, ipndm_midpoint(gaussian_denoiser, z * sigmas[0], sigmas, order),
                                   rtol=1e-12, atol=1e-12)
    euler = solvers.sample(epd, gaussian_denoiser, z, sigmas, params=params, base="euler")
    first_order = solvers.sample(epd, gaussian_denoiser, z, sigmas, params=params, base="ipndm", max_order=1)
    assert torch.equal(euler, first_order)


def test_learned_values_stay_in_their_ranges():
    p = EPDParameters(3, 4, scale_dir=0.05, scale_time=0.1, init="randn", seed=3)
    with torch.no_grad():
        for q in p.parameters():
            q.mul_(20)
    for n in range(3):
        r, w, c, a = p.step(n)
        assert ((r > 0) & (r < 1)).all() and torch.allclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
        assert ((c >= 0.95) & (c <= 1.05)).all() and ((a >= 0.9) & (a <= 1.1)).all()
    spread = EPDParameters(2, 4, init="spread").step(1)[0]
    torch.testing.assert_close(spread, torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_counted_nfe_is_the_declared_one_and_calls_are_the_parallel_rounds(k):
    """Counted per-sample evaluations = S (K + 1) - AFS = the NFE; the K directions of a step go in one
    batched call, so the number of calls is the paper's parallel NFE 2S - AFS."""
    method = get_method("epd")
    supported = [n for n in range(1, 13) if steps_for_nfe(n, k)]
    assert supported == sorted({s * (k + 1) - a for s in range(1, 13) for a in (0, 1)} & set(range(1, 13)))
    for nfe in supported:
        steps, afs = steps_for_nfe(nfe, k)
        counter = CountingDenoiser(gaussian_denoiser)
        z = torch.randn(3, 1, 2, 2, dtype=torch.float64)
        params = table_of(EPDParameters(steps, k, init="spread"))
        solvers.sample(epd, counter, z, get_schedule("polynomial", steps + 1, 0.002, 80.0), params=params, afs=afs)
        assert counter.samples / 3 == nfe
        assert counter.calls == parallel_nfe(steps, afs) == 2 * steps - int(afs)
    assert [n for n in range(1, 13) if method.supports(n)] == [2, 3, 5, 6, 8, 9, 11, 12]  # the default K = 2
    assert "2S - AFS" in method.nfe_rule()


def test_hyperparameters_follow_the_nfe_and_bad_values_are_bad_input():
    suite = get_suite("digits")
    method = get_method("epd")
    hp = method.hyperparameters(suite, 5)
    assert (hp["directions"], hp["num_steps"], hp["afs"]) == (2, 3, True)
    assert not method.supports_in(suite, 4)
    suite.method_options = {**suite.method_options, "epd": {"directions": 1}}
    assert method.supports_in(suite, 4)
    assert (method.hyperparameters(suite, 4)["num_steps"], method.hyperparameters(suite, 4)["afs"]) == (3, False)
    for bad in ({"num_steps": 7}, {"afs": False}, {"base": "heun"}, {"scale_dir": 1.5}, {"directions": 0},
                {"teacher_solver": "rk4"}, {"init": "ones"}):
        suite.method_options = {**suite.method_options, "epd": bad}
        with pytest.raises(BadInput):
            method.hyperparameters(suite, 5)


def test_a_short_fit_writes_a_model_that_loads_and_samples(tmp_path):
    suite = get_suite("digits")
    suite.method_options = {**suite.method_options,
                            "epd": {"iterations": 2, "batch": 4, "checkpoint_every": 1, "schedule": "polynomial",
                                    "rho": 7.0, "lr": 0.05}}
    teacher = suite.load_teacher()
    method = get_method("epd")
    fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path))
    model = tmp_path / "model.safetensors"
    assert model.is_file() and (tmp_path / "fit.json").is_file() and not (tmp_path / "checkpoint.pt").exists()
    fit = json.loads((tmp_path / "fit.json").read_text())
    # accounting: per trajectory the teacher solver (Heun, M = 1: 2 evaluations x 2 x S), d_n at each
    # non-AFS step, and K evaluations per step back-propagated to their input
    steps, k, afs = 2, 2, 1
    assert fit["teacher_evaluations"] == 2 * 4 * (2 * 2 * steps + steps - afs)
    assert fit["student_evaluations"] == fit["teacher_evaluations_with_input_gradient"] == 2 * 4 * k * steps
    flops = fit["flops"]
    assert flops["student_forward_backward_per_sample"] > flops["teacher_forward_per_sample"] > 0
    assert fit["fine_tuning"]["flops"] == pytest.approx(
        fit["teacher_evaluations"] * flops["teacher_forward_per_sample"]
        + fit["student_evaluations"] * flops["student_forward_backward_per_sample"])
    assert fit["fine_tuning"]["wall_seconds"] > 0 and fit["parallel_nfe"] == 3
    assert fit["learned"]["r"] != [[0.25, 0.75], [0.25, 0.75]]  # the parameters moved
    assert fitted.nfe == 5 and fitted.info["parallel_nfe"] == 3 and fitted.denoiser is teacher
    again = load_model(model, suite, teacher, "cpu")
    assert again.info["learned"] == fitted.info["learned"]
    counter = CountingDenoiser(teacher)
    z = torch.randn(3, *suite.latent_shape)
    out = again.sample(counter, z, {})
    assert out.shape == z.shape and torch.isfinite(out).all() and counter.samples == 15 and counter.calls == 3
    with pytest.raises(BadInput):
        load_model(model, suite, teacher, "cpu", nfe=6)
    # a finished fit is loaded, not redone
    mtime = model.stat().st_mtime_ns
    method.fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path))
    assert model.stat().st_mtime_ns == mtime


def test_records_and_table_carry_counted_and_parallel_nfe(tmp_path, toy_registered):
    overrides = {"epd": {"iterations": 2, "batch": 4, "checkpoint_every": 1}}
    grid = [("epd", 2, 1.0), ("epd", 3, 1.0), ("ddim", 2, 1.0), ("epd", 2, 2.0)]
    run(RunPlan(suite=toy_suite.NAME, grid=grid, seeds=[0], samples=6, out=tmp_path, batch=4,
                method_overrides=overrides))
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / toy_suite.NAME / "records").glob("*.json"))]
    by = {(r["method"], r["nfe"], r["guidance"]["scale"]): r for r in recs}
    assert by[("epd", 2, 1.0)]["nfe_parallel"] == 1 and by[("epd", 3, 1.0)]["nfe_parallel"] == 2
    assert by[("epd", 2, 2.0)]["nfe_counted"] == 4 and by[("epd", 2, 2.0)]["sampler_nfe"] == 2
    assert all(r["nfe_counted"] == r["nfe"] * r["guidance"]["network_evaluations_per_call"] for r in recs)
    assert "nfe_parallel" not in by[("ddim", 2, 1.0)]
    table = summarize(load_records(tmp_path, toy_suite.NAME))
    names = dict(zip(zip(table["method"], table["nfe"], table["guidance"]), table["display"]))
    assert names[("epd", 2, 1.0)] == "EPD-Solver (1 parallel rounds)"
    assert names[("epd", 3, 1.0)] == "EPD-Solver (2 parallel rounds)"
    assert names[("ddim", 2, 1.0)] == "DDIM"
    assert "EPD-Solver (2 parallel rounds)" in render(table, "markdown")


def test_table_labels_parallel_rounds_and_sorts_by_counted_calls():
    rows = [dict(method="epd", display="EPD-Solver", group="distillation", nfe=n, nfe_parallel=p, seed=0, fid=f,
                 fine_tuning_hours=0.01, device="CPU", n_samples=10) for n, p, f in ((8, 5, 3.0), (5, 3, 9.0))]
    rows.append(dict(method="sfd", display="SFD", group="distillation", nfe=2, nfe_parallel=None, seed=0, fid=4.0,
                     fine_tuning_hours=0.01, device="CPU", n_samples=10))
    table = summarize(pd.DataFrame(rows))
    assert list(zip(table["display"], table["nfe"])) == [("EPD-Solver (3 parallel rounds)", 5),
                                                         ("EPD-Solver (5 parallel rounds)", 8), ("SFD", 2)]
    no_column = {k: v for k, v in rows[-1].items() if k != "nfe_parallel"}
    assert summarize(pd.DataFrame([no_column]))["display"].tolist() == ["SFD"]
