"""Leaderboard export (`sfdbench export`) and its reader (`sfdbench table --from`).

One self-describing JSON file holds every row of a suite's table, measured and published, each
with the numbers the table shows (``table``: exactly ``report.tables.COLUMNS``) and its provenance:
teacher hash, reference statistics, n generated and n reference, feature extractor and resize,
run seeds or seed blocks and the noise seeds they stand for, NFE as counted (with how guided and
parallel calls count), fine-tuning device-hours, device(s), FLOPs, teacher trajectories and real
images seen, and the sfdbench version and git revision of the run and of the export. Files from
different machines and papers merge into one table (``load_exports`` + ``tables.combine``). The
format is described in ``docs/reporting.md#leaderboard-export``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.records import git_revision, now, read_record
from sfdbench.report.tables import (
    BEST,
    COLUMNS,
    EXTRA_METRICS,
    REPLICATES,
    combine,
    named_rows,
    published_rows,
    summarize,
)

FORMAT = "sfdbench-leaderboard"
FORMAT_VERSION = 1
NFE_SEMANTICS = ("nfe: sampler steps' denoiser evaluations per sample (the papers' NFE); nfe_counted: network "
                 "evaluations per sample as counted by the harness (a classifier-free-guided call is 2: "
                 "guidance.network_evaluations_per_call); nfe_parallel: sequential rounds of parallel calls "
                 "(EPD-Solver), absent for others")
FIELDS = {
    "table": "the numbers the table shows (fid_mean, fid_std over `replicates`, metric means, hours, ...)",
    "replicate_values": "per replicate (run seed or seed block): its FID and the record it came from",
    "provenance.teacher": "teacher id (hash of the weights) and the sha256 of every asset the records used",
    "provenance.reference_statistics": "what FID is measured against, its n and sha256 where recorded",
    "provenance.features": "feature extractor, its layer and dimension, weights hash and image resize",
    "provenance.seeds": "run seeds (noise seed = seed x 10^7 + i) or seed blocks (B*n + i, EDM's --seeds)",
    "provenance.nfe": NFE_SEMANTICS,
    "provenance.fine_tuning": "device-hours (wall x devices), device, devices, FLOPs, teacher trajectories, "
                              "teacher/student evaluations and real images seen, per fit (mean over the row)",
    "provenance.software": "sfdbench/torch versions and git revisions of the runs; the export's own at top level",
}


def _clean(value):
    """JSON-safe: NaN/NA -> None, numpy scalars -> Python, containers recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _distinct(values) -> list:
    out = []
    for v in values:
        v = _clean(v)
        if v not in out:
            out.append(v)
    return out


def _one_or_all(values):
    """The single value when all agree, else the list of distinct values."""
    distinct = _distinct(values)
    return distinct[0] if len(distinct) == 1 else distinct


def _resize(protocol: dict) -> str:
    if protocol.get("resize"):
        return str(protocol["resize"])
    if str(protocol.get("feature_extractor", "")).startswith("inception"):
        return ("torch-fidelity's InceptionV3 input: bilinear resize to 299 x 299 inside the network "
                "(TF-Inception compatible), as EDM's and torch-fidelity's FID")
    return "none (the feature network takes the samples at their own resolution)"


def _reference_statistics(protocol: dict, assets: dict, recorded: dict | None = None) -> dict:
    """``recorded``: the records' ``reference_statistics`` (content hash of mu and sigma), when present."""
    refs = {k: v for k, v in (assets or {}).items() if "ref" in k}
    file_hash = _one_or_all([v.get("sha256") for v in refs.values()]) if refs else None
    return {"description": protocol.get("reference_set"), "n_reference": protocol.get("n_reference"),
            "sha256": file_hash, "assets": refs or None,
            "statistics_sha256": (recorded or {}).get("sha256"),
            **({} if refs or recorded else {"note": "no reference-statistics hash in the records (written before "
                                                    "records carried one)"})}


