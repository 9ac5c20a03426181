"""GITS (``sfdbench/methods/gits.py``): the DP against brute force, the cost matrix on an Euler
teacher, the reference's CIFAR-10 schedule on the 61-level grid, NFE counted = declared on digits
and on the toy latent suite, AFS insertion, determinism over batch splits, fit accounting and reuse,
and the ``gits-schedule`` command."""

import itertools
import json

import numpy as np
import pytest
import torch
import toy_suite

from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.harness.runner import RunPlan, run
from sfdbench.methods import FitContext, get_method
from sfdbench.methods.gits import (
    brute_force_schedule,
    cost_sums,
    deviation,
    dp_schedule,
    path_value,
    teacher_run,
)
from sfdbench.suites import SUITES, register_suite
from sfdbench.suites.digits import DigitsSuite

# the reference's iPNDM 6-step CIFAR-10 schedule (gits-main README) and its indices on the 61-level grid
REFERENCE_SIGMAS = [80, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002]
REFERENCE_INDICES = [0, 19, 27, 33, 39, 45, 60]
SMALL = {"num_warmup": 12, "warmup_batch": 12, "grid_steps": 21}


def small_suite(**options):
    s = DigitsSuite()
    s.method_options = {**s.method_options, "gits": {**SMALL, **options}}
    return s


@pytest.fixture(scope="module")
def digits():
    s = small_suite()
    return s, s.load_teacher()


# ---------------------------------------------------------------------------------------------
# DP


def direct_value(cost: np.ndarray, path, coeff: float) -> float:
    """sum_m coeff^m C[i_m, i_{m+1}], written independently of the module."""
    return sum(coeff**m * cost[a, b] for m, (a, b) in enumerate(zip(path[:-1], path[1:])))


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_dp_equals_brute_force_on_random_costs(coeff):
    rng = np.random.default_rng(int(coeff * 100))
    for _ in range(60):
        t = int(rng.integers(3, 11))
        n = int(rng.integers(2, min(t, 5) + 1))  # K = N - 1 <= 4 segments
        cost = rng.normal(size=(t, t))  # negative entries included (dev costs are signed)
        path, value = dp_schedule(cost, n, coeff)
        best, best_value = brute_force_schedule(cost, n, coeff)
        assert path == best and value == best_value
        assert len(path) == n and path[0] == 0 and path[-1] == t - 1 and all(np.diff(path) > 0)
        assert value == path_value(cost, path, coeff)
        every = [direct_value(cost, [0, *m, t - 1], coeff) for m in itertools.combinations(range(1, t - 1), n - 2)]
        assert value == pytest.approx(min(every), abs=1e-12)


def test_dp_takes_the_lexicographically_smallest_of_tied_optima():
    rng = np.random.default_rng(1)
    for _ in range(60):
        t = int(rng.integers(4, 10))
        n = int(rng.integers(2, min(t, 5) + 1))
        cost = rng.integers(-1, 2, size=(t, t)).astype(float)  # many exact ties
        for coeff in (1.0, 2.0):  # exact arithmetic on small integers
            values = {tuple(m): direct_value(cost, [0, *m, t - 1], coeff)
                      for m in itertools.combinations(range(1, t - 1), n - 2)}
            low = min(values.values())
            expected = [0, *min(m for m, v in values.items() if v == low), t - 1]
            assert dp_schedule(cost, n, coeff) == (expected, low)


def test_dp_degenerate_budgets_and_bad_input():
    cost = np.random.default_rng(2).normal(size=(7, 7))
    assert dp_schedule(cost, 7)[0] == list(range(7))
    assert dp_schedule(cost, 2)[0] == [0, 6]
    path, _ = dp_schedule(cost, 4, min_first=3)
    assert path[1] >= 3 and (path, _) == brute_force_schedule(cost, 4, min_first=3)
    for bad in ((cost, 8, 1.15), (cost, 1, 1.15), (cost, 3, 0.0), (cost[:, :3], 2, 1.15)):
        with pytest.raises(ValueError):
            dp_schedule(*bad)
    nan = cost.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dp_schedule(nan, 3)


