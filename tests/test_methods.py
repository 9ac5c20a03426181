"""Every registered method: NFE counted equals NFE declared, at every NFE we run."""

import pytest
import torch

from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.errors import BadInput
from sfdbench.methods import FitContext, all_methods, get_method
from sfdbench.suites.digits import DigitsCondSuite, DigitsSuite

TINY_FITS = {"sfd": {"iterations": 2, "batch": 4, "checkpoint_every": 1},
             **{m: {"iterations": 1, "batch": 2} for m in ("amed", "amed-plugin", "amed-plugin-dpmpp", "epd")},
             **{m: {"num_warmup": 4, "warmup_batch": 4} for m in ("gits", "gits-ddim")},
             **{m: {"start_steps": 8, "iterations": 1, "batch": 2} for m in ("pd", "guided-pd")},
             **{m: {"iterations": 1, "batch": 2, "checkpoint_every": 1} for m in ("cd", "ect")}}


def tiny(s):
    s.method_options = {k: dict(v) for k, v in TINY_FITS.items()}
    return s


@pytest.fixture(scope="module")
def suite():
    return tiny(DigitsSuite())


@pytest.fixture(scope="module")
def teacher(suite):
    return suite.load_teacher()


@pytest.fixture(scope="module")
def cond_suite():
    return tiny(DigitsCondSuite())


def nfes_to_check(method):
    return [n for n in (1, 2, 3, 4, 5, 6, 10, 36) if method.supports(n)]


@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_nfe_counted_equals_declared(name, suite, teacher, cond_suite, tmp_path):
    method = get_method(name)
    if getattr(method, "guided", False):  # distils classifier-free guidance: needs the conditional suite
        suite, teacher = cond_suite, cond_suite.load_teacher()
    checked = nfes_to_check(method)
    assert checked, f"{name} supports none of the NFEs we test"
    if method.group == "distillation":
        checked = checked[:2]  # each NFE is a (tiny) fit
    for nfe in checked:
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"{name}-{nfe}"))
        counter = CountingDenoiser(fitted.denoiser)
        latents = torch.randn(3, *suite.latent_shape)
        with torch.no_grad():
            out = fitted.sample(counter, latents)
        assert out.shape == latents.shape and torch.isfinite(out).all()
        assert counter.samples == 3 * nfe, f"{name} NFE {nfe}: {counter.samples / 3} evaluations per sample"
        # parallel solvers (EPD) batch their directions: one call per round, the paper's "parallel NFE"
        assert counter.calls == fitted.info.get("parallel_nfe", nfe)


def test_unsupported_nfe_is_bad_input():
    with pytest.raises(BadInput, match="does not support NFE 3"):
        get_method("heun").check_nfe(3)
    with pytest.raises(BadInput):
        get_method("ddim").check_nfe(0)
    with pytest.raises(BadInput, match="unknown method"):
        get_method("warp-drive")


def test_heun_nfe_rule():
    heun = get_method("heun")
    assert [n for n in range(1, 12) if heun.supports(n)] == [2, 4, 6, 8, 10]
    assert heun.hyperparameters(DigitsSuite(), 36)["num_steps"] == 19


def test_overrides_enter_hyperparameters(suite):
    hp = get_method("sfd").hyperparameters(suite, 2)
    assert hp["iterations"] == 2 and hp["num_steps"] == 4 and hp["M"] == 3 and hp["sigma_min"] == 0.006
    bad = DigitsSuite()
    bad.method_options = {"ddim": {"num_steps": 9}}
    with pytest.raises(BadInput):
        get_method("ddim").hyperparameters(bad, 2)


@pytest.mark.parametrize("name,nfe,steps", [("heun", 3, 3), ("heun", 9, 6), ("dpmpp3m", 5, 7), ("ddim", 1, 3)])
def test_afs_can_be_switched_on_for_any_solver(name, nfe, steps, teacher):
    """`--set METHOD.afs=true`: the first step is analytic (no network call), so one more
    timestamp fits in the same NFE; the count is still exact and the table name says + AFS."""
    s = DigitsSuite()
    s.method_options = {name: {"afs": True}}
    method = get_method(name)
    method.check_nfe(nfe, s)
    hp = method.hyperparameters(s, nfe)
    assert hp["afs"] is True and hp["num_steps"] == steps
    assert method.display_name(hp) == f"{method.display} + AFS"
    assert method.display_name(method.hyperparameters(DigitsSuite(), 4)) == method.display
    fitted = method.fit(FitContext(suite=s, teacher=teacher, nfe=nfe, workdir=None))
    counter = CountingDenoiser(fitted.denoiser)
    with torch.no_grad():
        fitted.sample(counter, torch.randn(2, *s.latent_shape))
    assert counter.calls == nfe


def test_afs_changes_which_nfes_a_two_evaluation_solver_supports():
    on = DigitsSuite()
    on.method_options = {"heun": {"afs": True}}
    heun = get_method("heun")
    with pytest.raises(BadInput, match="does not support NFE 4"):
        heun.check_nfe(4, on)
    with pytest.raises(BadInput, match="does not support NFE 3"):
        heun.check_nfe(3, DigitsSuite())
    with pytest.raises(BadInput, match="odd with --set heun.afs=true"):
        heun.check_nfe(3)
    bad = DigitsSuite()
    bad.method_options = {"heun": {"afs": "yes"}}
    with pytest.raises(BadInput, match="afs must be true or false"):
        heun.hyperparameters(bad, 4)
