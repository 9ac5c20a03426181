"""The paired regression gate: per-seed differences against measured cross-machine tolerances.

A planted regression of about 1 FID on a distilled method passes the old unpaired rule (2 x seed
std, 5 %, floor) but fails the paired one, while a rerun that moved as little as a cross-machine
rerun does passes; the committed tolerance measurement covers every reference row and replays."""

import json
from pathlib import Path

import pandas as pd
import pytest

from sfdbench.errors import BadInput
from sfdbench.records import load_records
from sfdbench.report.check import (
    PAIRED_FLOOR,
    SAFETY_FACTOR,
    compare,
    failed,
    load_tolerances,
    measure_tolerances,
    tolerance,
    tolerances_path,
)

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
SUITES = ("digits", "digits-cond")
DISTILLED = ("sfd", "sfd-v", "sfd-stage2")


def _shifted(records: pd.DataFrame, shift, methods=None) -> pd.DataFrame:
    """A copy of ``records`` with FID moved by ``shift`` (a number or one value per seed) on ``methods``."""
    out = records.copy()
    rows = out["method"].isin(methods) if methods else pd.Series(True, index=out.index)
    per_seed = shift if callable(shift) else (lambda s: shift)
    out.loc[rows, "fid"] = out.loc[rows, "fid"] + out.loc[rows, "seed"].map(per_seed)
    return out


def test_planted_regression_fails_paired_but_passed_the_old_rule():
    ref = load_records(REFERENCE, "digits")
    rerun = _shifted(ref, {0: 0.01, 1: -0.02, 2: 0.015}.get)  # a cross-machine-sized wobble
    tolerances = {k: v["tolerance"] for k, v in _rows(measure_tolerances(rerun, ref, "digits", {}, {})).items()}
    assert not failed(compare(rerun, ref, tolerances))
    planted = _shifted(ref, 1.0, ["sfd"])  # SFD 1 FID worse on every seed
    paired = compare(planted, ref, tolerances)
    row = paired[(paired["method"] == "sfd") & (paired["metric"] == "fid")].iloc[0]
    assert row["rule"] == "paired" and row["status"] == "regression" and row["delta"] == pytest.approx(1.0)
    assert failed(paired)
    old = compare(planted, ref)  # no measured tolerances: the old unpaired rule
    old_row = old[(old["method"] == "sfd") & (old["metric"] == "fid")].iloc[0]
    assert old_row["rule"] == "unpaired" and old_row["status"] == "ok" and old_row["tolerance"] > 1.0


def _rows(document: dict) -> dict:
    return {(r["method"], r["nfe"], r["guidance"], r["metric"]): r for r in document["rows"]}


def test_measured_tolerance_rule():
    ref = load_records(REFERENCE, "digits")
    same = measure_tolerances(ref, ref, "digits", {}, {})
    for row in same["rows"]:
        assert row["bit_identical"] and row["tolerance"] == PAIRED_FLOOR[row["metric"]]
    moved = _rows(measure_tolerances(_shifted(ref, 0.3, ["sfd-v"]), ref, "digits", {}, {}))
    assert moved[("sfd-v", 2, 1.0, "fid")]["tolerance"] == pytest.approx(SAFETY_FACTOR * 0.3)
    assert moved[("sfd-v", 2, 1.0, "fid")]["mean_paired_difference"] == pytest.approx(0.3)
    assert moved[("sfd", 2, 1.0, "fid")]["tolerance"] == PAIRED_FLOOR["fid"]
    changed = measure_tolerances(ref.assign(config_hash="x"), ref, "digits", {}, {})
    assert not changed["rows"] and changed["skipped"]


def test_unpaired_fallback_when_seeds_do_not_pair():
    ref = load_records(REFERENCE, "digits")
    tolerances = {k: v["tolerance"] for k, v in _rows(measure_tolerances(ref, ref, "digits", {}, {})).items()}
    fewer = ref[ref["seed"] != 2]
    result = compare(fewer, ref, tolerances)
    assert set(result["rule"]) == {"unpaired"}
    sfd = ref[(ref["method"] == "sfd")]
    row = result[(result["method"] == "sfd") & (result["metric"] == "fid")].iloc[0]
    assert row["tolerance"] == pytest.approx(tolerance("fid", sfd["fid"].mean(), sfd["fid"].std()))