def test_reference_cifar10_schedule_on_the_61_level_grid():
    """The README's 6-step schedule is the grid at indices [0, 19, 27, 33, 39, 45, 60]; a cost matrix
    that makes those segments the cheapest gives exactly that schedule back."""
    grid = get_schedule("polynomial", 61, 0.002, 80.0, 7.0)
    assert [round(float(grid[i]), 4) for i in REFERENCE_INDICES] == pytest.approx(REFERENCE_SIGMAS, abs=1e-9)
    rng = np.random.default_rng(3)
    cost = 0.5 + rng.random((61, 61))
    for a, b in zip(REFERENCE_INDICES[:-1], REFERENCE_INDICES[1:]):
        cost[a, b] = rng.random() * 0.1
    path, _ = dp_schedule(cost, 7, 1.15)
    assert path == REFERENCE_INDICES
    assert [round(float(grid[i]), 4) for i in path] == pytest.approx(REFERENCE_SIGMAS, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Cost matrix


def gaussian_denoiser(sd: float = 0.5):
    """The exact denoiser of N(0, sd^2 I) data: D(x; sigma) = x sd^2 / (sigma^2 + sd^2)."""
    def denoise(x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return x * sd**2 / (sigma**2 + sd**2)
    return denoise


@pytest.mark.parametrize("metric", ["l1", "l2", "dev"])
def test_euler_teacher_has_zero_cost_on_its_own_steps(metric):
    grid = get_schedule("polynomial", 9, 0.002, 80.0)
    z = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    states, directions = teacher_run(gaussian_denoiser(), z, grid, "euler")
    assert states.shape == (9, 5, 2, 3, 3) and directions.shape == (8, 5, 2, 3, 3)
    sums = cost_sums(states, directions, grid, metric)
    assert torch.equal(torch.diagonal(sums, 1), torch.zeros(8, dtype=torch.float64))
    assert torch.equal(torch.tril(sums), torch.zeros_like(sums))
    assert bool((sums[torch.triu(torch.ones(9, 9, dtype=torch.bool), 2)] != 0).all())  # longer jumps do cost
    flat = states.flatten(2)
    dev = deviation(flat, flat[0], flat[-1])
    assert float(dev[-1].abs().max()) < 1e-5  # the end point lies on the line (exactly 0 in the costs)
    assert float(dev[0].abs().max()) < 1e-6 * float(flat[0].norm(dim=-1).min())  # so does the start, up to rounding


def test_deviation_is_the_distance_from_the_line():
    start, end = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    points = torch.tensor([[[1.0, 3.0]], [[5.0, -4.0]], [[1.0, 0.0]]])
    torch.testing.assert_close(deviation(points, start, end), torch.tensor([[3.0], [4.0], [0.0]]))


def test_ipndm_teacher_directions_are_at_the_states(digits):
    suite, teacher = digits
    grid = get_schedule("polynomial", 6, 0.002, 80.0)
    z = torch.randn(3, *suite.latent_shape, generator=torch.Generator().manual_seed(0))
    states, directions = teacher_run(teacher, z, grid, "ipndm", {"max_order": 4})
    g = grid.to(torch.float32)
    for j in range(5):
        with torch.no_grad():
            torch.testing.assert_close(directions[j], (states[j] - teacher(states[j], g[j])) / g[j])


# ---------------------------------------------------------------------------------------------
# The method


def test_nfe_counted_equals_declared_on_digits(digits, tmp_path):
    suite, teacher = digits
    method = get_method("gits")
    for nfe in (1, 2, 5):
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=tmp_path / f"n{nfe}"))
        counter = CountingDenoiser(fitted.denoiser)
        with torch.no_grad():
            out = fitted.sample(counter, torch.randn(3, *suite.latent_shape))
        assert torch.isfinite(out).all() and counter.samples == 3 * nfe and fitted.nfe == nfe
        sigmas = fitted.info["schedule_sigmas"]
        assert len(sigmas) == nfe + 1 and sigmas[0] == 80.0 and sigmas[-1] == pytest.approx(0.002)
        grid = get_schedule("polynomial", 21, 0.002, 80.0)
        assert sigmas == [float(grid[i]) for i in fitted.info["schedule_indices"]]  # members of the fine grid