def _measured_provenance(recs: list[dict]) -> dict:
    first = recs[0]
    protocol = first.get("metric_protocol") or {}
    ft = [r.get("fine_tuning") or {} for r in recs]
    info = [r.get("fit_info") or {} for r in recs]
    blocks = [r.get("seed_block") for r in recs if r.get("seed_block") is not None]

    def mean(values):
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(values) / len(values) if values else None

    return {
        "teacher": {"id": _one_or_all(r.get("teacher") for r in recs), "assets": first.get("assets")},
        "reference_statistics": _reference_statistics(protocol, first.get("assets"),
                                                      first.get("reference_statistics")),
        "features": {"extractor": protocol.get("feature_extractor"), "layer": protocol.get("feature_layer"),
                     "dim": protocol.get("feature_dim"), "weights_sha256": protocol.get("feature_weights_sha256"),
                     "resize": _resize(protocol)},
        "n_generated": _one_or_all((r.get("sampling") or {}).get("n_samples", r.get("n_samples")) for r in recs),
        "n_reference": protocol.get("n_reference"),
        "metric_protocol": protocol,
        "seeds": {"kind": REPLICATES[bool(blocks)], "seeds": sorted(_distinct(r["seed"] for r in recs)),
                  "seed_blocks": sorted(_distinct(blocks)) if blocks else None,
                  "noise_seeds": _distinct((r.get("sampling") or {}).get("noise_seeds") for r in recs)},
        "nfe": {"nfe": first.get("nfe"), "nfe_counted": _one_or_all(r.get("nfe_counted") for r in recs),
                "sampler_nfe": _one_or_all(r.get("sampler_nfe") for r in recs),
                "guidance_scale": (first.get("guidance") or {}).get("scale", 1.0),
                "network_evaluations_per_call": (first.get("guidance") or {}).get("network_evaluations_per_call", 1),
                "nfe_parallel": first.get("nfe_parallel"), "semantics": NFE_SEMANTICS},
        "fine_tuning": {"device_hours": mean(f.get("device_hours") for f in ft),
                        "wall_seconds": mean(f.get("wall_seconds") for f in ft),
                        "device": _one_or_all(f.get("device") for f in ft),
                        "devices": _one_or_all(f.get("devices") for f in ft),
                        "flops": mean(f.get("flops") for f in ft),
                        "teacher_trajectories": mean(i.get("teacher_trajectories") for i in info),
                        "teacher_evaluations": mean(i.get("teacher_evaluations") for i in info),
                        "student_evaluations": mean(i.get("student_evaluations") for i in info),
                        "real_images": mean(i.get("real_images", i.get("real_images_used")) for i in info)},
        "sampling": {"devices": _one_or_all((r.get("sampling") or {}).get("devices", 1) for r in recs),
                     "device": _one_or_all((r.get("sampling") or {}).get("device") for r in recs)},
        "hyperparameters": first.get("hyperparameters"),
        "config_hashes": sorted(_distinct(r.get("config_hash") for r in recs)),
        "software": {"versions": _one_or_all(r.get("versions") for r in recs),
                     "git_revisions": sorted(_distinct(r.get("git_revision") for r in recs if r.get("git_revision"))),
                     "commands": _distinct(r.get("command") for r in recs)},
    }


def _published_provenance(row: pd.Series) -> dict:
    return {"paper": row.get("paper"), "table": row.get("table"), "teacher": {"id": row.get("teacher")},
            "nfe": {"nfe": row.get("nfe"), "semantics": row.get("nfe_semantics")},
            "fine_tuning": {"device_hours": row.get("training_hours"), "cost_unit": row.get("cost_unit")},
            "note": row.get("note"), "source": row.get("source")}


def export(suite: str, records: pd.DataFrame, published: pd.DataFrame, caption: str = "",
           best_of_blocks: bool = False) -> dict:
    """The export document of ``suite``: every measured row (``summarize(records)``) with the
    records it averages, and every published row (``published``, ``baselines.load_published``)
    with its paper provenance. ``best_of_blocks`` also exports the labelled best-of-blocks rows."""
    import sfdbench

    measured = summarize(records, best_of_blocks=best_of_blocks)
    rows = []
    if not measured.empty:
        named = named_rows(records)
        blocks = named["seed_block"] if "seed_block" in named else pd.Series(None, index=named.index)
        named["replicates"] = blocks.notna().map(REPLICATES)
        for _, row in measured.iterrows():
            part = named[(named["method"] == row["method"]) & (named["display"] == row["display"])
                         & (named["nfe"] == row["nfe"]) & (named["replicates"] == row["replicates"])]
            if "guidance" in part:
                part = part[part["guidance"].fillna(1.0) == row["guidance"]]
            recs = [r for r in (read_record(Path(p)) for p in part["path"]) if r] if "path" in part else []
            values = [{"seed": _clean(r["seed"]), "seed_block": _clean(r.get("seed_block")), "fid": _clean(r["fid"]),
                       "record": Path(r["path"]).name if "path" in part else None}
                      for _, r in part.sort_values("seed").iterrows()]
            rows.append({"source": "measured", "table": _clean(row.reindex(COLUMNS).to_dict()),
                         "replicate_values": values,
                         "provenance": _measured_provenance(recs) if recs else None})
    for _, prow in published.iterrows() if not published.empty else []:
        table_row = published_rows(pd.DataFrame([prow])).iloc[0]
        rows.append({"source": "published", "table": _clean(table_row.reindex(COLUMNS).to_dict()),
                     "replicate_values": [], "provenance": _clean(_published_provenance(prow))})
    from sfdbench.records import versions

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "suite": suite, "exported_at": now(),
            "exported_by": {"versions": versions(), "git_revision": git_revision(), "sfdbench": sfdbench.__version__},
            "caption": caption, "fields": FIELDS, "columns": COLUMNS, "rows": [_clean(r) for r in rows]}


