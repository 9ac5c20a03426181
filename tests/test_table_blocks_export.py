"""Seed-block rows in tables (mean ± std over blocks, best-of only on request and labelled) and the
leaderboard export: `sfdbench export` then `sfdbench table --from` gives back the same table, files
from two machines merge, bad input exits 2 with one line and writes nothing."""

import json
from pathlib import Path

import pandas as pd
import pytest

from sfdbench.records import load_records, read_record, record_path, write_record

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"


def _as_blocks(rec: dict, n_first: int = 0) -> dict:
    """A copy of a run-seed record made into seed block B = its seed (the lead's schema: seed = B,
    seed_block = B, noise seeds B*n + i, and a config hash of its own)."""
    rec = json.loads(json.dumps(rec))
    b = rec["seed"]
    rec["seed_block"] = b
    n = rec["sampling"]["n_samples"]
    rec["sampling"]["noise_seeds"] = f"{b}*{n} + i for i < {n} (seed block {b}, EDM's --seeds convention)"
    rec["config_hash"] = "b" + rec["config_hash"][1:]
    return rec


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """The committed digits reference records twice: as run seeds, and (SFD, DDIM) as seed blocks 0-2."""
    out = tmp_path_factory.mktemp("res")
    for path in sorted((REFERENCE / "digits" / "records").glob("*.json")):
        rec = read_record(path)
        write_record(record_path(out, "digits", rec["method"], rec["nfe"], rec["seed"], rec["config_hash"]), rec)
        if rec["method"] in ("sfd", "ddim"):
            blk = _as_blocks(rec)
            write_record(record_path(out, "digits", blk["method"], blk["nfe"], blk["seed"], blk["config_hash"]), blk)
    return out


def _row(md: str, start: str, over: str) -> list[str]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith(start)]
    return next(r for r in rows if over in r)


def test_block_rows_are_mean_and_std_over_blocks_and_never_the_minimum(cli, results):
    records = load_records(results, "digits")
    blocks = records[(records["method"] == "sfd") & records["seed_block"].notna()]
    assert sorted(blocks["seed_block"]) == [0, 1, 2]
    mean, std, best = blocks["fid"].mean(), blocks["fid"].std(), blocks["fid"].min()
    r = cli("table", "--suite", "digits", "--results", str(results), "--no-published")
    assert r.returncode == 0, r.stderr
    row = _row(r.stdout, "| SFD ", "3 seed blocks (0,1,2)")
    assert row[2] == f"{mean:.2f} ± {std:.2f}"
    assert _row(r.stdout, "| SFD ", "3 seeds")  # run-seed records stay a row of their own
    assert not [line for line in r.stdout.splitlines() if line.startswith("|") and "best of" in line]  # unless asked
    assert "seed blocks: block B samples noise seeds" in r.stdout  # the caption says what a block is
    shown = cli("table", "--suite", "digits", "--results", str(results), "--no-published", "--best-of-blocks")
    assert shown.returncode == 0, shown.stderr
    best_row = _row(shown.stdout, "| SFD ", "best of 3 seed blocks (0,1,2)")
    assert best_row[2] == f"{best:.2f}" and "±" not in best_row[2]
    assert _row(shown.stdout, "| SFD ", "3 seed blocks (0,1,2)")[2] == f"{mean:.2f} ± {std:.2f}"  # still there
    # solver rows over blocks too; rows over run seeds get no best-of row
    assert len([line for line in shown.stdout.splitlines() if line.startswith("|") and "best of" in line]) == 2


def test_tables_without_blocks_keep_their_columns(cli):
    r = cli("table", "--suite", "digits", "--results", str(REFERENCE), "--no-published")
    assert r.returncode == 0, r.stderr
    assert "FID over" not in r.stdout and "best of" not in r.stdout


def test_export_renders_back_into_the_same_table(cli, results, tmp_path):
    target = tmp_path / "digits-board.json"
    r = cli("export", "--suite", "digits", "--results", str(results), "--out", str(target))
    assert r.returncode == 0, r.stderr
    for fmt in ("markdown", "csv"):  # csv: every number at full precision
        direct = cli("table", "--suite", "digits", "--results", str(results), "--format", fmt, "--best-of-blocks")
        back = cli("table", "--from", str(target), "--format", fmt, "--best-of-blocks")
        assert direct.returncode == 0 and back.returncode == 0, back.stderr
        assert back.stdout == direct.stdout
        assert "best of 3 seed blocks" in back.stdout or "best of blocks" in back.stdout


