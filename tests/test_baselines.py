"""The published-numbers table (top-level baselines/): provenance on every row, the numbers as
published, one file per suite, and the packaging that ships the folder."""

import csv
from pathlib import Path

import pytest

from sfdbench.baselines import COLUMNS, PROVENANCE_COLUMNS, baselines_dir, load_published, published_suites

ROOT = Path(__file__).resolve().parents[1]
CSVS = sorted((ROOT / "baselines").glob("*.csv"))


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_one_csv_per_suite_with_rows():
    assert [p.stem for p in CSVS] == ["cifar10", "imagenet64"]
    assert published_suites() == ["cifar10", "imagenet64"]
    assert Path(baselines_dir()).resolve() == (ROOT / "baselines").resolve()  # the checkout's folder


@pytest.mark.parametrize("path", CSVS, ids=lambda p: p.name)
def test_every_row_has_provenance(path):
    rows = _rows(path)
    assert rows and list(rows[0]) == COLUMNS
    for i, row in enumerate(rows, start=2):
        for col in PROVENANCE_COLUMNS:
            assert row[col].strip(), f"{path.name} line {i}: empty {col}"


@pytest.mark.parametrize("path", CSVS, ids=lambda p: p.name)
def test_file_name_is_the_suite(path):
    assert {row["suite"] for row in _rows(path)} == {path.stem}


@pytest.mark.parametrize("path", CSVS, ids=lambda p: p.name)
def test_one_row_per_method_and_nfe(path):
    keys = [(row["method"], int(row["nfe"])) for row in _rows(path)]
    assert len(keys) == len(set(keys))


def _row(df, method, nfe):
    rows = df[(df["method"] == method) & (df["nfe"] == nfe)]
    assert len(rows) == 1, (method, nfe)
    return rows.iloc[0]


def test_cifar10_numbers_as_published():
    cifar = load_published("cifar10")
    assert len(cifar) == 28 and list(cifar.columns) == COLUMNS
    assert set(cifar["group"]) == {"solver", "distillation"}
    ddim = _row(cifar, "ddim", 10)
    assert ddim["fid"] == 15.69 and ddim["training_hours"] == 0 and ddim["fid_qualifier"] == ""
    sfd = _row(cifar, "sfd", 2)
    assert sfd["fid"] == 4.53 and sfd["training_hours"] == 0.64
    assert sfd["paper"].startswith("SFD") and sfd["table"] == "Table 2"
    assert "edm-cifar10-32x32-uncond-vp" in sfd["teacher"]
    gits = _row(cifar, "gits", 5)
    assert gits["fid"] == 8.38 and gits["training_hours"] == 0.01 and gits["training_hours_qualifier"] == "<"
    ctm = _row(cifar, "ctm-nogan", 1)
    assert ctm["fid"] == 5 and ctm["fid_qualifier"] == ">" and ctm["training_hours"] == 60
    cd = _row(cifar, "cd", 1)
    assert cd["fid"] == 3.55 and cd["training_hours"] == 1156 and cd["paper"].startswith("CD")
    assert cd["table"] == "SFD Table 2"
    assert (cifar.loc[cifar["method"] == "sfd-v", "note"] == "one model for all NFEs").all()
    assert (cifar.loc[cifar["method"] == "ddim", "note"] == "").all()


def test_imagenet64_numbers_as_published():
    imnet = load_published("imagenet64")
    assert len(imnet) == 26
    assert _row(imnet, "ddim", 10)["fid"] == 16.72
    pd_row = _row(imnet, "pd", 1)
    assert pd_row["fid"] == 15.39 and pd_row["training_hours"] == 5533 and pd_row["training_hours_qualifier"] == "<"
    assert _row(imnet, "sfd-v", 5)["training_hours"] == 23.62
    assert (imnet["table"].str.endswith("Table 3")).all()


def test_unknown_suite_is_an_empty_frame():
    for suite in ("digits", "no-such-suite", "../pyproject", ""):
        df = load_published(suite)
        assert df.empty and list(df.columns) == COLUMNS


def test_pyproject_ships_every_subpackage_and_the_baselines():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sfdbench").rglob("__init__.py")}
    missing = sorted(on_disk - set(cfg["packages"]))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert cfg["package-dir"]["sfdbench._baselines"] == "baselines"
    assert "*.csv" in cfg["package-data"]["sfdbench._baselines"]
