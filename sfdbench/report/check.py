"""Regression check: fresh records against committed reference records, per (method, NFE, metric).

A metric is a regression when it is worse than the reference mean by more than its tolerance,
tol = max(2 * reference seed std, 5% of |reference mean|, an absolute floor per metric);
better by more than tol is reported as an improvement, never a failure. A configuration whose
hash differs from the reference's is reported as such (the reference must be regenerated)."""

from __future__ import annotations

import math

import pandas as pd

LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False, "density": False,
                   "coverage": False, "class_match": False}
ABS_FLOOR = {"fid": 0.5, "kid": 0.002, "precision": 0.02, "recall": 0.02, "density": 0.03, "coverage": 0.02,
             "class_match": 0.02}
KEY = ["method", "nfe", "guidance"]
REL_FLOOR = 0.05
SPREAD_FACTOR = 2.0


def tolerance(metric: str, ref_mean: float, ref_std: float) -> float:
    spread = 0.0 if math.isnan(ref_std) else SPREAD_FACTOR * ref_std
    return max(spread, REL_FLOOR * abs(ref_mean), ABS_FLOOR.get(metric, 0.0))


def compare(fresh: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, NFE, guidance, metric) present in the reference: means, delta, tolerance
    and status in {ok, regression, improvement, missing, config-changed}, plus a ``no-reference`` row
    for every fresh (method, NFE, guidance) the reference lacks."""
    rows = []
    fresh, reference = _keyed(fresh), _keyed(reference)
    metrics = [m for m in LOWER_IS_BETTER if m in reference]
    for (method, nfe, scale), ref in reference.groupby(KEY, sort=False):
        new = fresh[(fresh["method"] == method) & (fresh["nfe"] == nfe) & (fresh["guidance"] == scale)] \
            if not fresh.empty else fresh
        changed = not new.empty and set(new["config_hash"]) != set(ref["config_hash"])
        for metric in metrics:
            if ref[metric].isna().all():
                continue
            m, s = ref[metric].mean(), ref[metric].std()
            tol = tolerance(metric, m, s)
            if new.empty or metric not in new or new[metric].isna().all():
                rows.append(dict(method=method, nfe=nfe, guidance=scale, metric=metric, reference=m,
                                 fresh=float("nan"), delta=float("nan"), tolerance=tol, status="missing"))
                continue
            f = new[metric].mean()
            worse = (f - m) if LOWER_IS_BETTER[metric] else (m - f)
            status = "regression" if worse > tol else "improvement" if -worse > tol else "ok"
            if changed:
                status = "config-changed"
            rows.append(dict(method=method, nfe=nfe, guidance=scale, metric=metric, reference=m, fresh=f,
                             delta=f - m, tolerance=tol, status=status))
    # a fresh (method, NFE) without references is not checked at all: fail until they are committed
    known = set(zip(reference["method"], reference["nfe"], reference["guidance"])) if not reference.empty else set()
    if not fresh.empty:
        for (method, nfe, scale), new in fresh.groupby(KEY, sort=False):
            if (method, nfe, scale) not in known:
                rows.append(dict(method=method, nfe=nfe, guidance=scale, metric="fid", reference=float("nan"),
                                 fresh=new["fid"].mean(), delta=float("nan"), tolerance=float("nan"),
                                 status="no-reference"))
    return pd.DataFrame(rows, columns=["method", "nfe", "guidance", "metric", "reference", "fresh", "delta",
                                       "tolerance", "status"])


def _keyed(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with a guidance column (1 = unguided, also for records that predate guidance)."""
    records = records.copy()
    records["guidance"] = records["guidance"].fillna(1.0) if "guidance" in records else 1.0
    return records


def failed(comparison: pd.DataFrame) -> bool:
    return bool(comparison["status"].isin(["regression", "missing", "config-changed", "no-reference"]).any())
