"""SFD-v (SFD paper Sec. 4.2): the step-condition branch the adapter attaches to the digits U-Net, the
reference's N stream, one shared model for every NFE with the same fine-tuning cost, sampling
with step condition N = NFE + 2, and resuming an interrupted fit."""

import json
import math
import random
from collections import Counter

import pytest
import torch
from conftest import FitInterrupted, progress_that_dies

from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, get_method
from sfdbench.methods.sfd import load_fitted
from sfdbench.methods.sfd_v import m_for, step_conditioned_student, step_counts
from sfdbench.networks.adapters import StepConditioned, attach_step_condition
from sfdbench.networks.layers import positional_embedding
from sfdbench.suites.digits import DigitsSuite

TINY = {"sfd": {"iterations": 2, "batch": 4, "checkpoint_every": 2}}  # -> sfd-v: 8 iterations (4x SFD's)


@pytest.fixture(scope="module")
def teacher():
    return DigitsSuite().load_teacher()


def tiny_suite(**sfd_v):
    suite = DigitsSuite()
    suite.method_options = {**TINY, **({"sfd-v": sfd_v} if sfd_v else {})}
    return suite


def test_step_stream_is_python_random_42():
    rng = random.Random(42)
    assert step_counts(50) == [rng.randint(4, 7) for _ in range(50)]
    assert set(step_counts(200)) == {4, 5, 6, 7}
    assert step_counts(10, 4, 7, seed=1) != step_counts(10)
    assert [m_for(n, 3) for n in (3, 4, 7)] == [2, 3, 3]


def test_step_embedding_uses_songunet_endpoint_frequencies():
    emb = positional_embedding(torch.tensor([5.0]), 8, endpoint=True)
    freqs = torch.tensor([1.0, 1e-4 ** (1 / 3), 1e-4 ** (2 / 3), 1e-4])
    torch.testing.assert_close(emb, torch.cat([(5 * freqs).sin(), (5 * freqs).cos()])[None])


def test_adapter_adds_the_branch_without_touching_the_teacher(teacher):
    config = teacher.net.config
    assert "step_condition" not in config  # the shipped teacher has no step modules
    conditioned = attach_step_condition(teacher)
    assert not isinstance(teacher.net, StepConditioned)  # the original is untouched
    keys = conditioned.state_dict().keys()
    base = set(teacher.state_dict())  # the teacher's weights keep their names, one level down
    assert {k.replace("net.net.", "net.", 1) for k in keys if k.startswith("net.net.")} == base
    # every residual block has its own projection, plus the two-layer step MLP
    blocks = sum(1 for name, _ in teacher.net.named_modules() if name and type(_).__name__ == "ResBlock")
    step_keys = [k for k in keys if not k.startswith("net.net.")]
    assert len(step_keys) == 2 * blocks + 4
    for a, b in zip(teacher.parameters(), conditioned.net.net.parameters()):
        assert torch.equal(a, b)


def test_unregistered_architecture_is_refused():
    from sfdbench.diffusion.denoiser import EDMPrecond

    class Plain(torch.nn.Module):
        def forward(self, x, c_noise, **cond):
            return x

    with pytest.raises(BadInput, match="no network adapter for architecture Plain"):
        attach_step_condition(EDMPrecond(Plain()))


def test_step_condition_random_init_perturbs_zero_init_does_not(teacher):
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 2.0)
    with torch.no_grad():
        ref = teacher(x, sigma)
        random_init = step_conditioned_student(DigitsSuite(), teacher, "random", 0).eval()
        zero_init = step_conditioned_student(DigitsSuite(), teacher, "zero", 0).eval()
        # unused step modules change nothing; used ones perturb (the paper's init: random, not zero)
        torch.testing.assert_close(random_init(x, sigma), ref, rtol=0, atol=0)
        assert (random_init(x, sigma, step_condition=5) - ref).abs().max() > 1e-3
        torch.testing.assert_close(zero_init(x, sigma, step_condition=5), ref, rtol=0, atol=0)
        # the init is seeded: the same seed gives the same modules
        again = step_conditioned_student(DigitsSuite(), teacher, "random", 0).eval()
        torch.testing.assert_close(again(x, sigma, step_condition=6), random_init(x, sigma, step_condition=6))
    with pytest.raises(TypeError, match="step_condition"):
        teacher(x, sigma, step_condition=4)


