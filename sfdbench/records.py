"""Run records: one self-describing JSON file per (suite, method, NFE, seed, config hash),
written atomically, never edited in place; ``load_records`` reads them into pandas."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from sfdbench.io import atomic_write_bytes

SCHEMA_VERSION = 1


def config_hash(config: dict) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


# What identifies a configuration: the record fields the config hash covers, the seed aside.
CONFIG_FIELDS = ("suite", "method", "nfe", "hyperparameters", "teacher", "n_samples", "metric_protocol",
                 "schema_version")


def guidance_scale(record: dict) -> float:
    """A record's classifier-free-guidance scale (1 = unguided, also for records that predate guidance)."""
    return float((record.get("guidance") or {}).get("scale", 1.0))


def target_guidance(record: dict) -> float:
    """The guidance scale of the distribution a record's samples aim at: the sampler's scale, or for a
    student with guidance distilled into it (sampled at scale 1), the scale it was distilled at."""
    distilled = (record.get("guidance") or {}).get("distilled_scale")
    return float(distilled) if distilled is not None else guidance_scale(record)


def variant_hash(record: dict) -> str:
    """The hash of a record's configuration without its seed: records that differ only in seed
    share it, and are the ones a table averages. (Guidance enters only when it is not 1, as in the
    config hash the runner writes.)"""
    scale = guidance_scale(record)
    return config_hash({**{k: record.get(k) for k in CONFIG_FIELDS}, **({"guidance": scale} if scale != 1.0 else {})})


def records_dir(out: Path, suite: str) -> Path:
    return Path(out) / suite / "records"


def record_path(out: Path, suite: str, method: str, nfe: int, seed: int | str, chash: str) -> Path:
    """``seed``: a run seed (``...-seed3-...``) or a replicate label such as ``"block2"``."""
    label = seed if isinstance(seed, str) else f"seed{seed}"
    return records_dir(out, suite) / f"{method}-nfe{nfe}-{label}-{chash}.json"


def write_record(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return rev.stdout.strip() or None if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import torch_fidelity

    import sfdbench

    return {"sfdbench": sfdbench.__version__, "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__}


def read_record(path: Path) -> dict | None:
    """A record, or None for a file that is not one (partial files never exist: writes are atomic)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("schema_version") == SCHEMA_VERSION else None


def load_records(results: Path, suite: str) -> pd.DataFrame:
    """All records of ``suite`` under ``results`` as one row each (metrics flattened)."""
    rows = []
    for path in sorted(records_dir(results, suite).glob("*.json")):
        rec = read_record(path)
        if rec is None or rec.get("suite") != suite:
            continue
        ft = rec.get("fine_tuning") or {}
        info = rec.get("fit_info") or {}
        rows.append({"method": rec["method"], "display": rec.get("display", rec["method"]),
                     "group": rec.get("group", "solver"), "nfe": rec["nfe"], "seed": rec["seed"],
                     # seed block B (noise seeds B*n .. B*n+n-1, EDM's --seeds); None: a run seed
                     "seed_block": rec.get("seed_block"),
                     "config_hash": rec["config_hash"], "variant": variant_hash(rec),
                     "nfe_parallel": rec.get("nfe_parallel"),  # sequential rounds (EPD-Solver); None for others
                     "guidance": guidance_scale(rec), "target_guidance": target_guidance(rec),
                     "hyperparameters": rec.get("hyperparameters") or {}, "teacher": rec.get("teacher"),
                     "sample_grid": rec.get("sample_grid"), "metric_protocol": rec.get("metric_protocol") or {},
                     **rec.get("metrics", {}),
                     "fine_tuning_hours": ft.get("device_hours", 0.0), "fine_tuning_flops": ft.get("flops"),
                     # the compute budget an equal-budget row was given (`run --budget`); None for a recipe row
                     "budget_flops": (rec.get("hyperparameters") or {}).get("budget_flops"),
                     "teacher_evaluations": info.get("teacher_evaluations"),
                     "student_evaluations": info.get("student_evaluations"),
                     "real_images": info.get("real_images", info.get("real_images_used")),
                     "device": ft.get("device"),
                     "devices": ft.get("devices"), "n_samples": rec.get("sampling", {}).get("n_samples"),
                     "path": str(path)})
    return pd.DataFrame(rows)


def load_curves(results: Path, suite: str) -> pd.DataFrame:
    """The intermediate-checkpoint evaluations of ``suite`` (``sfdbench run --snapshot-every``), one row
    each: method, display, NFE, iteration, FID, fine-tuning device-hours and FLOPs up to that
    checkpoint, and the (reduced) sample count. Empty when there are none."""
    rows = []
    for path in sorted((Path(results) / suite / "curves").glob("*.json")):
        rec = read_record(path)
        if rec is None or rec.get("suite") != suite or "snapshot" not in rec:
            continue
        ft = rec.get("fine_tuning") or {}
        rows.append({"method": rec["method"], "display": rec.get("display", rec["method"]), "nfe": rec["nfe"],
                     "iteration": rec["snapshot"]["iteration"], "fid": (rec.get("metrics") or {}).get("fid"),
                     "fine_tuning_hours": ft.get("device_hours"), "fine_tuning_flops": ft.get("flops"),
                     "n_samples": rec.get("n_samples"), "guidance": guidance_scale(rec), "path": str(path)})
    return pd.DataFrame(rows, columns=["method", "display", "nfe", "iteration", "fid", "fine_tuning_hours",
                                       "fine_tuning_flops", "n_samples", "guidance", "path"])