def write_export(document: dict, path: Path) -> Path:
    """``document`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    atomic_write_bytes(Path(path), (json.dumps(document, indent=1, sort_keys=False, allow_nan=False) + "\n").encode())
    return Path(path)


def read_export(path: Path) -> dict:
    """An export document; bad input (one line) for a file that is missing or is not one."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"--from {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"--from {path}: not a JSON export ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BadInput(f"--from {path}: not an sfdbench leaderboard export (format != {FORMAT!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"--from {path}: export format version {document.get('format_version')!r}, "
                       f"this sfdbench reads {FORMAT_VERSION}")
    if not isinstance(document.get("rows"), list) or not all(
            isinstance(r, dict) and isinstance(r.get("table"), dict) for r in document["rows"]):
        raise BadInput(f"--from {path}: 'rows' must be a list of rows with a 'table' object each")
    return document


def table_from_exports(documents: list[dict], labels: list[str], best_of_blocks: bool = False) -> pd.DataFrame:
    """One table from one or more export documents: published rows that several files carry are
    shown once; measured rows that would read the same (same name, NFE, guidance, replicates) get
    their file's label appended, e.g. ``SFD [machine-b]``. ``best_of_blocks`` adds the labelled
    best-of-blocks row for every row over two or more seed blocks (from its per-block values)."""
    suites = {d.get("suite") for d in documents}
    if len(suites) > 1:
        raise BadInput(f"--from files are of different suites ({', '.join(sorted(map(str, suites)))}); "
                       "merge one suite at a time")
    frames = []
    for doc, label in zip(documents, labels):
        rows = [r["table"] for r in doc["rows"] if r["table"].get("fid_statistic") != BEST]
        frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
        frame["_label"] = label
        frame["_values"] = [[v.get("fid") for v in r.get("replicate_values") or []] for r in doc["rows"]
                            if r["table"].get("fid_statistic") != BEST]
        frames.append(frame)
    both = pd.concat(frames, ignore_index=True)
    if both.empty:
        raise BadInput("the --from files hold no rows")
    for col in ("nfe", "seeds"):
        both[col] = pd.to_numeric(both[col], errors="coerce")
    both["guidance"] = pd.to_numeric(both["guidance"], errors="coerce").fillna(1.0)
    published = both[both["source"] == "published"]
    published = published.loc[published.drop(columns=["_label", "_values"]).astype(str).drop_duplicates().index]
    measured = both[both["source"] == "measured"].copy()
    if len(labels) > 1 and not measured.empty:
        key = ["display", "nfe", "guidance", "replicates"]
        clash = measured.duplicated(key, keep=False)
        measured.loc[clash, "display"] = measured.loc[clash, "display"] + " [" + measured.loc[clash, "_label"] + "]"
    if best_of_blocks and not measured.empty:
        best = measured[(measured["replicates"] == REPLICATES[True])
                        & (measured["_values"].map(lambda v: len([x for x in v if x is not None])) >= 2)].copy()
        best["fid_mean"] = best["_values"].map(lambda v: min(x for x in v if x is not None))
        best["fid_std"], best["fid_statistic"] = float("nan"), BEST
        for m in EXTRA_METRICS:  # the other metrics are not the best block's
            best[m] = float("nan")
        measured = pd.concat([measured, best]).sort_index(kind="stable")
    measured["nfe"] = measured["nfe"].astype(int) if not measured.empty else measured["nfe"]
    return combine(measured.reindex(columns=COLUMNS).reset_index(drop=True),
                   published.reindex(columns=COLUMNS).reset_index(drop=True))


def caption_from_exports(documents: list[dict], labels: list[str]) -> str:
    captions = [d.get("caption") or "" for d in documents]
    if len(set(captions)) == 1:
        return captions[0]
    return " ".join(f"[{label}] {c}" for label, c in zip(labels, captions) if c)
