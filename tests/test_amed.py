"""AMED-Solver and AMED-Plugin (``sfdbench.methods.amed``): zero heads give the base solver, NFE is
counted, the predictor's shape and ranges, the gradient path to r, the AFS interval, the next-state
rule, a fit that writes, loads, samples and resumes with identical weights (`docs/algorithms.md#amed`)."""

import json

import pytest
import torch
import toy_suite
from conftest import FitInterrupted, progress_that_dies

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser, EDMPrecond
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, amed, get_method, load_model
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits import DigitsSuite

NAMES = ("amed", "amed-plugin", "amed-plugin-dpmpp")


def tiny_denoiser(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16, dropout=0.0)
    den = EDMPrecond(net, sigma_min=0.002, sigma_max=80.0).to(dtype).eval()
    den.requires_grad_(False)
    return den


def feature_dim(den, shape=(1, 8, 8)):
    dtype = next(den.parameters()).dtype
    with amed.BottleneckCapture(den) as cap, torch.no_grad():
        den(torch.zeros(1, *shape, dtype=dtype), torch.tensor(80.0, dtype=dtype))
        return cap.features(1).shape[1]


def with_midpoints(s):
    """The (2N - 1)-point schedule with sqrt(t_c t_n) inserted in every interval."""
    return torch.stack([v for i in range(len(s) - 1) for v in (s[i], (s[i] * s[i + 1]).sqrt())] + [s[-1]])


def tiny_suite(name, **options):
    suite = DigitsSuite()
    suite.method_options = {name: {"iterations": 2, "batch": 4, "checkpoint_every": 1, **options}}
    return suite


# ---------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("kind", ["amed", "ipndm", "dpmpp-noise", "dpmpp-data"])
def test_zero_heads_give_the_base_solver(kind, afs):
    den = tiny_denoiser()
    s = get_schedule("polynomial", 5, 0.002, 80.0, 7.0)
    predictor = amed.zero_heads(amed.AMEDPredictor(feature_dim(den), 0.01, 0.2)).double()
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if kind == "amed":
        cfg = amed.StudentConfig("amed", afs)
        ref = solvers.sample(solvers.dpm_solver_2, den, z, s, afs=afs, r=0.5)
    elif kind == "ipndm":
        cfg = amed.StudentConfig("ipndm", afs, max_order=4)
        ref = solvers.sample(solvers.ipndm, den, z, with_midpoints(s), afs=afs, max_order=4)
    else:
        opts = {"max_order": 3, "predict_x0": kind == "dpmpp-data", "lower_order_final": True, "thresholding": True}
        cfg = amed.StudentConfig("dpmpp", afs, **opts)
        ref = solvers.sample(solvers.dpmpp_multistep, den, z, with_midpoints(s), afs=afs, **opts)
    counted = CountingDenoiser(den)
    out = amed.amed_sample(den, predictor, cfg, s, counted, z)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert counted.samples == 3 * (2 * (len(s) - 1) - int(afs))


def test_predictor_shapes_ranges_and_parameter_counts():
    assert sum(p.numel() for p in amed.AMEDPredictor(64).parameters()) == 8929
    assert sum(p.numel() for p in amed.AMEDPredictor(64, 0.01).parameters()) == 8950
    assert sum(p.numel() for p in amed.AMEDPredictor(64, 0.01, 0.2).parameters()) == 8971
    torch.manual_seed(0)
    p = amed.AMEDPredictor(64, 0.01, 0.2)
    for layer in (p.head_r, p.head_dir, p.head_time):  # logits of several units: outputs inside their ranges
        layer.weight.data.mul_(5)
    r, c, a = p(torch.randn(16, 64) * 3, torch.tensor(9.7), torch.tensor(0.47))
    assert r.shape == c.shape == a.shape == (16, 1, 1, 1)
    assert (r > 0).all() and (r < 1).all()
    assert (c > 0.99).all() and (c < 1.01).all() and (a > 0.8).all() and (a < 1.2).all()
    assert r.std() > 0.01 and a.std() > 0.001  # per sample
    r, c, a = amed.zero_heads(p)(torch.randn(4, 64), 80.0, 9.7)
    assert torch.equal(r, torch.full_like(r, 0.5)) and torch.equal(c, torch.ones_like(c)) and torch.equal(a, c)


def test_nfe_rule():
    method = get_method("amed-plugin")
    assert [method.steps_for_nfe(n) for n in (1, 2, 3, 4, 5, 6, 7, 9)] == [
        (2, True), (2, False), (3, True), (3, False), (4, True), (4, False), (5, True), (6, True)]
    assert not method.supports(0) and not method.supports(True) and method.supports(10)