def test_fit_accounting_is_recorded_and_the_fit_is_reused(digits, tmp_path, monkeypatch):
    suite, teacher = digits
    method = get_method("gits")
    ctx = FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "fit", teacher_id="t")
    fitted = method.fit(ctx)
    ft = fitted.fine_tuning
    assert ft["wall_seconds"] > 0 and ft["devices"] == 1 and ft["device"]
    assert ft["device_hours"] == pytest.approx(ft["wall_seconds"] / 3600)
    info = fitted.info
    assert info["teacher_evaluations"] == 12 * 20 and info["teacher_trajectories"] == 12
    assert ft["flops"] == pytest.approx(info["teacher_evaluations"] * info["flops"]["teacher_forward_per_sample"])
    assert ft["flops"] > 0 and info["includes_teacher_trajectories"]
    assert info["search_parts"]["warmup"]["reused"] is False
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved["schedule_indices"] == info["schedule_indices"] and len(saved["cost_matrix"]) == 21
    warmups = sorted(tmp_path.glob("gits-warmup-*"))
    assert len(warmups) == 1 and (warmups[0] / "warmup.json").is_file()

    def must_not_run(*a, **k):
        raise AssertionError("this must be reused, not computed again")

    # another NFE (and another student solver) reuses the warm-up and still reports its whole cost
    monkeypatch.setattr(type(method), "_warmup", must_not_run)
    other = method.fit(FitContext(suite=suite, teacher=teacher, nfe=5, workdir=tmp_path / "fit5", teacher_id="t"))
    assert other.info["search_parts"]["warmup"]["reused"] is True
    assert other.info["teacher_evaluations"] == 12 * 20 and other.fine_tuning["wall_seconds"] >= \
        info["search_parts"]["warmup"]["wall_seconds"]
    np.testing.assert_array_equal(json.loads((tmp_path / "fit5" / "fit.json").read_text())["cost_matrix"],
                                  saved["cost_matrix"])
    # a finished fit is loaded, not searched again
    monkeypatch.setattr(type(method), "search", must_not_run)
    again = method.fit(ctx)
    assert again.info == info and again.fine_tuning == ft
    # another teacher id gets its own warm-up
    monkeypatch.undo()
    method.fit(FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path / "fit-u", teacher_id="u"))
    assert len(list(tmp_path.glob("gits-warmup-*"))) == 2


def test_gits_ddim_shares_the_search_with_gits(digits, tmp_path):
    suite, teacher = digits
    suite = small_suite()
    suite.method_options["gits-ddim"] = dict(SMALL)
    ipndm = get_method("gits").fit(FitContext(suite=suite, teacher=teacher, nfe=4, workdir=tmp_path / "a"))
    ddim = get_method("gits-ddim")
    assert ddim.display_name(ddim.hyperparameters(suite, 4)) == "DDIM + GITS"
    euler = ddim.fit(FitContext(suite=suite, teacher=teacher, nfe=4, workdir=tmp_path / "b"))
    assert euler.info["schedule_indices"] == ipndm.info["schedule_indices"]
    assert euler.info["search_parts"]["warmup"]["reused"] and len(list(tmp_path.glob("gits-warmup-*"))) == 1
    counter = CountingDenoiser(euler.denoiser)
    with torch.no_grad():
        a = euler.sample(counter, torch.ones(1, *suite.latent_shape))
        b = ipndm.sample(euler.denoiser, torch.ones(1, *suite.latent_shape))
    assert counter.samples == 4 and not torch.equal(a, b)  # same schedule, another solver


def test_afs_inserts_one_free_step(digits, tmp_path):
    suite = small_suite(afs=True)
    teacher = digits[1]
    method = get_method("gits")
    hp = method.hyperparameters(suite, 4)
    assert method.display_name(hp) == "iPNDM + GITS + AFS"
    fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=4, workdir=tmp_path / "afs"))
    again = method.fit(FitContext(suite=suite, teacher=teacher, nfe=4, workdir=tmp_path / "afs-again"))
    assert again.info["schedule_indices"] == fitted.info["schedule_indices"]  # AFS from the stored warm-up
    assert again.info["search_parts"]["warmup"]["reused"] and again.info["teacher_evaluations"] == \
        fitted.info["teacher_evaluations"]
    indices, dp_indices = fitted.info["schedule_indices"], fitted.info["dp_indices"]
    assert len(dp_indices) == 5 and len(indices) == 6
    assert indices == [0, fitted.info["afs_index"], *dp_indices[1:]] and 1 <= indices[1] <= dp_indices[1] - 1
    counter = CountingDenoiser(fitted.denoiser)
    with torch.no_grad():
        fitted.sample(counter, torch.randn(2, *suite.latent_shape))
    assert counter.samples == 2 * 4
    # warm-up plus the AFS trials, each a counted student run on the last warm-up batch
    trials = dp_indices[1] - 1
    assert fitted.info["teacher_evaluations"] == 12 * (20 - 1) + trials * 12 * 4


