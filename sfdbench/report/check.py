"""Regression check: fresh records against committed reference records, per (method, NFE, guidance, metric).

Paired rule (common random numbers; ``docs/reporting.md#regression-gate``). A rerun of the check
grid uses the reference's seeds, so seed ``s`` of the fresh run sees the same noise as seed ``s``
of the reference. The check therefore compares, per row and metric, the *mean paired difference*

    d_s = fresh(s) − reference(s),   d̄ = mean over the seeds both have of d_s

with a tolerance set from the measured cross-machine spread of that same statistic, kept in
``results/reference/<suite>/tolerances.json`` (``measure_tolerances`` writes it):

    tol = max(SAFETY_FACTOR × spread, PAIRED_FLOOR[metric])

where ``spread`` is the largest |d̄| measured between the reference machine and a rerun on another
machine. A metric is a regression when it is worse by more than ``tol`` (d̄ > tol for
lower-is-better metrics, −d̄ > tol otherwise), an improvement when better by more than ``tol``
(reported, never failed).

Unpaired rule (the old one, kept as the fallback for a row without a measured spread or whose
seeds do not pair): the fresh mean against the reference mean with
tol = max(2 × reference seed std, 5 % of |reference mean|, an absolute floor per metric). The seed
std measures how much FID changes *between noise draws*, which a rerun with the same draws does
not see; that is why it is loose (±3 FID on SFD's 7.7 on digits).

A configuration whose hash differs from the reference's is reported as such (the reference must be
regenerated)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False, "density": False,
                   "coverage": False, "class_match": False}
ABS_FLOOR = {"fid": 0.5, "kid": 0.002, "precision": 0.02, "recall": 0.02, "density": 0.03, "coverage": 0.02,
             "class_match": 0.02}
KEY = ["method", "nfe", "guidance"]
REL_FLOOR = 0.05
SPREAD_FACTOR = 2.0

# Paired rule: tol = max(SAFETY_FACTOR x measured cross-machine |mean paired difference|, PAIRED_FLOOR).
# One cross-machine rerun is one draw of the spread, hence the factor; the floors keep bit-identical
# rows (the solvers) from failing on the next library's last-bit change and leave room for machines
# that move more than the measured one (SFD rows moved up to 0.14 FID per seed between two 2-core
# machines, README "Reproducibility across machines"). KID is torch-fidelity's raw KID on the suite's
# features: on the digits' 64-d features it is ~50-250 and moved 15-20 x FID's paired difference in
# the measurement (results/reference/*/tolerances.json), hence its floor of 5.
SAFETY_FACTOR = 4.0
PAIRED_FLOOR = {"fid": 0.3, "kid": 5.0, "precision": 0.01, "recall": 0.01, "density": 0.02,
                "coverage": 0.01, "class_match": 0.01}
TOLERANCES_FILE = "tolerances.json"
COLUMNS = ["method", "nfe", "guidance", "metric", "reference", "fresh", "delta", "max_abs_paired", "tolerance",
           "rule", "status"]


def tolerance(metric: str, ref_mean: float, ref_std: float) -> float:
    """The unpaired rule's tolerance: max(2 x reference seed std, 5 % of |mean|, absolute floor)."""
    spread = 0.0 if math.isnan(ref_std) else SPREAD_FACTOR * ref_std
    return max(spread, REL_FLOOR * abs(ref_mean), ABS_FLOOR.get(metric, 0.0))


def paired_tolerance(metric: str, spread: float, safety: float = SAFETY_FACTOR,
                     floors: dict | None = None) -> float:
    """The paired rule's tolerance: max(safety x measured spread of the mean paired difference, floor)."""
    floor = (floors or PAIRED_FLOOR).get(metric, 0.0)
    return max(safety * abs(spread), floor)


def tolerances_path(reference: Path, suite: str) -> Path:
    return Path(reference) / suite / TOLERANCES_FILE


def load_tolerances(reference: Path, suite: str) -> dict:
    """``(method, nfe, guidance, metric) -> tolerance`` from ``<reference>/<suite>/tolerances.json``;
    empty when the file is absent (every row then falls back to the unpaired rule)."""
    import json

    path = tolerances_path(reference, suite)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {(r["method"], int(r["nfe"]), float(r["guidance"]), r["metric"]): float(r["tolerance"])
                for r in data["rows"]}
    except (ValueError, KeyError, TypeError) as exc:
        from sfdbench.errors import BadInput

        raise BadInput(f"{path} is not a tolerance measurement ({exc}); regenerate it with "
                       "`sfdbench check --measure-tolerances`") from None


