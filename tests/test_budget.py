"""Equal-budget rows (`run --budget sfd`) and the cost table (`table --cost`)."""

from __future__ import annotations

import json
import sys

import pytest

from sfdbench.cli import main

TINY = ["--set", "sfd.iterations=2", "--set", "sfd.batch=4", "--set", "sfd.checkpoint_every=1",
        "--set", "pd.start_steps=8", "--set", "pd.iterations=50", "--set", "pd.batch=4",
        "--set", "pd.checkpoint_every=5"]


def cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_pd_at_sfds_budget_spends_sfds_flops_and_the_cost_table_compares(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    base = ["run", "--suite", "digits", "--nfe", "2", "--seeds", "0", "--samples", "8", "--out", str(out), *TINY]
    assert cli(monkeypatch, *base, "--methods", "sfd") == 0
    assert cli(monkeypatch, *base, "--methods", "pd", "--budget", "sfd") == 0
    recs = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "digits" / "records").glob("*.json"))}
    sfd, pd = recs["sfd"], recs["pd"]
    budget = sfd["fine_tuning"]["flops"]
    assert pd["hyperparameters"]["budget_flops"] == budget
    assert "SFD's budget at this NFE" in pd["display"]
    # PD stops within one iteration of the budget (50 iterations per round would cost far more)
    assert 0.5 * budget <= pd["fine_tuning"]["flops"] <= 1.5 * budget
    capsys.readouterr()
    assert cli(monkeypatch, "table", "--suite", "digits", "--cost", "--results", str(out), "--format", "csv") == 0
    table = capsys.readouterr().out
    assert "flops_ratio_to_sfd" in table.splitlines()[0] and "pd" in table


@pytest.mark.parametrize("args, message", [
    (["--methods", "heun", "--nfe", "2", "--budget", "sfd"], "takes no compute budget"),
    (["--methods", "pd", "--nfe", "2", "--budget", "lots"], "--budget must be"),
    (["--methods", "pd", "--nfe", "2", "--budget", "-5"], "--budget must be"),
])
def test_bad_budget_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, "run", "--suite", "digits", "--out", str(tmp_path / "r"), *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "r").exists()


def test_consistency_methods_fit_their_schedule_into_the_budget():
    """The equal-budget protocol picks the iteration count (warm-up, EMA and ECT's stages scale with
    it) instead of cutting the recipe's long schedule short."""
    from types import SimpleNamespace

    from sfdbench.methods import get_method

    ect = get_method("ect")
    hp = {"budget_flops": 12_000.0, "batch": 4, "iterations": 2000}
    ctx = SimpleNamespace(teacher=None, suite=None, device="cpu")
    scaled = ect.iterations_within_budget(hp, ctx, {}, student_flops=3)
    assert scaled["iterations"] == 1000 and scaled["iterations_recipe"] == 2000
    assert ect.iterations_within_budget({**hp, "budget_flops": None}, ctx, {}, 3) == {**hp, "budget_flops": None}
    assert ect.iterations_within_budget({**hp, "budget_flops": 1e12}, ctx, {}, 3)["iterations"] == 2000


def test_cost_table_matches_sfd_at_the_scale_a_row_targets():
    """Guided PD distilled at w = 1.25 is compared with SFD sampled with guidance 1.25 only: unguided
    SFD's lower FID measures another distribution and must not give it a ratio."""
    import pandas as pd

    from sfdbench.report.tables import cost_table

    def rows(method, display, nfe, w_sampler, w_target, fids, flops):
        return [{"method": method, "display": display, "group": "distillation", "nfe": nfe, "seed": s,
                 "variant": f"{method}{nfe}{w_sampler}", "guidance": w_sampler, "target_guidance": w_target,
                 "fid": f, "fine_tuning_flops": flops, "n_samples": 1000} for s, f in enumerate(fids)]

    records = pd.DataFrame(rows("sfd", "SFD", 2, 1.0, 1.0, [3.0, 3.2], 5e12)
                           + rows("sfd", "SFD (CFG w=1.25, 2 evals/step)", 2, 1.25, 1.25, [7.5, 8.0], 5e12)
                           + rows("sfd", "SFD (CFG w=1.25, 2 evals/step)", 1, 1.25, 1.25, [18.0, 19.0], 3e12)
                           + rows("guided-pd", "Guided PD (w=1.25)", 1, 1.0, 1.25, [11.0, 11.4], 3e12)
                           + rows("guided-pd", "Guided PD (w=1.25)", 2, 1.0, 1.25, [6.0, 6.0], 3e13))
    table = cost_table(records).set_index(["method", "nfe"])
    one, two = table.loc[("guided-pd", 1)], table.loc[("guided-pd", 2)]
    assert one["sfd_match"] == "SFD NFE 2 w=1.25 (FID 7.75)" and one["flops_ratio_to_sfd"] == pytest.approx(0.6)
    # unguided SFD (FID 3.1) would match 6.0; at w = 1.25 SFD does not reach it
    assert two["sfd_match"] == "SFD does not reach this FID here (at w=1.25)" and pd.isna(two["flops_ratio_to_sfd"])
    # records that predate target_guidance compare as they always did
    old = cost_table(records.drop(columns="target_guidance")).set_index(["method", "nfe"])
    assert old.loc[("guided-pd", 2), "sfd_match"] == "SFD NFE 2 (FID 3.10)"


def test_a_guided_pd_record_names_the_scale_it_was_distilled_at(tmp_path, monkeypatch):
    out = tmp_path / "r"
    tiny = [f"--set=guided-pd.{k}={v}" for k, v in
            {"start_steps": 2, "iterations": 2, "batch": 4, "checkpoint_every": 1, "guidance": 1.5}.items()]
    assert cli(monkeypatch, "run", "--suite", "digits-cond", "--methods", "guided-pd", "--nfe", "1", "--seeds", "0",
               "--samples", "8", "--out", str(out), *tiny) == 0
    (path,) = (out / "digits-cond" / "records").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["guidance"]["scale"] == 1.0 and rec["guidance"]["distilled_scale"] == 1.5
    from sfdbench.records import load_records

    assert load_records(out, "digits-cond")["target_guidance"].tolist() == [1.5]