def test_indices_do_not_depend_on_the_batch_split(digits):
    teacher = digits[1]
    method = get_method("gits")
    results = [method.search(s, teacher, 4) for s in (small_suite(num_warmup=16, warmup_batch=16),
                                                         small_suite(num_warmup=16, warmup_batch=5))]
    assert results[0].indices == results[1].indices
    np.testing.assert_allclose(results[0].cost, results[1].cost, rtol=1e-5, atol=1e-6)


def test_euler_student_and_bad_hyperparameters():
    method = get_method("gits")
    hp = method.hyperparameters(small_suite(solver="euler"), 3)
    assert method.display_name(hp) == "DDIM + GITS" and hp["num_steps"] == 4
    defaults = method.hyperparameters(DigitsSuite(), 5)
    assert (defaults["grid_steps"], defaults["num_warmup"], defaults["metric"], defaults["coeff"],
            defaults["teacher_solver"], defaults["solver"]) == (61, 256, "dev", 1.15, "ipndm", "ipndm")
    for bad in ({"metric": "bdev"}, {"solver": "heun"}, {"coeff": 0}, {"num_warmup": 0}, {"num_steps": 9},
                {"grid_steps": 4}, {"afs": "yes"}, {"search_guidance": 2.0}, {"teacher_solver": "unipc"}):
        with pytest.raises(BadInput):
            method.hyperparameters(small_suite(**bad), 5)
    assert method.supports_in(small_suite(), 20) and not method.supports_in(small_suite(afs=True), 20)
    assert method.supports(60) and not method.supports(61) and not method.supports(0)


def test_gits_on_the_toy_latent_suite_through_the_harness(tmp_path):
    register_suite(toy_suite.NAME, toy_suite.ToyLatentSuite)
    try:
        grid = [("gits", 2), ("gits", 3), ("gits", 2, 2.0)]
        run(RunPlan(suite=toy_suite.NAME, grid=grid, seeds=[0], samples=4, out=tmp_path, batch=4,
                    method_overrides={"gits": {"num_warmup": 8, "warmup_batch": 8, "grid_steps": 11,
                                               "schedule": "discrete", "rho": 1.0}}))
    finally:
        SUITES.pop(toy_suite.NAME, None)
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / toy_suite.NAME / "records").glob("*.json"))]
    assert sorted((r["nfe"], r["guidance"]["scale"]) for r in recs) == [(2, 1.0), (2, 2.0), (3, 1.0)]
    for r in recs:
        per_call = r["guidance"]["network_evaluations_per_call"]
        assert r["nfe_counted"] == r["nfe"] * per_call and r["group"] == "solver"
        assert len(r["fit_info"]["schedule_sigmas"]) == r["nfe"] + 1 and r["fine_tuning"]["flops"] > 0
        assert r["fit_info"]["teacher_evaluations"] == 8 * 10


def run_main(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``sfdbench ARGS`` in this process through ``cli.main`` (its exit-code mapping included)."""
    from sfdbench.cli import main

    monkeypatch.setattr("sys.argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_gits_schedule_command(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "gits-schedule", "--suite", "digits", "--nfe", "3",
                              "--set", "gits.num_warmup=8", "--set", "gits.grid_steps=21")
    assert code == 0, err
    sigmas = next(line for line in out.splitlines() if line.startswith("sigmas:"))
    values = [float(v) for v in sigmas.split(":", 1)[1].split(",")]
    assert len(values) == 4 and values[0] == 80.0 and values[-1] == 0.002
    assert "teacher evaluations" in out and "device-hours" in out and "FLOPs" in out
    for bad in (["--nfe", "0"], ["--nfe", "3", "--suite", "nope"], ["--nfe", "3", "--set", "gits.metric=bdev"],
                ["--nfe", "3", "--set", "sfd.iterations=2"], ["--nfe", "3", "--device", "nowhere"]):
        code, out, err = run_main(capsys, monkeypatch, "gits-schedule", *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("sfdbench: error:"), (bad, err)
