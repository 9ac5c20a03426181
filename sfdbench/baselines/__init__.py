"""Published numbers (``published.csv``) as a pandas table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PUBLISHED = Path(__file__).parent / "published.csv"


def load_published(suite: str) -> pd.DataFrame:
    """Published rows of ``suite`` (empty frame when the paper has none for it)."""
    df = pd.read_csv(PUBLISHED, keep_default_na=False, na_values=[""])
    df = df[df["suite"] == suite].copy()
    for col in ("fid_qualifier", "training_hours_qualifier", "note"):
        df[col] = df[col].fillna("")
    return df.reset_index(drop=True)