def test_bad_knobs_are_bad_input():
    for name, bad, match in (("amed", {"afs": False}, "follow from the NFE"), ("amed", {"num_steps": 9}, "follow"),
                             ("amed", {"scale_dir": 1.5}, "scale_dir"), ("amed", {"teacher_solver": "rk4"}, "teacher"),
                             ("amed", {"teacher_solver": "ipndm"}, "needs max_order"),
                             ("amed-plugin", {"max_order": 5}, "max_order"), ("amed", {"precision": "fp16"}, "fp32"),
                             ("amed", {"schedule": "discrete"}, "discrete"), ("amed", {"M": 0}, "M must be"),
                             ("amed", {"student": "ipndm"}, "fixed"), ("amed", {"warp": 1}, "no hyperparameter")):
        with pytest.raises(BadInput, match=match):
            get_method(name).hyperparameters(tiny_suite(name, **bad), 5)


def loss_of(den, predictor, warm, cfg, s, x, target):
    """The loss of interval 1, after interval 0 was taken by the fixed predictor ``warm`` (detached,
    as in training: the gradient path is one interval)."""
    with amed.BottleneckCapture(den) as cap:
        run = amed.AMEDTrajectory(cfg, s)
        x1 = run.interval(0, x, den, warm, cap, {}).detach()
        run.detach()
        out = run.interval(1, x1, den, predictor, cap, {})
    return (out - target).square().sum()


@pytest.mark.parametrize("kind", ["amed", "ipndm", "dpmpp"])
def test_gradient_reaches_r(kind):
    """Autograd d loss / d (bias of the r head) against a central finite difference (float64)."""
    den = tiny_denoiser()
    s = get_schedule("polynomial", 4, 0.002, 80.0, 7.0)
    torch.manual_seed(3)
    predictor = amed.AMEDPredictor(feature_dim(den), 0.01, 0.2).double()
    warm = amed.AMEDPredictor(feature_dim(den), 0.01, 0.2).double()
    cfg = amed.StudentConfig(kind, afs=True, max_order=3)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64) * 80.0
    target = torch.randn(2, 1, 8, 8, dtype=torch.float64) * 5
    bias = predictor.head_r.bias
    (grad,) = torch.autograd.grad(loss_of(den, predictor, warm, cfg, s, x, target), [bias])
    eps = 1e-4  # the network's noise embedding runs in float32: a larger step keeps its rounding out
    with torch.no_grad():
        bias += eps
        up = loss_of(den, predictor, warm, cfg, s, x, target)
        bias -= 2 * eps
        down = loss_of(den, predictor, warm, cfg, s, x, target)
        bias += eps
    fd = (up - down) / (2 * eps)
    assert float(grad.abs()) > 1e-3
    torch.testing.assert_close(grad.reshape(()), fd, rtol=1e-4, atol=1e-8)


def test_afs_interval_has_no_call_zero_features_and_a_gradient():
    den = tiny_denoiser()
    s = get_schedule("polynomial", 3, 0.002, 80.0, 7.0)
    predictor = amed.AMEDPredictor(feature_dim(den), 0.01, 0.2).double()
    seen = []
    forward = predictor.forward
    predictor.forward = lambda f, t_c, t_n: (seen.append(f.clone()), forward(f, t_c, t_n))[1]
    counted = CountingDenoiser(den)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64) * 80.0
    with amed.BottleneckCapture(den) as cap:
        out = amed.AMEDTrajectory(amed.StudentConfig("ipndm", afs=True), s).interval(0, x, counted, predictor, cap, {})
    assert counted.samples == 2  # only the evaluation at t_m
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    out.square().sum().backward()
    assert float(predictor.head_r.weight.grad.abs().sum() + predictor.head_r.bias.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind,own", [("amed", False), ("ipndm", True)])
def test_next_interval_input(kind, own, monkeypatch):
    """AMED-Solver restarts each interval from the teacher state, the multistep plugin from its own
    detached output."""
    den = tiny_denoiser(dtype=torch.float32)
    s = get_schedule("polynomial", 4, 0.002, 80.0, 7.0).float()
    teacher_s = get_schedule("polynomial", 7, 0.002, 80.0, 7.0)
    predictor = amed.AMEDPredictor(feature_dim(den), 0.01)
    inputs, outputs = [], []
    interval = amed.AMEDTrajectory.interval

    def spy(self, k, x, *args):
        inputs.append(x.clone())
        out = interval(self, k, x, *args)
        outputs.append(out.detach().clone())
        return out

    monkeypatch.setattr(amed.AMEDTrajectory, "interval", spy)
    opt = torch.optim.Adam(predictor.parameters(), lr=0.0)
    latents = torch.randn(2, 1, 8, 8)
    with amed.BottleneckCapture(den) as cap:
        amed.amed_iteration(predictor, den, opt, latents, s, teacher_s, amed.StudentConfig(kind, afs=True), "heun", {},
                            cap)
    traj = solvers.trajectory(solvers.heun, den, latents * s[0], teacher_s.float())
    for k in (1, 2):
        expected = outputs[k - 1] if own else traj[2 * k]
        assert torch.equal(inputs[k], expected), k
        assert not inputs[k].requires_grad


# ---------------------------------------------------------------------------------------------
# The methods


@pytest.mark.parametrize("name", NAMES)
def test_counted_nfe_equals_declared_on_digits(name, tmp_path):
    suite = tiny_suite(name, iterations=1, batch=2)
    teacher = suite.load_teacher()
    method = get_method(name)
    for nfe in (1, 2, 3, 4, 5, 6):
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"{nfe}"))
        counter = CountingDenoiser(fitted.denoiser)
        with torch.no_grad():
            out = fitted.sample(counter, torch.randn(3, *suite.latent_shape))
        assert fitted.nfe == nfe and counter.samples == 3 * nfe and counter.calls == nfe
        assert torch.isfinite(out).all()


