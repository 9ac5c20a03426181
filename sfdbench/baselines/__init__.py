"""Published numbers (the top-level ``baselines/<suite>.csv`` files) as pandas tables.

An installed wheel carries them as the data package ``sfdbench._baselines`` (``pyproject.toml``
maps that package onto the top-level folder); a source checkout or an editable install reads
``baselines/`` in the checkout directly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

NUMBER_COLUMNS = ["suite", "group", "method", "display", "nfe", "fid", "fid_qualifier", "training_hours",
                  "training_hours_qualifier", "note"]
PROVENANCE_COLUMNS = ["paper", "table", "teacher", "nfe_semantics", "cost_unit", "source"]
COLUMNS = NUMBER_COLUMNS + PROVENANCE_COLUMNS
TEXT_COLUMNS = ["fid_qualifier", "training_hours_qualifier", "note", *PROVENANCE_COLUMNS]

_PACKAGE = Path(__file__).resolve().parents[1]
_INSTALLED_DIR = _PACKAGE / "_baselines"  # wheel / regular install
_CHECKOUT_DIR = _PACKAGE.parent / "baselines"  # source checkout, editable install


def baselines_dir() -> Path:
    """The folder holding ``<suite>.csv``."""
    if _INSTALLED_DIR.is_dir():
        return _INSTALLED_DIR
    if _CHECKOUT_DIR.is_dir() and (_PACKAGE.parent / "pyproject.toml").is_file():
        return _CHECKOUT_DIR
    raise FileNotFoundError(f"published baselines not found in {_INSTALLED_DIR} or {_CHECKOUT_DIR}; reinstall sfdbench")


def published_suites() -> list[str]:
    """Suites that have a published-numbers file."""
    return sorted(p.name[:-4] for p in baselines_dir().iterdir() if p.name.endswith(".csv"))


def load_published(suite: str) -> pd.DataFrame:
    """Published rows of ``suite`` with their provenance (empty frame, same columns, when there is
    no ``baselines/<suite>.csv``)."""
    path = baselines_dir() / f"{suite}.csv"
    if not suite or Path(suite).name != suite or not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    text = {c: str for c in COLUMNS if c not in ("nfe", "fid", "training_hours")}
    df = pd.read_csv(path, keep_default_na=False, na_values=[""], encoding="utf-8", dtype=text)
    df = df[df["suite"] == suite].copy()
    for col in TEXT_COLUMNS:
        df[col] = df[col].fillna("") if col in df else ""
    return df.reindex(columns=COLUMNS + [c for c in df.columns if c not in COLUMNS]).reset_index(drop=True)