def test_published_rows_export_with_their_provenance_and_merge_once(cli, tmp_path):
    from sfdbench.report.export import read_export, table_from_exports

    target = tmp_path / "cifar.json"
    r = cli("export", "--suite", "cifar10", "--results", str(tmp_path / "none"), "--out", str(target))
    assert r.returncode == 0, r.stderr
    doc = json.loads(target.read_text())
    assert doc["rows"] and all(row["source"] == "published" for row in doc["rows"])
    assert all(row["provenance"]["paper"] and row["provenance"]["nfe"]["semantics"] for row in doc["rows"])
    direct = cli("table", "--suite", "cifar10", "--results", str(tmp_path / "none"))
    back = cli("table", "--from", str(target))
    assert back.returncode == 0 and back.stdout == direct.stdout
    twice = table_from_exports([read_export(target), read_export(target)], ["a", "b"])
    assert len(twice) == len(doc["rows"])  # the same published rows from two files are shown once


def test_export_carries_full_provenance(cli, results, tmp_path):
    target = tmp_path / "x.json"
    assert cli("export", "--suite", "digits", "--results", str(results), "--out", str(target)).returncode == 0
    doc = json.loads(target.read_text())
    assert doc["format"] == "sfdbench-leaderboard" and doc["suite"] == "digits"
    assert doc["exported_by"]["versions"]["sfdbench"] and "git_revision" in doc["exported_by"]
    measured = [r for r in doc["rows"] if r["source"] == "measured"]
    sfd = next(r for r in measured if r["table"]["method"] == "sfd" and r["table"]["replicates"] == "seed blocks")
    p = sfd["provenance"]
    assert p["seeds"]["kind"] == "seed blocks" and p["seeds"]["seed_blocks"] == [0, 1, 2]
    assert all("seed block" in s for s in p["seeds"]["noise_seeds"])
    assert p["teacher"]["id"] and p["n_generated"] == 1000 and p["n_reference"] == 1500
    assert p["features"]["extractor"] == "sfdbench-digits" and p["features"]["resize"]
    assert p["nfe"]["nfe_counted"] == 2 and p["nfe"]["network_evaluations_per_call"] == 1
    ft = p["fine_tuning"]
    assert ft["device_hours"] > 0 and ft["flops"] > 0 and ft["teacher_trajectories"] > 0 and ft["device"]
    assert p["software"]["versions"]["torch"] and p["software"]["git_revisions"]
    values = [v["fid"] for v in sfd["replicate_values"]]
    assert sfd["table"]["fid_mean"] == pytest.approx(sum(values) / 3)
    assert sfd["table"]["fid_std"] == pytest.approx(pd.Series(values).std())


def test_exports_from_two_machines_merge(cli, results, tmp_path):
    a, b = tmp_path / "machine-a.json", tmp_path / "machine-b.json"
    assert cli("export", "--suite", "digits", "--results", str(results), "--out", str(a)).returncode == 0
    assert cli("export", "--suite", "digits", "--results", str(REFERENCE), "--out", str(b)).returncode == 0
    r = cli("table", "--from", str(a), "--from", str(b))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("| SFD [machine-a]" in line for line in lines) and any("| SFD [machine-b]" in line for line in lines)
    assert any("| SFD " in line and "3 seed blocks" in line for line in lines)  # only machine a has blocks


def test_bad_export_input_exits_2_with_one_line(cli, results, tmp_path):
    not_export = tmp_path / "other.json"
    not_export.write_text(json.dumps({"rows": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for args in (["table", "--from", str(not_export)], ["table", "--from", str(broken)],
                 ["table", "--from", str(tmp_path / "missing.json"), "--results", str(results)]):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    target = tmp_path / "out" / "x.json"
    r = cli("export", "--results", str(results), "--out", str(target), "--format", "csv")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("export", "--suite", "digits", "--results", str(tmp_path / "empty"), "--out", str(target),
            "--no-published")
    assert r.returncode == 2 and not target.exists()


def test_committed_example_export_renders(cli):
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "digits-seed-blocks.json"
    r = cli("table", "--from", str(example), "--best-of-blocks")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| SFD ")]
    assert any("3 seed blocks (0,1,2)" in line and "±" in line for line in lines)
    assert any("best of 3 seed blocks (0,1,2)" in line for line in lines)


def test_cost_table_keeps_blocks_and_run_seeds_apart(results):
    from sfdbench.report.tables import cost_table

    table = cost_table(load_records(results, "digits"))
    sfd = table[table["method"] == "sfd"]
    assert sorted(sfd["display"]) == ["SFD", "SFD (seed blocks)"] and set(sfd["seeds"]) == {3}
