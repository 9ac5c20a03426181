"""`sfdbench ablate`: one `sfd` run per knob value (records like any run, kept apart by the config
hash), and a table shaped like the paper's Table 1 in markdown, LaTeX and CSV."""

import io
import json

import pandas as pd
import pytest

from sfdbench.errors import BadInput
from sfdbench.harness import ablate
from sfdbench.harness.ablate import KNOBS, Ablation, plans
from sfdbench.harness.runner import RunPlan, make_suite
from sfdbench.methods import get_method
from sfdbench.report.ablation import render_ablation


def test_every_knob_plans_one_sfd_run_per_value(tmp_path):
    expected = {"teacher": ("teacher_solver", ["dpmpp", "heun", "dpm2", "ipndm", "euler"]),
                "K": ("M", [1, 2, 3, 4]), "sigma_min": ("sigma_min", [0.002, 0.006, 0.02]),
                "afs": ("afs", [True, False]), "loss": ("loss", ["l1", "l2"]), "rho": ("rho", [3.0, 5.0, 7.0, 9.0])}
    for name, (key, values) in expected.items():
        knob, variants, notes, default = plans("digits", name, [2, 3], [0], 10, tmp_path)
        assert knob.key == key and [v for v, _ in variants][: len(values)] == values
        for value, plan in variants:
            assert plan.grid == [("sfd", 2), ("sfd", 3)] and plan.method_overrides == {"sfd": {key: value}}
            hp = get_method("sfd").hyperparameters(make_suite(plan), 2)
            assert hp[key] == value
        assert default == {"teacher": "dpmpp", "K": 3, "sigma_min": 0.006, "afs": True, "loss": "l1",
                           "rho": 7.0}[name]
    _, variants, notes, _ = plans("digits", "loss", [2], [0], 10, tmp_path)
    if len(variants) == 2:  # offline: LPIPS cannot run, and the table says why
        assert notes and notes[0].startswith("LPIPS: unavailable")


def test_default_variant_shares_the_plain_runs_configuration(tmp_path):
    """The variant at the default value has exactly the hyperparameters (hence config hash) of
    `sfdbench run --methods sfd`, so it reuses those records and that fit."""
    plain = get_method("sfd").hyperparameters(make_suite(RunPlan("digits", [("sfd", 2)], [0], 10, tmp_path)), 2)
    for name in KNOBS:
        _, variants, _, default = plans("digits", name, [2], [0], 10, tmp_path)
        plan = dict(variants)[default]
        assert json.dumps(get_method("sfd").hyperparameters(make_suite(plan), 2), sort_keys=True) == json.dumps(
            plain, sort_keys=True)
    # afs off: one more timestamp per NFE is not free, N = NFE + 1
    _, variants, _, _ = plans("digits", "afs", [2], [0], 10, tmp_path)
    assert get_method("sfd").hyperparameters(make_suite(dict(variants)[False]), 2)["num_steps"] == 3


def test_missing_solver_is_left_out_with_a_note(monkeypatch, tmp_path):
    from sfdbench.diffusion import solvers

    monkeypatch.setattr(solvers, "SOLVERS", {k: v for k, v in solvers.SOLVERS.items() if k != "ipndm"})
    _, variants, notes, _ = plans("digits", "teacher", [2], [0], 10, tmp_path)
    assert "ipndm" not in dict(variants) and notes == ["iPNDM: not in sfdbench.diffusion.solvers.SOLVERS"]


def test_bad_ablation_input(tmp_path):
    with pytest.raises(BadInput, match="unknown --knob"):
        plans("digits", "warp", [2], [0], 10, tmp_path)
    with pytest.raises(BadInput, match="conflicts with --knob rho"):
        plans("digits", "rho", [2], [0], 10, tmp_path, overrides={"sfd": {"rho": 5.0}})
    with pytest.raises(BadInput, match="does not support NFE 11"):
        plans("digits", "rho", [11], [0], 10, tmp_path)


def synthetic() -> Ablation:
    rows = []
    for value, fids in ((3.0, (9.0, 11.0)), (7.0, (5.0, 6.0)), (9.0, (7.0, 7.5))):
        for nfe, fid in zip((2, 3), fids):
            rows.append({"knob": "rho", "hyperparameter": "rho", "value": value, "label": str(value),
                         "default": value == 7.0, "nfe": nfe, "fid_mean": fid, "fid_std": 0.25, "seeds": 3,
                         "n_samples": 500, "fine_tuning_hours": 0.0123, "device": "CPU", "config_hash": "x"})
    return Ablation("digits", KNOBS["rho"], [2, 3], 7.0, pd.DataFrame(rows), ["note_1"])


