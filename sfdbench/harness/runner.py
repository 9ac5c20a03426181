"""Runs a grid: validate everything -> for each (method, NFE): fit once -> for each seed:
sample -> evaluate -> write one record. Finished records are skipped unless ``force``."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfdbench.errors import BadInput
from sfdbench.harness.progress import console, progress_bar
from sfdbench.harness.sampling import MAX_RUN_SEED, SEED_STRIDE, generate
from sfdbench.methods import FitContext, get_method
from sfdbench.metrics.images import to_uint8
from sfdbench.records import SCHEMA_VERSION, config_hash, git_revision, now, record_path, versions, write_record
from sfdbench.suites import get_suite


@dataclass
class RunPlan:
    suite: str
    grid: list[tuple[str, int]]  # (method, nfe)
    seeds: list[int]
    samples: int
    out: Path
    force: bool = False
    teacher: Path | None = None
    device: str = "cpu"
    batch: int = 500
    method_overrides: dict = field(default_factory=dict)


def default_grid(suite_name: str, methods: list[str] | None, nfes: list[int] | None) -> list[tuple[str, int]]:
    """The suite's grid, filtered by ``methods``; ``nfes`` replaces each method's NFE list."""
    suite = get_suite(suite_name)
    entries = {e.method: e.nfes for e in suite.default_grid}
    names = methods or list(entries)
    return [(m, n) for m in names for n in (nfes or entries.get(m) or _missing_nfe(m))]


def _missing_nfe(method: str):
    raise BadInput(f"method {method!r} is not in this suite's default grid; pass --nfe")


def parse_overrides(items: list[str]) -> dict:
    """``["sfd.iterations=200", "sfd.lr=1e-4"]`` -> ``{"sfd": {"iterations": 200, "lr": 1e-4}}``
    (values parsed as JSON where they can be, else kept as strings)."""
    import json

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise BadInput(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        get_method(method)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def make_suite(plan: RunPlan):
    """The plan's suite with its ``--set`` hyperparameter overrides applied."""
    suite = get_suite(plan.suite)
    for method, values in plan.method_overrides.items():
        merged = {**suite.method_options.get(method, {}), **values}
        suite.method_options = {**suite.method_options, method: merged}
    return suite


def validate(plan: RunPlan) -> None:
    """Everything that can be checked before anything is written (exit 2 on failure)."""
    suite = make_suite(plan)
    if plan.samples < 2:
        raise BadInput(f"--samples must be at least 2 for FID, got {plan.samples}")
    if not plan.seeds or any(not 0 <= s <= MAX_RUN_SEED for s in plan.seeds):
        raise BadInput(f"--seeds must be integers in 0..{MAX_RUN_SEED}, got {plan.seeds}")
    if plan.samples >= SEED_STRIDE:
        raise BadInput(f"--samples must be below {SEED_STRIDE}")
    for method, nfe in plan.grid:
        get_method(method).check_nfe(nfe, suite)
        get_method(method).hyperparameters(suite, nfe)
    check_writable(plan.out)
    suite.load_teacher(plan.teacher)  # corrupt or mismatched weights fail here, before any write


def check_writable(path: Path) -> None:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to --out {path}: {probe} is not a writable directory")


GRID_SEED, GRID_SIZE = 0, 64


def write_sample_grid(fitted, suite, path: Path, device) -> Path:
    """An 8x8 PNG grid of samples 0..63 of run seed 0: the same noise for every method and NFE."""
    import io

    import torchvision

    from sfdbench.networks.checkpoint import atomic_write_bytes

    images, _ = generate(fitted, GRID_SEED, GRID_SIZE, suite.image_shape, GRID_SIZE, device)
    buf = io.BytesIO()
    u8 = to_uint8(images).float() / 255.0
    u8 = torch.nn.functional.interpolate(u8, scale_factor=4, mode="nearest") if u8.shape[-1] < 32 else u8
    torchvision.utils.save_image(u8, buf, format="png", nrow=8, padding=2, pad_value=1.0)
    atomic_write_bytes(path, buf.getvalue())
    return path


def run(plan: RunPlan) -> list[Path]:
    """Execute ``plan``; returns the record paths (written or already present)."""
    validate(plan)
    suite = make_suite(plan)
    device = torch.device(plan.device)
    teacher = suite.load_teacher(plan.teacher, device)
    teacher_id = suite.teacher_id(plan.teacher)
    protocol = suite.metric_protocol()
    written: list[Path] = []
    for method_name, nfe in plan.grid:
        method = get_method(method_name)
        hp = method.hyperparameters(suite, nfe)
        base = {"suite": suite.name, "method": method.name, "nfe": nfe, "hyperparameters": hp,
                "teacher": teacher_id, "n_samples": plan.samples, "metric_protocol": protocol,
                "schema_version": SCHEMA_VERSION}
        todo = []
        for seed in plan.seeds:
            chash = config_hash({**base, "seed": seed})
            path = record_path(plan.out, suite.name, method.name, nfe, seed, chash)
            if path.exists() and not plan.force:
                console.print(f"[dim]skip {method.name} NFE {nfe} seed {seed}: {path} exists (use --force)[/dim]")
                written.append(path)
            else:
                todo.append((seed, chash, path))
        if not todo:
            continue
        fit_hash = config_hash({k: base[k] for k in ("suite", "method", "nfe", "hyperparameters", "teacher")})
        workdir = Path(plan.out) / suite.name / "fits" / f"{method.name}-nfe{nfe}-{fit_hash}"
        fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=workdir, device=device,
                                       progress=progress_bar))
        grid_path = write_sample_grid(fitted, suite, Path(plan.out) / suite.name / "grids" /
                                      f"{method.name}-nfe{nfe}-{fit_hash}.png", device)
        for seed, chash, path in todo:
            started = now()
            with progress_bar(f"sample {method.name} NFE {nfe} seed {seed}", plan.samples) as advance:
                images, stats = generate(fitted, seed, plan.samples, suite.image_shape, plan.batch, device, advance)
            if abs(stats["nfe_counted"] - nfe) > 1e-9:
                raise RuntimeError(f"{method.name} declared NFE {nfe} but called the network "
                                   f"{stats['nfe_counted']} times per sample")
            metrics = suite.evaluate(to_uint8(images))
            record = {
                **base, "seed": seed, "config_hash": chash, "display": method.display_name(hp), "group": method.group,
                "nfe_counted": stats["nfe_counted"], "metrics": metrics,
                "fine_tuning": fitted.fine_tuning,
                "fit_info": fitted.info,
                "sampling": {"n_samples": plan.samples,
                             "noise_seeds": f"{seed}*{SEED_STRIDE} + i for i < {plan.samples}",
                             "batch": plan.batch, "seconds": stats["sampling_seconds"],
                             "images_per_second": stats["images_per_second"], "device": str(device)},
                "sample_grid": str(grid_path),
                "versions": versions(), "git_revision": git_revision(), "started_at": started, "ended_at": now(),
                "command": "sfdbench " + shlex.join(sys.argv[1:]),
            }
            write_record(path, record)
            written.append(path)
            console.print(f"{method.display} NFE {nfe} seed {seed}: FID {metrics['fid']:.3f}")
    return written
