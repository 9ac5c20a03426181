"""Methods and harness work with any teacher a suite hands them: every registered method fits and
samples on a toy latent, class-conditional suite with an epsilon-prediction discrete-VP teacher
of another architecture, through the same harness (and the CLI), with and without guidance, and
the NFE is counted, never declared."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import toy_suite
from typer.testing import CliRunner

from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser, EDMPrecond, VPEpsilonDenoiser
from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.harness.runner import RunPlan, run
from sfdbench.methods import all_methods
from sfdbench.suites import SUITES, register_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_suite(toy_suite.NAME, toy_suite.ToyLatentSuite)
    yield
    SUITES.pop(toy_suite.NAME, None)


def first_nfe(method) -> int:
    return next(n for n in (1, 2, 3, 4) if method.supports(n))


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / toy_suite.NAME / "records").glob("*.json"))]


def test_every_method_runs_on_the_toy_latent_suite(tmp_path):
    grid = [(m.name, first_nfe(m), 1.0) for m in all_methods()]
    grid += [("ddim", 2, 2.0), ("sfd", 2, 2.0), ("sfd-v", 3, 3.0), ("sfd-stage2", 1, 2.0), ("dpmpp3m", 3, 0.0)]
    run(RunPlan(suite=toy_suite.NAME, grid=grid, seeds=[0], samples=6, out=tmp_path, batch=4))
    recs = records(tmp_path)
    assert {(r["method"], r["nfe"], r["guidance"]["scale"]) for r in recs} == {(m, n, float(w)) for m, n, w in grid}
    for r in recs:
        per_call = r["guidance"]["network_evaluations_per_call"]
        assert per_call == (1 if r["guidance"]["scale"] in (0.0, 1.0) else 2)
        assert r["sampler_nfe"] == r["nfe"], r["method"]
        assert r["nfe_counted"] == r["nfe"] * per_call, (r["method"], r["nfe_counted"])
        assert r["sampling"]["conditioning"] != "none"
        assert torch.isfinite(torch.tensor(r["metrics"]["fid"]))
    # the distilled students were copies of the toy network, step-conditioned where SFD-v needs it
    from sfdbench.networks.checkpoint import read_metadata

    models = sorted((tmp_path / toy_suite.NAME / "fits").rglob("model.safetensors"))
    assert models and {read_metadata(p)["suite"] for p in models} == {toy_suite.NAME}
    assert any(read_metadata(p).get("adapters", {}).get("step_condition") for p in models)


def test_sfdbench_run_cli_on_a_registered_suite(tmp_path):
    from sfdbench.cli import app

    result = CliRunner().invoke(app, ["run", "--suite", toy_suite.NAME, "--out", str(tmp_path), "--samples", "4"])
    assert result.exit_code == 0, result.output
    recs = records(tmp_path)
    assert sorted((r["method"], r["guidance"]["scale"], r["nfe_counted"]) for r in recs) == [
        ("ddim", 1.0, 2.0), ("sfd", 1.0, 2.0), ("sfd", 2.0, 4.0)]
    guided = next(r for r in recs if r["guidance"]["scale"] == 2.0)
    assert "CFG w=2" in guided["display"]


def test_guidance_wrapper_counts_two_evaluations_and_combines_branches():
    calls = []

    def model(x, sigma, class_labels):
        calls.append(x.shape[0])
        return x * 0 + class_labels.sum(1).reshape(-1, 1, 1, 1)  # 1 for a labelled row, 0 for "no label"

    counter = CountingDenoiser(model)
    cfg = ClassifierFreeGuidance(counter, 3.0, lambda c: {**c, "class_labels": torch.zeros_like(c["class_labels"])})
    x, labels = torch.randn(5, 1, 2, 2), torch.eye(3)[[0, 1, 2, 0, 1]]
    out = cfg(x, torch.tensor(1.0), class_labels=labels)
    assert calls == [10] and counter.samples == 10  # one doubled batch: 2 network evaluations per sample
    torch.testing.assert_close(out, torch.full_like(x, 3.0))  # 0 + 3 (1 - 0)
    assert ClassifierFreeGuidance(counter, 1.0, None).network_evaluations_per_call == 1


def test_vp_epsilon_wrapper_matches_its_formula():
    vp = DiscreteVP.sd()
    seen = {}

    class Eps(torch.nn.Module):
        def forward(self, x_in, c_noise):
            seen["x_in"], seen["c_noise"] = x_in, c_noise
            return torch.ones_like(x_in)

    den = VPEpsilonDenoiser(Eps(), vp)
    x, sigma = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    out = den(x, sigma)
    torch.testing.assert_close(out, x - sigma.reshape(-1, 1, 1, 1))  # D = x - sigma eps
    torch.testing.assert_close(seen["x_in"], x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt())
    torch.testing.assert_close(seen["c_noise"], vp.timestep(sigma))
    assert (den.sigma_min, den.sigma_max) == pytest.approx(vp.sigma_range())
    # at the table's own grid points the timestep is the integer index
    torch.testing.assert_close(vp.timestep(vp.sigma(torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))),
                               torch.tensor([99.0, 499.0, 999.0], dtype=torch.float64))


def test_vp_epsilon_wrapper_matches_diffusers_ddim_step():
    """One deterministic DDIM step of diffusers' DDIMScheduler on the same epsilon model equals one
    Euler step of our wrapper between the same two noise levels (VP <-> EDM change of variables)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=0)
    sched.set_timesteps(10)
    t, t_prev = int(sched.timesteps[2]), int(sched.timesteps[3])
    vp = DiscreteVP.sd()
    weight = torch.randn(2, 2, dtype=torch.float64)

    def eps(x_in, c_noise):
        return torch.einsum("oc,nchw->nohw", weight, x_in) * 0.3

    den = VPEpsilonDenoiser(type("E", (torch.nn.Module,), {"forward": lambda self, x, c: eps(x, c)})(), vp)
    abar = sched.alphas_cumprod.double()
    sigma_t, sigma_prev = ((1 - abar[t]) / abar[t]).sqrt(), ((1 - abar[t_prev]) / abar[t_prev]).sqrt()
    x_vp = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    ours = x_vp / abar[t].sqrt()  # EDM state x = x_vp / sqrt(abar)
    d = (ours - den(ours, sigma_t)) / sigma_t
    ours = (ours + (sigma_prev - sigma_t) * d) * abar[t_prev].sqrt()
    theirs = sched.step(eps(x_vp, None), t, x_vp).prev_sample  # diffusers' model sees the VP state itself
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)


def test_edm_precond_passes_conditioning_through():
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x, c_noise, **cond):
            seen.update(cond)
            return x

    EDMPrecond(Net())(torch.randn(1, 1, 2, 2), 1.0, class_labels=torch.ones(1, 3))
    assert torch.equal(seen["class_labels"], torch.ones(1, 3))


def test_methods_and_harness_never_name_the_digits_suite():
    out = subprocess.run(["grep", "-ril", "digits", "sfdbench/methods", "sfdbench/harness"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "", f"methods/harness mention digits: {out.stdout}"