@pytest.fixture
def toy():
    return toy_suite.ToyLatentSuite()


@pytest.mark.parametrize("name", NAMES)
def test_counted_nfe_equals_declared_on_the_toy_latent_suite(name, toy, tmp_path):
    """Any teacher with a bottleneck adapter (here an epsilon-prediction discrete-VP one), guided or not."""
    toy.method_options = {name: {"iterations": 1, "batch": 2, "checkpoint_every": 1}}
    teacher = toy.load_teacher()
    method = get_method(name)
    if name == "amed-plugin-dpmpp":
        assert method.hyperparameters(toy, 3)["schedule"] == "discrete"
    for nfe in (1, 2, 3, 4, 5):
        fitted = method.fit(FitContext(suite=toy, teacher=teacher, nfe=nfe, workdir=tmp_path / f"{nfe}"))
        cond = toy.training_conditioning(3, torch.Generator().manual_seed(0))
        for scale, per_call in ((1.0, 1), (2.0, 2)):
            network = CountingDenoiser(fitted.denoiser)
            view = network if scale == 1.0 else ClassifierFreeGuidance(network, scale, toy.unconditional)
            with torch.no_grad():
                out = fitted.sample(view, torch.randn(3, *toy.latent_shape), cond)
            assert network.samples == 3 * nfe * per_call and torch.isfinite(out).all()


def test_guided_features_are_the_conditional_half(toy):
    teacher = toy.load_teacher()
    cond = toy.training_conditioning(2, torch.Generator().manual_seed(0))
    x = torch.randn(2, *toy.latent_shape)
    with amed.BottleneckCapture(teacher) as cap, torch.no_grad():
        teacher(x, torch.tensor(1.0), **cond)
        plain = cap.features(2)
        ClassifierFreeGuidance(teacher, 3.0, toy.unconditional)(x, torch.tensor(1.0), **cond)
        guided = cap.features(2)
    torch.testing.assert_close(guided, plain)


def test_fit_writes_a_model_that_loads_and_samples_with_its_accounting(tmp_path):
    name = "amed-plugin"
    suite = tiny_suite(name, iterations=2, batch=4)
    teacher = suite.load_teacher()
    fitted = get_method(name).fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path))
    path = tmp_path / "model.safetensors"
    assert path.is_file() and not (tmp_path / "checkpoint.pt").exists()
    fit = json.loads((tmp_path / "fit.json").read_text())
    # N = 4, M = 2: the iPNDM teacher makes 9 evaluations per trajectory, the student 5; 3 predictor calls
    assert fit["teacher_evaluations"] == 2 * 4 * (9 + 5)
    assert fit["student_evaluations"] == 2 * 4 * 3
    ft = fit["fine_tuning"]
    assert ft["device_hours"] > 0 and ft["wall_seconds"] > 0 and ft["flops"] > 0
    per = fit["flops"]
    assert ft["flops"] == pytest.approx(fit["teacher_evaluations"] * per["teacher_forward_per_sample"]
                                        + fit["student_evaluations"] * per["per_predictor_call"])
    assert per["teacher_backward_to_input_per_sample"] > 0
    assert fit["predictor_parameters"] == 8971  # 8x8 bottleneck: 64 features, three heads (the paper's count)
    loaded = load_model(path, suite, teacher, "cpu")
    assert loaded.nfe == 5 and loaded.fine_tuning == ft
    assert loaded.info["teacher_evaluations"] == fit["teacher_evaluations"]
    z = torch.randn(4, *suite.latent_shape)
    torch.testing.assert_close(loaded.sample(teacher, z), fitted.sample(teacher, z), rtol=0, atol=0)
    with pytest.raises(BadInput, match="NFE 5 only"):
        load_model(path, suite, teacher, "cpu", nfe=3)
    again = get_method(name).fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path))  # loads, no refit
    assert again.fine_tuning == ft


@pytest.mark.parametrize("name", ["amed", "amed-plugin-dpmpp"])
def test_interrupted_fit_resumes_with_identical_weights(name, tmp_path):
    suite = tiny_suite(name, iterations=4, batch=4, checkpoint_every=2)
    teacher = suite.load_teacher()
    method = get_method(name)
    whole = method.fit(FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "whole"))
    ctx = FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "resumed", progress=progress_that_dies(3))
    with pytest.raises(FitInterrupted):
        method.fit(ctx)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = method.fit(FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "resumed"))
    a, b = whole.sample.predictor.state_dict(), resumed.sample.predictor.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    fit = json.loads((tmp_path / "resumed" / "fit.json").read_text())
    whole_fit = json.loads((tmp_path / "whole" / "fit.json").read_text())
    assert fit["teacher_evaluations"] == whole_fit["teacher_evaluations"]