def test_table_formats():
    ab = synthetic()
    md = render_ablation(ab, "markdown")
    lines = md.splitlines()
    assert lines[0].split("|")[1].strip() == "rho" and "FID (NFE 2)" in lines[0] and "device-h (NFE 3)" in lines[0]
    assert "7.0 (default)" in md and "**5.00 ± 0.25**" in md and "**6.00 ± 0.25**" in md and "0.0123" in md
    assert "the paper's setting: 7" in md and "note\\_1" not in md and "note_1" in md
    tex = render_ablation(ab, "latex")
    assert "\\begin{tabular}{lrrrr}" in tex and "\\textbf{5.00 $\\pm$ 0.25}" in tex and "note\\_1" in tex
    csv = render_ablation(ab, "csv").splitlines()
    assert csv[0].startswith("knob,hyperparameter,value,label,default,nfe,fid_mean,fid_std") and len(csv) == 7
    with pytest.raises(BadInput):
        render_ablation(ab, "html")


def test_ablate_cli_end_to_end(cli, tmp_path):
    out = tmp_path / "res"
    args = ["ablate", "--suite", "digits", "--knob", "afs", "--nfe", "2", "--seeds", "0", "--samples", "20",
            "--out", str(out), "--set", "sfd.iterations=2", "--set", "sfd.batch=4"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| AFS") and len(rows) == 3  # header + on + off
    assert rows[1].startswith("| on (default)") and rows[2].startswith("| off")
    records = [json.loads(p.read_text()) for p in (out / "digits" / "records").glob("*.json")]
    assert sorted(r["hyperparameters"]["afs"] for r in records) == [False, True]
    assert len({r["config_hash"] for r in records}) == 2 and all(r["method"] == "sfd" for r in records)
    # rerun: the records exist and are skipped; the table is rebuilt from them as CSV
    again = cli(*args, "--format", "csv")
    assert again.returncode == 0 and "skip" in again.stderr
    assert again.stdout.splitlines()[0].startswith("knob,") and len(again.stdout.splitlines()) == 3
    # `sfdbench table --ablation` renders the same table from the records alone
    sets = ["--set", "sfd.iterations=2", "--set", "sfd.batch=4"]
    table = cli("table", "--suite", "digits", "--results", str(out), "--ablation", "afs", "--format", "csv", *sets)
    assert table.returncode == 0, table.stderr
    assert table.stdout == again.stdout
    # ...and tells a knob that was not run from one that was: only rho's default (shared with the
    # afs-on run) has numbers
    other = cli("table", "--suite", "digits", "--results", str(out), "--ablation", "rho", *sets)
    rho_rows = [line for line in other.stdout.splitlines() if line.startswith("| ") and "rho" not in line]
    assert other.returncode == 0 and len(rho_rows) == 4, other.stdout
    assert [("–" in line) for line in rho_rows] == [True, True, False, True] and "7.0 (default)" in rho_rows[2]
    empty = cli("table", "--suite", "digits", "--results", str(tmp_path / "none"), "--ablation", "rho")
    assert empty.returncode == 2 and empty.stderr.startswith("sfdbench: error: no sfd records")
    # the main table keeps the two configurations apart and says how they differ
    main = cli("table", "--suite", "digits", "--results", str(out), "--no-published")
    sfd_rows = [line for line in main.stdout.splitlines() if line.startswith("| SFD")]
    assert len(sfd_rows) == 2 and sum("[afs=" in line for line in sfd_rows) == 1, main.stdout

    bad = cli("ablate", "--knob", "warp", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.startswith("sfdbench: error: unknown --knob")
    assert not (tmp_path / "x").exists()


def test_knob_labels():
    assert ablate.KNOBS["K"].label(3) == "K = 4" and ablate.KNOBS["teacher"].label("dpmpp") == "DPM-Solver++(3M)"


def test_several_knobs_in_one_command(cli, tmp_path):
    out = tmp_path / "res"
    tiny = ["--nfe", "2", "--seeds", "0", "--samples", "20", "--out", str(out), "--set", "sfd.iterations=2",
            "--set", "sfd.batch=4"]
    r = cli("ablate", "--knob", "afs,rho", "--format", "csv", *tiny)
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(io.StringIO(r.stdout))
    assert list(rows["knob"].drop_duplicates()) == ["afs", "rho"] and len(rows) == 2 + 4
    # the default variant is shared between the knobs: 1 (afs on = rho 7) + 1 (afs off) + 3 rho values
    assert len(list((out / "digits" / "records").glob("*.json"))) == 5
    bad = cli("ablate", "--knob", "afs,warp", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown --knob 'warp'" in bad.stderr and not (tmp_path / "x").exists()
    every = cli("ablate", "--knob", "all", *tiny, "--set", "sfd.M=1")
    assert every.returncode == 2 and "conflicts with --knob K" in every.stderr
    assert len(list((out / "digits" / "records").glob("*.json"))) == 5  # checked before the teacher knob ran
