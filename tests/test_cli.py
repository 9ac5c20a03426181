"""End to end through the command line: run + table on a tiny grid, skip/force, bad input."""

import json
import os

import pytest
from conftest import TINY_SFD, tree

pytestmark = pytest.mark.slow


def test_run_then_table_tiny_grid(cli, tmp_path):
    out = tmp_path / "res"
    r = cli("run", "--suite", "digits", "--methods", "ddim,dpmpp3m,sfd", "--nfe", "2", "--seeds", "0,1",
            "--samples", "40", "--out", str(out), *TINY_SFD)
    assert r.returncode == 0, r.stderr
    records = sorted((out / "digits" / "records").glob("*.json"))
    assert len(records) == 6
    rec = json.loads(records[-1].read_text())
    for key in ("suite", "method", "nfe", "seed", "config_hash", "hyperparameters", "metrics", "fine_tuning",
                "sampling", "versions", "git_revision", "started_at", "ended_at", "metric_protocol"):
        assert key in rec, key
    sfd = [json.loads(p.read_text()) for p in records if p.name.startswith("sfd-")]
    assert all(s["fine_tuning"]["device_hours"] > 0 and s["fine_tuning"]["devices"] == 1 for s in sfd)
    assert all(s["nfe_counted"] == 2 for s in sfd)
    assert sfd[0]["hyperparameters"]["iterations"] == 3
    # the two seeds use different noise, so their FIDs differ
    assert sfd[0]["metrics"]["fid"] != sfd[1]["metrics"]["fid"]

    table = cli("table", "--suite", "digits", "--format", "markdown", "--results", str(out))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0] == "**Solver-based**" and "**Distillation**" in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == 3 and all("measured" in row for row in rows)
    assert "±" in table.stdout and "| SFD" in table.stdout and "| DPM-Solver++(3M)" in table.stdout
    # the caption says how the metrics were computed, which precision/recall definition included
    assert "precision/recall: knn: k-NN radii" in lines[-1] and "k = 5" in lines[-1]
    latex = cli("table", "--format", "latex", "--results", str(out))
    assert latex.returncode == 0 and "\\begin{tabular}" in latex.stdout and "$\\pm$" in latex.stdout
    csv = cli("table", "--format", "csv", "--results", str(out))
    assert csv.returncode == 0 and csv.stdout.splitlines()[0].startswith("group,method,display,nfe,source,fid_mean")

    # a rerun with the same configuration is skipped; --force redoes it
    before = {p.name: p.stat().st_mtime_ns for p in records}
    again = cli("run", "--methods", "ddim", "--nfe", "2", "--seeds", "0,1", "--samples", "40", "--out", str(out))
    assert again.returncode == 0 and "skip" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in records} == before
    forced = cli("run", "--methods", "ddim", "--nfe", "2", "--seeds", "0", "--samples", "40", "--out", str(out),
                 "--force")
    assert forced.returncode == 0
    ddim0 = next(p for p in records if p.name.startswith("ddim-nfe2-seed0"))
    assert ddim0.stat().st_mtime_ns != before[ddim0.name]


def test_sample_distilled_model(cli, tmp_path):
    out = tmp_path / "res"
    assert cli("run", "--methods", "sfd", "--nfe", "3", "--seeds", "0", "--samples", "10", "--out", str(out),
               *TINY_SFD).returncode == 0
    model = next((out / "digits" / "fits").glob("sfd-nfe3-*/model.safetensors"))
    r = cli("sample", "--model", str(model), "--samples", "16", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    import numpy as np

    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (16, 1, 8, 8) and images.dtype == np.uint8
    assert "NFE 3" in r.stdout


BAD_INPUT = {
    "unknown suite": ["run", "--suite", "nope"],
    "unknown method": ["run", "--methods", "ddim,warp"],
    "unsupported nfe": ["run", "--methods", "heun", "--nfe", "3"],
    "nfe zero": ["run", "--methods", "ddim", "--nfe", "0"],
    "bad nfe list": ["run", "--methods", "ddim", "--nfe", "two"],
    "unknown hyperparameter": ["run", "--methods", "sfd", "--nfe", "2", "--set", "sfd.warp=3"],
    "too few samples": ["run", "--methods", "ddim", "--nfe", "2", "--samples", "1"],
    "bad format": ["table", "--format", "html"],
    "guidance on an unconditional suite": ["run", "--methods", "ddim", "--nfe", "2", "--guidance", "2"],
    "negative guidance": ["run", "--suite", "digits-cond", "--methods", "ddim", "--nfe", "2", "--guidance", "-1"],
    "bad guidance list": ["run", "--suite", "digits-cond", "--guidance", "strong"],
    "unknown grid": ["run", "--grid", "huge"],
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(cli, tmp_path, name):
    out = tmp_path / "res"
    r = cli(*BAD_INPUT[name], "--out" if BAD_INPUT[name][0] == "run" else "--results", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("sfdbench: error:")
    assert tree(out) == []


def test_unwritable_out(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("run", "--methods", "ddim", "--nfe", "2", "--samples", "10", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--out" in r.stderr
    if os.geteuid() != 0:  # root can write anywhere, so the permission case only means something for users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        r = cli("run", "--methods", "ddim", "--nfe", "2", "--samples", "10", "--out", str(locked / "x"))
        assert r.returncode == 2
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-network"])
def test_corrupt_teacher_weights(cli, tmp_path, damage):
    from sfdbench.suites.digits import FEATURE_WEIGHTS, TEACHER_WEIGHTS

    bad = tmp_path / "teacher.safetensors"
    if damage == "garbage":
        bad.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        bad.write_bytes(TEACHER_WEIGHTS.read_bytes()[:5000])
    else:
        bad.write_bytes(FEATURE_WEIGHTS.read_bytes())  # valid file, wrong network
    out = tmp_path / "res"
    r = cli("run", "--methods", "ddim", "--nfe", "2", "--samples", "10", "--teacher", str(bad), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr
    assert tree(out) == []


def test_listing_commands(cli):
    suites = cli("suites")
    assert suites.returncode == 0 and "digits" in suites.stdout
    methods = cli("methods")
    assert methods.returncode == 0
    for name in ("ddim", "heun", "dpmpp3m", "sfd"):
        assert name in methods.stdout


def test_teacher_and_feature_training_commands(cli, tmp_path):
    r = cli("teacher", "train", "--suite", "digits", "--iterations", "3", "--batch", "8",
            "--out", str(tmp_path / "t.safetensors"))
    assert r.returncode == 0, r.stderr
    from sfdbench.networks.checkpoint import read_metadata
    from sfdbench.suites.digits import DigitsSuite

    meta = read_metadata(tmp_path / "t.safetensors")
    assert meta["iterations"] == 3 and meta["seed"] == 0 and "teacher train" in meta["command"]
    DigitsSuite().load_teacher(tmp_path / "t.safetensors")  # loads as a teacher
    r = cli("features", "train", "--epochs", "1", "--out", str(tmp_path / "f.safetensors"))
    assert r.returncode == 0, r.stderr
    assert 0 <= read_metadata(tmp_path / "f.safetensors")["test_accuracy"] <= 1
    bad = cli("teacher", "train", "--out", str(tmp_path / "t.bin"))
    assert bad.returncode == 2 and not (tmp_path / "t.bin").exists()