def test_bad_tolerance_file_is_bad_input(tmp_path):
    path = tolerances_path(tmp_path, "digits")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rows": [{"method": "sfd"}]}))
    with pytest.raises(BadInput):
        load_tolerances(tmp_path, "digits")
    assert load_tolerances(tmp_path, "digits-cond") == {}  # absent: every row unpaired


def test_check_command_measures_tolerances_then_gates_paired(cli, tmp_path):
    from sfdbench.records import read_record, record_path, write_record

    ref_dir, fresh_dir, planted_dir = tmp_path / "ref", tmp_path / "fresh", tmp_path / "planted"
    for path in sorted((REFERENCE / "digits" / "records").glob("*.json")):
        rec = read_record(path)
        where = (rec["method"], rec["nfe"], rec["seed"], rec["config_hash"])
        write_record(record_path(ref_dir, "digits", *where), rec)
        write_record(record_path(fresh_dir, "digits", *where), rec)
        if rec["method"] == "sfd-v":
            rec["metrics"]["fid"] += 1.0
        write_record(record_path(planted_dir, "digits", *where), rec)
    args = ["check", "--suite", "digits", "--no-run", "--reference", str(ref_dir)]
    r = cli(*args, "--results", str(fresh_dir), "--measure-tolerances")
    assert r.returncode == 0, r.stderr
    measured = json.loads(tolerances_path(ref_dir, "digits").read_text())
    assert measured["rows"] and all(row["bit_identical"] for row in measured["rows"])
    ok = cli(*args, "--results", str(fresh_dir))
    assert ok.returncode == 0 and "paired" in ok.stdout and "unpaired" not in ok.stdout, ok.stdout
    bad = cli(*args, "--results", str(planted_dir))
    assert bad.returncode == 1 and "regression" in bad.stdout


@pytest.mark.parametrize("suite", SUITES)
def test_committed_tolerances_cover_every_row_replay_and_catch_one_fid(suite):
    ref = load_records(REFERENCE, suite)
    tolerances = load_tolerances(REFERENCE, suite)
    document = json.loads(tolerances_path(REFERENCE, suite).read_text())
    keys = {(m, int(n), float(w), metric) for (m, n, w), part in ref.fillna({"guidance": 1.0})
            .groupby(["method", "nfe", "guidance"]) for metric in ("fid", "precision", "recall")}
    assert keys <= set(tolerances)
    for row in document["rows"]:  # the rule, applied to the kept measurement, gives the kept tolerance
        assert row["tolerance"] == pytest.approx(max(document["safety_factor"] * abs(row["mean_paired_difference"]),
                                                     document["paired_floor"][row["metric"]]))
        assert row["mean_paired_difference"] == pytest.approx(sum(row["paired_differences"]) / len(row["seeds"]))
    # the measured cross-machine rerun, replayed, passes
    rerun = ref.copy()
    for row in (r for r in document["rows"] if r["metric"] == "fid"):
        for seed, value in zip(row["seeds"], row["rerun"]):
            hit = ((rerun["method"] == row["method"]) & (rerun["nfe"] == row["nfe"])
                   & (rerun["guidance"].fillna(1.0) == row["guidance"]) & (rerun["seed"] == seed))
            rerun.loc[hit, "fid"] = value
    assert not failed(compare(rerun, ref, tolerances))
    # a planted 1-FID regression in each distilled method fails, paired
    for method in set(ref["method"]) & set(DISTILLED):
        result = compare(_shifted(ref, 1.0, [method]), ref, tolerances)
        fid = result[(result["method"] == method) & (result["metric"] == "fid")]
        assert set(fid["status"]) == {"regression"} and set(fid["rule"]) == {"paired"}, fid