def paired(new: pd.DataFrame, ref: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """Per seed, fresh and reference values of ``metric`` and d_s = fresh − reference, for the seeds
    both have; None when the seeds do not pair (a seed of the reference missing from the fresh run,
    or a seed twice on either side)."""
    if metric not in new or ref["seed"].duplicated().any() or new["seed"].duplicated().any():
        return None
    both = ref[["seed", metric]].merge(new[["seed", metric]], on="seed", suffixes=("_ref", "_new"))
    both = both.dropna()
    if len(both) != ref[metric].notna().sum() or both.empty:
        return None
    both["d"] = both[f"{metric}_new"] - both[f"{metric}_ref"]
    return both.sort_values("seed")


def compare(fresh: pd.DataFrame, reference: pd.DataFrame, tolerances: dict | None = None) -> pd.DataFrame:
    """One row per (method, NFE, guidance, metric) present in the reference: means, delta (fresh −
    reference; the mean paired difference under the paired rule), the largest |d_s|, tolerance, the
    rule used (paired | unpaired) and status in {ok, regression, improvement, missing,
    config-changed}, plus a ``no-reference`` row for every fresh (method, NFE, guidance) the
    reference lacks. ``tolerances`` (``load_tolerances``) holds the measured paired tolerances;
    rows without one use the unpaired rule."""
    rows = []
    tolerances = tolerances or {}
    fresh, reference = _keyed(fresh), _keyed(reference)
    metrics = [m for m in LOWER_IS_BETTER if m in reference]
    for (method, nfe, scale), ref in reference.groupby(KEY, sort=False):
        new = fresh[(fresh["method"] == method) & (fresh["nfe"] == nfe) & (fresh["guidance"] == scale)] \
            if not fresh.empty else fresh
        changed = not new.empty and set(new["config_hash"]) != set(ref["config_hash"])
        for metric in metrics:
            if ref[metric].isna().all():
                continue
            m = ref[metric].mean()
            base = dict(method=method, nfe=nfe, guidance=scale, metric=metric, reference=m)
            if new.empty or metric not in new or new[metric].isna().all():
                tol = tolerance(metric, m, ref[metric].std())
                rows.append(dict(base, fresh=float("nan"), delta=float("nan"), max_abs_paired=float("nan"),
                                 tolerance=tol, rule="unpaired", status="missing"))
                continue
            pairs = paired(new, ref, metric) if "seed" in ref and "seed" in new else None
            measured = tolerances.get((method, int(nfe), float(scale), metric))
            if pairs is not None and measured is not None:
                delta, max_abs, tol, rule = pairs["d"].mean(), pairs["d"].abs().max(), measured, "paired"
                f = pairs[f"{metric}_new"].mean()
            else:
                f = new[metric].mean()
                delta, max_abs = f - m, float("nan")
                tol, rule = tolerance(metric, m, ref[metric].std()), "unpaired"
            worse = delta if LOWER_IS_BETTER[metric] else -delta
            status = "regression" if worse > tol else "improvement" if -worse > tol else "ok"
            if changed:
                status = "config-changed"
            rows.append(dict(base, fresh=f, delta=delta, max_abs_paired=max_abs, tolerance=tol, rule=rule,
                             status=status))
    # a fresh (method, NFE) without references is not checked at all: fail until they are committed
    known = set(zip(reference["method"], reference["nfe"], reference["guidance"])) if not reference.empty else set()
    if not fresh.empty:
        for (method, nfe, scale), new in fresh.groupby(KEY, sort=False):
            if (method, nfe, scale) not in known:
                rows.append(dict(method=method, nfe=nfe, guidance=scale, metric="fid", reference=float("nan"),
                                 fresh=new["fid"].mean(), delta=float("nan"), max_abs_paired=float("nan"),
                                 tolerance=float("nan"), rule="", status="no-reference"))
    return pd.DataFrame(rows, columns=COLUMNS)


def measure_tolerances(rerun: pd.DataFrame, reference: pd.DataFrame, suite: str, rerun_machine: dict,
                       reference_machine: dict) -> dict:
    """The measurement behind the paired rule: per (method, NFE, guidance, metric) of the reference,
    the per-seed paired differences d_s between ``rerun`` (the check grid rerun on another machine,
    same code and configuration) and the reference, their mean d̄ and max |d_s|, the tolerance
    max(SAFETY_FACTOR x |d̄|, PAIRED_FLOOR[metric]) and, for comparison, the unpaired rule's.
    Rows whose configuration hash or seeds do not match are left out (and listed under ``skipped``)."""
    rerun, reference = _keyed(rerun), _keyed(reference)
    rows, skipped = [], []
    for (method, nfe, scale), ref in reference.groupby(KEY, sort=False):
        new = rerun[(rerun["method"] == method) & (rerun["nfe"] == nfe) & (rerun["guidance"] == scale)]
        if new.empty or set(new["config_hash"]) != set(ref["config_hash"]):
            skipped.append(f"{method} NFE {nfe} w={scale:g}: " + ("not rerun" if new.empty else "config changed"))
            continue
        for metric in [m for m in LOWER_IS_BETTER if m in ref and ref[m].notna().any()]:
            pairs = paired(new, ref, metric)
            if pairs is None:
                skipped.append(f"{method} NFE {nfe} w={scale:g} {metric}: seeds do not pair")
                continue
            mean_d = float(pairs["d"].mean())
            rows.append({"method": method, "nfe": int(nfe), "guidance": float(scale), "metric": metric,
                         "seeds": [int(s) for s in pairs["seed"]],
                         "reference": [float(v) for v in pairs[f"{metric}_ref"]],
                         "rerun": [float(v) for v in pairs[f"{metric}_new"]],
                         "paired_differences": [float(v) for v in pairs["d"]],
                         "mean_paired_difference": mean_d,
                         "max_abs_paired_difference": float(pairs["d"].abs().max()),
                         "bit_identical": bool((pairs["d"] == 0).all()),
                         "tolerance": paired_tolerance(metric, mean_d),
                         "unpaired_tolerance": tolerance(metric, float(ref[metric].mean()), float(ref[metric].std()))})
    return {"suite": suite,
            "rule": (f"tolerance = max({SAFETY_FACTOR:g} x |mean paired difference measured across machines|, "
                     "paired_floor[metric]); the check fails a row when its mean paired difference (fresh − "
                     "reference, per seed, then averaged; sign flipped for higher-is-better metrics) exceeds it. "
                     "See docs/reporting.md#regression-gate."),
            "safety_factor": SAFETY_FACTOR, "paired_floor": PAIRED_FLOOR,
            "unpaired_rule": (f"max({SPREAD_FACTOR:g} x reference seed std, {REL_FLOOR:.0%} of |reference mean|, "
                              "abs_floor[metric])"),
            "abs_floor": ABS_FLOOR,
            "machines": {"reference": reference_machine, "rerun": rerun_machine},
            "rows": rows, "skipped": skipped}


def machine_of(records: pd.DataFrame) -> dict:
    """Where a set of records was produced, from the records themselves: fine-tuning device(s),
    sfdbench/torch versions, git revisions, first and last end time."""
    import json

    from sfdbench.records import read_record

    recs = [r for r in (read_record(Path(p)) for p in records.get("path", [])) if r]
    devices = sorted({(r.get("fine_tuning") or {}).get("device") for r in recs} - {None})
    versions = sorted({json.dumps(r.get("versions"), sort_keys=True) for r in recs if r.get("versions")})
    ended = sorted(r.get("ended_at") for r in recs if r.get("ended_at"))
    return {"fine_tuning_devices": devices, "versions": [json.loads(v) for v in versions],
            "git_revisions": sorted({r.get("git_revision") for r in recs} - {None}),
            "ended": [ended[0], ended[-1]] if ended else []}


def _keyed(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with a guidance column (1 = unguided, also for records that predate guidance)."""
    records = records.copy()
    records["guidance"] = records["guidance"].fillna(1.0) if "guidance" in records else 1.0
    return records


def failed(comparison: pd.DataFrame) -> bool:
    return bool(comparison["status"].isin(["regression", "missing", "config-changed", "no-reference"]).any())