class StepSpy:
    """A denoiser wrapper that records the step condition of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.seen = denoiser, []
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max

    def __call__(self, x, sigma, **cond):
        self.seen.append(cond.get("step_condition"))
        return self.denoiser(x, sigma, **cond)


def test_one_model_for_every_nfe(teacher, tmp_path):
    suite = tiny_suite()
    method = get_method("sfd-v")
    assert [n for n in range(0, 8) if method.supports(n)] == [2, 3, 4, 5]
    fits = {}
    for nfe in (2, 3, 4, 5):
        fits[nfe] = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"sfd-v-{nfe}"))
        spy = StepSpy(fits[nfe].denoiser)
        counter = CountingDenoiser(spy)
        with torch.no_grad():
            out = fits[nfe].sample(counter, torch.randn(3, 1, 8, 8))
        assert torch.isfinite(out).all() and counter.calls == nfe and counter.samples == 3 * nfe
        assert spy.seen == [nfe + 2] * nfe  # step condition = N = NFE + 2 (AFS)
        assert json.loads((tmp_path / f"sfd-v-{nfe}" / "shared.json").read_text())["nfe"] == nfe
    shared = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sfd-v-shared-"))
    assert len(shared) == 1  # trained once
    assert len({json.dumps(f.fine_tuning, sort_keys=True) for f in fits.values()}) == 1  # same cost for all NFEs
    assert all(f.info["one_model_all_nfes"] and f.info["shared_model"] == fits[2].info["shared_model"]
               for f in fits.values())
    for a, b in zip(fits[2].denoiser.parameters(), fits[5].denoiser.parameters()):
        assert torch.equal(a, b)

    fit = json.loads((tmp_path / shared[0] / "fit.json").read_text())
    hp = fit["hyperparameters"]
    assert hp["iterations"] == 8 and hp["M"] == 3 and hp["teacher_solver"] == "dpmpp" and "num_steps" not in hp
    drawn = step_counts(8)
    assert fit["num_steps_drawn"] == {str(n): c for n, c in sorted(Counter(drawn).items())}
    assert all(f.info["num_steps_drawn"] == fit["num_steps_drawn"] for f in fits.values())  # in every record
    # teacher DPM-Solver++ without AFS on N_T = 4(N-1)+1 timestamps: 4(N-1) evaluations per trajectory
    assert fit["teacher_evaluations"] == 4 * sum(4 * (n - 1) for n in drawn)
    assert fit["includes_teacher_trajectories"] and fit["teacher_trajectories"] == 8 * 4

    with pytest.raises(BadInput, match="not NFE 6"):
        load_fitted(tmp_path / shared[0] / "model.safetensors", suite, teacher, "cpu", nfe=6)


def test_shared_folder_is_keyed_by_training_settings_and_teacher(teacher, tmp_path):
    method = get_method("sfd-v")
    teacher_id = DigitsSuite().teacher_id()
    a = method.shared_workdir(tiny_suite(), teacher_id, tmp_path)
    assert a == method.shared_workdir(tiny_suite(), teacher_id, tmp_path)
    assert a != method.shared_workdir(tiny_suite(iterations=9), teacher_id, tmp_path)
    assert a != method.shared_workdir(tiny_suite(), "another-teacher", tmp_path)  # another teacher -> another key


def test_bad_sfd_v_settings_are_bad_input():
    method = get_method("sfd-v")
    with pytest.raises(BadInput, match="step_init"):
        method.hyperparameters(tiny_suite(step_init="ones"), 2)
    with pytest.raises(BadInput, match="outside the trained range"):
        method.hyperparameters(tiny_suite(train_num_steps=[5, 7]), 2)
    with pytest.raises(BadInput, match="train_num_steps"):
        method.hyperparameters(tiny_suite(train_num_steps=[2, 7]), 2)


def test_interrupted_sfd_v_fit_resumes(teacher, tmp_path):
    suite = tiny_suite(iterations=4)
    method = get_method("sfd-v")
    whole = method.fit(FitContext(suite=suite, teacher=teacher, nfe=2, workdir=tmp_path / "a" / "sfd-v-2"))


    ctx = FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "b" / "sfd-v-3",
                     progress=progress_that_dies(3))  # the checkpoint after iteration 2 exists
    with pytest.raises(FitInterrupted):
        method.fit(ctx)
    shared = method.shared_workdir(suite, "", tmp_path / "b")  # FitContext's teacher_id defaults to ""
    assert (shared / "checkpoint.pt").is_file() and not (shared / "model.safetensors").exists()
    resumed = method.fit(FitContext(suite=suite, teacher=teacher, nfe=2, workdir=tmp_path / "b" / "sfd-v-2"))
    for a, b in zip(whole.denoiser.parameters(), resumed.denoiser.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not (shared / "checkpoint.pt").exists()
    assert resumed.fine_tuning["wall_seconds"] > 0 and not math.isnan(resumed.fine_tuning["device_hours"])
