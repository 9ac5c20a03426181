"""Second-stage SFD against the spec (section 6): the SFD-v model as its own Euler teacher on
N_T = 7 with AFS and step condition 7, the student at N = 3 with AFS (1 NFE, step condition 3),
L1 plus the C*H*W-weighted LPIPS on the last interval where LPIPS can run (recorded why not),
one first-stage model shared with SFD-v, the full cost accounted, and resuming."""

import json

import pytest
import torch
from conftest import FitInterrupted, progress_that_dies

from sfdbench.diffusion.denoiser import CountingDenoiser, EDMPrecond
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, get_method
from sfdbench.methods import sfd_stage2 as stage2
from sfdbench.methods.sfd import SFDStepConfig, lpips_loss, lpips_term, sfd_iteration
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits import DigitsSuite


@pytest.fixture(scope="module")
def teacher():
    return DigitsSuite().load_teacher()


def tiny_suite(**stage2_options):
    suite = DigitsSuite()
    suite.method_options = {"sfd": {"iterations": 1, "batch": 4, "checkpoint_every": 2}}  # sfd-v: 4 iterations
    suite.method_options["sfd-stage2"] = {"iterations": 4, **stage2_options}
    return suite


def test_hyperparameters_follow_the_spec():
    method = get_method("sfd-stage2")
    assert [n for n in range(0, 6) if method.supports(n)] == [1]
    hp = method.hyperparameters(tiny_suite(), 1)
    assert (hp["num_steps"], hp["M"], hp["teacher_num_steps"], hp["teacher_solver"]) == (3, 2, 7, "euler")
    assert hp["teacher_step_condition"] == 7 and hp["step_condition"] == 3 and hp["afs"] and hp["teacher_afs"]
    assert hp["lr"] == 5e-4 and hp["first_stage"]["method"] == "sfd-v" and hp["first_stage"]["iterations"] == 4
    plain = DigitsSuite()
    plain.method_options = {"sfd": {"iterations": 100}}  # no stage-2 length of its own: 10x SFD's (spec 4.9)
    assert get_method("sfd-stage2").hyperparameters(plain, 1)["iterations"] == 10 * 100
    assert get_method("sfd-stage2").hyperparameters(DigitsSuite(), 1)["iterations"] == 500  # the suite's setting
    with pytest.raises(BadInput, match="rho is fixed"):
        method.hyperparameters(tiny_suite(rho=5.0), 1)
    with pytest.raises(BadInput, match="loss"):
        method.hyperparameters(tiny_suite(loss="l2"), 1)
    # the first stage's settings enter the second stage's hyperparameters (and so its config hash)
    other = tiny_suite()
    other.method_options["sfd-v"] = {"iterations": 5}
    assert method.hyperparameters(other, 1) != hp


def test_lpips_term_is_batch_mean_times_pixels():
    pred, target = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)

    def fake(a, b):
        return torch.tensor([0.5, 1.5])

    assert float(lpips_term(fake, pred, target)) == pytest.approx(1.0 * 64)
    net = EDMPrecond(DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16, dropout=0.0), 0.006, 80.0)
    sigmas = get_schedule("polynomial", 3, 0.006, 80.0, 7.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    latents = torch.randn(2, 1, 8, 8)
    cfg = SFDStepConfig(m=2, afs=True, teacher_solver="euler", teacher_afs=True)
    plain = sfd_iteration(net, net, opt, latents, sigmas, cfg)
    with_lpips = sfd_iteration(net, net, opt, latents, sigmas, SFDStepConfig(
        m=2, afs=True, teacher_solver="euler", teacher_afs=True, last_step_lpips=True), lpips=fake)
    assert with_lpips["losses"][0] == plain["losses"][0]  # AFS interval: untouched
    assert with_lpips["losses"][1] == pytest.approx(plain["losses"][1] + 64.0, rel=1e-6)


def test_stage2_fit(teacher, tmp_path, monkeypatch):
    calls = []
    real = stage2.sfd_iteration

    def spy(*args, **kwargs):
        cfg = args[5]
        calls.append({"teacher_solver": cfg.teacher_solver, "teacher_afs": cfg.teacher_afs,
                      **{k: kwargs[k] for k in ("student_cond", "teacher_cond")}})
        calls[-1]["sigmas"] = args[4]
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2, "sfd_iteration", spy)
    suite = tiny_suite()
    fitted = get_method("sfd-stage2").fit(FitContext(suite=suite, teacher=teacher, nfe=1,
                                                     workdir=tmp_path / "sfd-stage2-1"))
    assert len(calls) == 4
    assert calls[0] | {"sigmas": None} == {"teacher_solver": "euler", "teacher_afs": True,
                                          "student_cond": {"step_condition": 3},
                                          "teacher_cond": {"step_condition": 7}, "sigmas": None}
    assert len(calls[0]["sigmas"]) == 3

    counter = CountingDenoiser(fitted.denoiser)
    with torch.no_grad():
        out = fitted.sample(counter, torch.randn(3, 1, 8, 8))
    assert counter.calls == 1 and counter.samples == 3 and torch.isfinite(out).all()

    info = fitted.info
    if lpips_loss()[0] is None:
        assert info["loss"] == f"l1 (lpips unavailable: {lpips_loss()[1]})"
    first, second = info["fine_tuning_first_stage"], info["fine_tuning_second_stage"]
    assert fitted.fine_tuning["wall_seconds"] == pytest.approx(first["wall_seconds"] + second["wall_seconds"])
    # Euler teacher with AFS on 7 timestamps: 5 evaluations per trajectory
    assert info["teacher_evaluations"] == 4 * 4 * 5 and info["includes_teacher_trajectories"]
    # the first stage is SFD-v's shared model: an sfd-v fit in the same folder reuses it
    shared = get_method("sfd-v").fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path / "sfd-v-5"))
    assert shared.info["shared_model"] == info["first_stage_model"]
    assert shared.fine_tuning == first


def test_interrupted_stage2_resumes(teacher, tmp_path):
    suite = tiny_suite()
    method = get_method("sfd-stage2")
    whole = method.fit(FitContext(suite=suite, teacher=teacher, nfe=1, workdir=tmp_path / "a" / "stage2"))


    workdir = tmp_path / "b" / "stage2"
    with pytest.raises(FitInterrupted):
        method.fit(FitContext(suite=suite, teacher=teacher, nfe=1, workdir=workdir,
                              progress=progress_that_dies(3, prefix="fit sfd-stage2")))
    assert (workdir / "checkpoint.pt").is_file() and not (workdir / "model.safetensors").exists()
    resumed = method.fit(FitContext(suite=suite, teacher=teacher, nfe=1, workdir=workdir))
    for a, b in zip(whole.denoiser.parameters(), resumed.denoiser.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not (workdir / "checkpoint.pt").exists()
    assert json.loads((workdir / "fit.json").read_text())["fine_tuning_second_stage"]["wall_seconds"] > 0
