"""Runs a grid: validate everything -> for each (method, NFE, guidance): fit once -> for each seed:
sample -> evaluate -> write one record. Finished records are skipped unless ``force``.

The runner sees only the suite interface and the method interface: noise shape, conditioning,
decoding and guidance's unconditional branch come from the suite (``docs/architecture.md``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfdbench import parallel
from sfdbench.diffusion.denoiser import guided_evaluations_per_call
from sfdbench.errors import BadInput
from sfdbench.harness.progress import console, progress_bar
from sfdbench.harness.sampling import MAX_RUN_SEED, SEED_STRIDE, generate, generate_rows
from sfdbench.methods import FitContext, get_method
from sfdbench.records import SCHEMA_VERSION, config_hash, git_revision, now, record_path, versions, write_record
from sfdbench.suites import get_suite


@dataclass
class RunPlan:
    suite: str
    grid: list[tuple[str, int] | tuple[str, int, float]]  # (method, nfe[, guidance scale])
    seeds: list[int]
    samples: int
    out: Path
    force: bool = False
    teacher: Path | None = None
    device: str = "cpu"
    batch: int = 500
    method_overrides: dict = field(default_factory=dict)
    reference_images: Path | None = None  # the paper suites' --reference-images (PRDC, KID, FD-DINOv2)
    # equal-budget rows: budget specs, each "sfd" (the FLOPs SFD's fit at the same NFE used), "sfd*F" (F times
    # that) or a number of FLOPs; every fine-tuning method of the grid that takes a budget (hyperparameter
    # budget_flops) runs once per spec (several specs: FID against compute); None = the methods' recipes
    budget: list | str | float | None = None

    def budgets(self) -> list:
        if self.budget is None:
            return []
        return list(self.budget) if isinstance(self.budget, list | tuple) else [self.budget]
    command: str = ""  # the command line that made the plan, written into every record
    # EDM's --seeds convention instead of run seeds: block B = samples (noise seeds) B*n .. B*n + n - 1
    seed_blocks: list[int] | None = None
    save_samples: bool = False  # also write every batch as an .npz shard under <out>/<suite>/samples/
    # FID against compute as training proceeds: fine-tuning fits write an intermediate checkpoint every
    # this many iterations, each evaluated on snapshot_samples samples of run seed 0 (curve records)
    snapshot_every: int = 0
    snapshot_samples: int = 200

    def replicates(self) -> list[tuple[int, int, int, dict]]:
        """(seed label, run seed, first sample index, what the config hash adds) of every replicate:
        run seeds (noise seed = seed * 10^7 + i) or seed blocks (noise seed = B * n + i)."""
        if self.seed_blocks is not None:
            return [(b, 0, b * self.samples, {"seed_block": b}) for b in self.seed_blocks]
        return [(s, s, 0, {}) for s in self.seeds]

    def entries(self, suite) -> list[tuple[str, int, float]]:
        """The grid with every guidance scale resolved (the suite's default where none is given)."""
        return [(g[0], g[1], float(g[2]) if len(g) > 2 and g[2] is not None else suite.guidance) for g in self.grid]


def default_grid(suite_name: str, methods: list[str] | None, nfes: list[int] | None,
                 guidance: list[float] | None = None, which: str = "default") -> list[tuple[str, int, float | None]]:
    """The suite's grid (``which`` = default | full), filtered by ``methods``; ``nfes`` replaces each
    method's NFE list and ``guidance`` each entry's guidance scales."""
    suite = get_suite(suite_name)
    names = ("default", "full", *suite.extra_grids)
    if which not in names:
        raise BadInput(f"--grid must be one of {', '.join(names)} for suite {suite.name!r}, got {which!r}")
    grid = ((suite.full_grid or suite.default_grid) if which == "full" else suite.default_grid if which == "default"
            else suite.extra_grids[which])
    entries: dict[str, list[tuple[tuple[int, ...], float | None]]] = {}
    for e in grid:
        entries.setdefault(e.method, []).append((e.nfes, e.guidance))
    names = methods or list(entries)
    for e in suite.full_grid:  # a method named with --methods but only in the full grid keeps its NFEs
        if e.method in names and e.method not in {g.method for g in grid}:
            entries.setdefault(e.method, []).append((e.nfes, e.guidance))
    out = []
    for m in names:
        for listed_nfes, scale in entries.get(m) or [((), None)]:
            chosen = nfes or listed_nfes or _missing_nfe(m)
            for w in (guidance or [scale]):
                out.extend((m, n, w) for n in chosen)
    return list(dict.fromkeys(out))


def _missing_nfe(method: str):
    raise BadInput(f"method {method!r} is not in this suite's grids; pass --nfe")


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
    if plan.reference_images is not None:
        suite.use_reference_images(plan.reference_images)
    return suite


def validate(plan: RunPlan) -> None:
    """Everything that can be checked before anything is written (exit 2 on failure)."""
    suite = make_suite(plan)
    if plan.samples < 2:
        raise BadInput(f"--samples must be at least 2 for FID, got {plan.samples}")
    if not isinstance(plan.snapshot_every, int) or plan.snapshot_every < 0 or plan.snapshot_samples < 2:
        raise BadInput(f"--snapshot-every must be >= 0 and --snapshot-samples >= 2, got {plan.snapshot_every}, "
                       f"{plan.snapshot_samples}")
    if not isinstance(plan.batch, int) or plan.batch < 1:
        raise BadInput(f"--batch must be an integer >= 1, got {plan.batch!r}")
    if not plan.seeds or any(not 0 <= s <= MAX_RUN_SEED for s in plan.seeds):
        raise BadInput(f"--seeds must be integers in 0..{MAX_RUN_SEED}, got {plan.seeds}")
    if plan.samples >= SEED_STRIDE:
        raise BadInput(f"--samples must be below {SEED_STRIDE}")
    if plan.seed_blocks is not None:
        last = (max(plan.seed_blocks, default=0) + 1) * plan.samples
        if not plan.seed_blocks or min(plan.seed_blocks) < 0 or last > SEED_STRIDE:
            raise BadInput(f"--seed-blocks must be integers >= 0 with (block + 1) x samples <= {SEED_STRIDE}, got "
                           f"{plan.seed_blocks} at {plan.samples} samples")
    for method, nfe, scale in plan.entries(suite):
        get_method(method).check_nfe(nfe, suite)
        get_method(method).check_suite(suite)
        hp = get_method(method).hyperparameters(suite, nfe)
        check_guidance(suite, scale)
        if scale != 1.0 and getattr(get_method(method), "guided", False):
            raise BadInput(f"{method} distils guidance into the network (its scale is the hyperparameter "
                           f"{method}.guidance); run it with --guidance 1 and --set {method}.guidance=W")
        if plan.budget is not None and "budget_flops" not in hp and method not in BUDGET_SOURCES:
            raise BadInput(f"--budget: method {method!r} takes no compute budget (only fine-tuning baselines with a "
                           "budget_flops hyperparameter do); run it without --budget")
    for spec in plan.budgets():
        budget_factor(spec)  # bad specs fail here
    check_writable(plan.out)


# the SFD family: the reference the equal budget is taken from; they run unchanged under --budget
BUDGET_SOURCES = ("sfd", "sfd-v", "sfd-stage2")


def fit_workdir(plan: RunPlan, suite, method, nfe: int, hp: dict, teacher_id: str) -> Path:
    fit_hash = config_hash({"suite": suite.name, "method": method.name, "nfe": nfe, "hyperparameters": hp,
                            "teacher": teacher_id})
    return Path(plan.out) / suite.name / "fits" / f"{method.name}-nfe{nfe}-{fit_hash}"


def budget_factor(spec) -> tuple[float, bool]:
    """(value, relative): ``"sfd"`` -> (1, True), ``"sfd*0.5"`` -> (0.5, True), ``2e12`` -> (2e12, False)."""
    text = str(spec).strip()
    relative = text == "sfd" or text.startswith("sfd*")
    try:
        value = 1.0 if text == "sfd" else float(text[4:] if relative else text)
    except ValueError:
        value = float("nan")
    if isinstance(spec, bool) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"--budget must be 'sfd', 'sfd*FACTOR' or a positive number of FLOPs, got {spec!r}")
    return value, relative


def budget_flops(plan: RunPlan, suite, teacher, teacher_id: str, nfe: int, device, spec="sfd") -> float:
    """The FLOP budget of an equal-budget row: a number given with --budget, or (``sfd``, ``sfd*F``)
    F x the fine-tuning FLOPs of SFD's fit at the same NFE on this suite and teacher (fitted here if
    not done yet, in the same fit folder a plain SFD run uses)."""
    value, relative = budget_factor(spec)
    if not relative:
        return value
    sfd = get_method("sfd")
    hp = sfd.hyperparameters(suite, nfe)
    fitted = fit_everywhere(sfd, FitContext(suite=suite, teacher=teacher, nfe=nfe, device=device,
                                            progress=progress_bar, workdir=fit_workdir(plan, suite, sfd, nfe, hp,
                                                                                       teacher_id),
                                            teacher_id=teacher_id, devices=parallel.world()))
    flops = (fitted.fine_tuning or {}).get("flops")
    if not flops:
        raise BadInput(f"SFD's fit at NFE {nfe} recorded no FLOPs (an older fit); rerun it with --force")
    return value * float(flops)


def check_guidance(suite, scale: float) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise BadInput(f"guidance scale must be a finite number >= 0, got {scale!r}")
    if scale != 1.0 and not suite.conditional:
        raise BadInput(f"suite {suite.name!r} is unconditional: classifier-free guidance needs conditioning; "
                       "use --guidance 1 or a conditional suite (see `sfdbench suites`)")


def check_writable(path: Path) -> None:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to --out {path}: {probe} is not a writable directory")


GRID_SEED, GRID_SIZE = 0, 64
GRID_MIN_PIXELS = 32  # small images are enlarged (nearest) to at least this many pixels per side


def write_sample_grid(fitted, suite, path: Path, device, guidance: float = 1.0) -> Path:
    """An 8x8 PNG grid of samples 0..63 of run seed 0: the same noise for every method and NFE."""
    import io

    import torchvision

    from sfdbench.io import atomic_write_bytes

    u8, _, _ = generate(fitted, suite, GRID_SEED, GRID_SIZE, GRID_SIZE, device, guidance)
    images = u8.float() / 255.0
    factor = max(1, -(-GRID_MIN_PIXELS // images.shape[-1]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    buf = io.BytesIO()
    torchvision.utils.save_image(images, buf, format="png", nrow=8, padding=2, pad_value=1.0)
    atomic_write_bytes(path, buf.getvalue())
    return path


def guidance_record(scale: float, distilled: float | None = None) -> dict:
    """What a record says about guidance: the sampler's scale, what one sampler evaluation costs and,
    for a student that has guidance distilled into it (``guided-pd``), the scale it imitates
    (``distilled_scale``: the distribution the samples target, which the cost table matches SFD at)."""
    return {"scale": scale, "network_evaluations_per_call": guided_evaluations_per_call(scale),
            "formula": "D_u + w (D_c - D_u) (classifier-free guidance; w = 1: conditional, w = 0: unconditional)",
            **({"distilled_scale": float(distilled)} if distilled is not None else {})}


def guided_display(display: str, scale: float) -> str:
    return display if scale == 1.0 else f"{display} (CFG w={scale:g}, 2 evals/step)" if scale else \
        f"{display} (unconditional)"


def budget_display(display: str, hp: dict, spec) -> str:
    if hp.get("budget_flops") is None or spec is None:
        return display
    value, relative = budget_factor(spec)
    source = ("SFD's budget at this NFE" if value == 1.0 else f"{value:g} x SFD's budget at this NFE") if relative \
        else "budget"
    return f"{display} ({source}: {hp['budget_flops']:.3g} FLOPs)"


def fit_everywhere(method, ctx: FitContext):
    """``method.fit`` with several processes (``torchrun``): data-parallel methods fit together;
    any other method is fitted by process 0 alone (``parallel.solo``) while the others wait, and
    then every process loads what process 0 wrote, so all sample with the same model. One process:
    just ``method.fit``."""
    if parallel.world() == 1 or method.data_parallel:
        return method.fit(ctx)
    if parallel.is_main():
        with parallel.solo():
            method.fit(ctx)
    parallel.barrier()
    return method.fit(ctx)


def run(plan: RunPlan) -> list[Path]:
    """Execute ``plan``; returns the record paths (written or already present). Under ``torchrun``
    every process runs this; process 0 alone prints and writes (``sfdbench.parallel``)."""
    validate(plan)
    device = torch.device(parallel.init(plan.device))
    if not parallel.is_main():
        console.quiet = True
    suite = make_suite(plan)
    suite.require_assets(teacher_given=plan.teacher is not None)  # every missing file named at once (exit 3)
    teacher = suite.load_teacher(plan.teacher, device)  # corrupt or mismatched weights fail here, before any write
    teacher_id = suite.teacher_id(plan.teacher)
    protocol = suite.metric_protocol()
    assets = suite.asset_provenance(plan.teacher)  # sha256 of every downloaded file (a mismatch stops here)
    written: list[Path] = []
    for method_name, nfe, scale in plan.entries(suite):
        method = get_method(method_name)
        takes_budget = "budget_flops" in method.hyperparameters(suite, nfe)
        for spec in (plan.budgets() if takes_budget and plan.budgets() else [None]):
            if spec is not None:
                value = budget_flops(plan, suite, teacher, teacher_id, nfe, device, spec)
                suite.method_options = {**suite.method_options,
                                        method.name: {**suite.method_options.get(method.name, {}),
                                                      "budget_flops": value}}
            written += _run_entry(plan, suite, teacher, teacher_id, protocol, assets, method, nfe, scale, spec,
                                  device)
    return written


def _run_entry(plan: RunPlan, suite, teacher, teacher_id: str, protocol: dict, assets: dict, method, nfe: int,
               scale: float, spec, device) -> list[Path]:
    """One (method, NFE, guidance[, budget]) of the grid: fit once, then one record per seed."""
    written: list[Path] = []
    hp = method.hyperparameters(suite, nfe)
    base = {"suite": suite.name, "method": method.name, "nfe": nfe, "hyperparameters": hp,
            "teacher": teacher_id, "n_samples": plan.samples, "metric_protocol": protocol,
            "schema_version": SCHEMA_VERSION}
    if scale != 1.0:  # unguided configurations keep the hash they always had
        base["guidance"] = scale
    todo = []
    for seed, run_seed, first, extra in plan.replicates():
        chash = config_hash({**base, "seed": seed, **extra})
        label = f"block{seed}" if extra else f"seed{seed}"
        path = record_path(plan.out, suite.name, method.name, nfe, label, chash)
        if path.exists() and not plan.force:
            console.print(f"[dim]skip {method.name} NFE {nfe} {label}: {path} exists (use --force)[/dim]")
            written.append(path)
        else:
            todo.append((seed, run_seed, first, extra, label, chash, path))
    todo = parallel.broadcast_from_main(todo)  # process 0's view of what is done decides for everyone
    if not todo:
        return written
    workdir = fit_workdir(plan, suite, method, nfe, hp, teacher_id)
    fit_hash = workdir.name.rsplit("-", 1)[-1]
    fitted = fit_everywhere(method, FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=workdir, device=device,
                                               progress=progress_bar, teacher_id=teacher_id,
                                               devices=parallel.world(), snapshot_every=plan.snapshot_every))
    tag = f"{method.name}-nfe{nfe}-{fit_hash}" + (f"-w{scale:g}" if scale != 1.0 else "")
    grid_path = Path(plan.out) / suite.name / "grids" / f"{tag}.png"
    if parallel.is_main():
        write_sample_grid(fitted, suite, grid_path, device, scale)
    per_call = guidance_record(scale)["network_evaluations_per_call"]
    for seed, run_seed, first, extra, label, chash, path in todo:
        started = now()
        shards = Path(plan.out) / suite.name / "samples" / tag / label if plan.save_samples else None
        with progress_bar(f"sample {method.name} NFE {nfe} {label.replace('seed', 'seed ')}", plan.samples) as advance:
            rows, stats = generate_rows(fitted, suite, run_seed, plan.samples, plan.batch, device, scale, advance,
                                        first_index=first, save_dir=shards)
        if abs(stats["sampler_nfe"] - nfe) > 1e-9 or abs(stats["nfe_counted"] - nfe * per_call) > 1e-9:
            raise RuntimeError(f"{method.name} declared NFE {nfe} (x{per_call} network calls with guidance "
                               f"{scale:g}) but the sampler called the denoiser {stats['sampler_nfe']} times "
                               f"and the network {stats['nfe_counted']} times per sample")
        if not parallel.is_main():  # process 0 evaluates and writes; the others go on to the next replicate
            continue
        metrics = suite.evaluate_summaries(rows)
        reference = suite.reference_provenance()
        noise = (f"{seed}*{SEED_STRIDE} + i for i < {plan.samples}" if not extra else
                 f"{first} + i for i < {plan.samples} (seed block {seed}: samples {first}..{first + plan.samples - 1}, "
                 "EDM's --seeds convention)")
        record = {
            **base, "seed": seed, **extra, "config_hash": chash,
            "display": budget_display(guided_display(method.display_name(hp), scale), hp, spec),
            "group": method.group,
            "nfe_counted": stats["nfe_counted"], "sampler_nfe": stats["sampler_nfe"],
            # sequential rounds of calls, for methods whose calls per step run in parallel (EPD-Solver)
            **({"nfe_parallel": fitted.info["parallel_nfe"]} if "parallel_nfe" in (fitted.info or {}) else {}),
            "guidance": guidance_record(scale, hp["guidance"] if getattr(method, "guided", False) else None),
            "metrics": metrics,
            "fine_tuning": fitted.fine_tuning,
            "fit_info": fitted.info,
            "sampling": {"n_samples": plan.samples,
                         "noise_seeds": noise,
                         "conditioning": "drawn from each sample's generator after its latent"
                         if suite.conditional else "none",
                         "batch": plan.batch, "seconds": stats["sampling_seconds"],
                         "images_per_second": stats["images_per_second"], "device": str(device),
                         "devices": parallel.world(), "peak_memory": stats["peak_memory"],
                         **({"shards": str(shards)} if shards is not None else {})},
            "sample_grid": str(grid_path),
            **({"assets": assets} if assets else {}),
            "reference_statistics": reference,
            **({"suite_settings_sources": suite.provenance} if getattr(suite, "provenance", None) else {}),
            "versions": versions(), "git_revision": git_revision(), "started_at": started, "ended_at": now(),
            "command": plan.command,
        }
        write_record(path, record)
        written.append(path)
        console.print(f"{record['display']} NFE {nfe} {label.replace('seed', 'seed ')}: FID {metrics['fid']:.3f}")
    if plan.snapshot_every:
        evaluate_snapshots(plan, suite, teacher, method, fitted, workdir, nfe, scale, base, device)
    return written


def curves_dir(out: Path, suite: str) -> Path:
    """Where the intermediate-checkpoint records live (apart from records/: tables never show them)."""
    return Path(out) / suite / "curves"


def evaluate_snapshots(plan: RunPlan, suite, teacher, method, fitted, workdir: Path, nfe: int, scale: float,
                       base: dict, device) -> list[Path]:
    """FID against compute as training proceeds: every intermediate checkpoint of this fit (written
    with ``--snapshot-every``) sampled at NFE ``nfe`` on ``plan.snapshot_samples`` samples of run seed
    0 and evaluated like a record, with the fine-tuning accounting up to that checkpoint. Written to
    ``curves/`` and marked as reduced-sample evaluations; ``sfdbench plot`` draws them as curves."""
    from sfdbench.methods.training import read_fit, snapshot_models

    model = Path(fitted.info.get("shared_model") or Path(workdir) / "model.safetensors")
    written = []
    for iteration, path in snapshot_models(model):
        config = {**base, "n_samples": plan.snapshot_samples, "seed": 0, "snapshot_iteration": iteration}
        chash = config_hash(config)
        out_path = curves_dir(plan.out, suite.name) / f"{method.name}-nfe{nfe}-it{iteration:06d}-{chash}.json"
        if parallel.broadcast_from_main(out_path.exists() and not plan.force):
            written.append(out_path)
            continue
        snapshot = method.load(path, suite, teacher, device, nfe=nfe)
        rows, stats = generate_rows(snapshot, suite, 0, plan.snapshot_samples, plan.batch, device, scale)
        if not parallel.is_main():
            continue
        fit = read_fit(path.parent)
        hp = base["hyperparameters"]
        record = {**config, "config_hash": chash, "group": method.group,
                  "display": guided_display(method.display_name(hp), scale),
                  "metrics": suite.evaluate_summaries(rows), "fine_tuning": fit.get("fine_tuning"),
                  "snapshot": {"iteration": iteration, "model": str(path),
                               "note": f"intermediate checkpoint evaluated on {plan.snapshot_samples} samples of run "
                                       "seed 0: a reduced sample count, not comparable with the full rows"},
                  "nfe_counted": stats["nfe_counted"], "versions": versions(), "git_revision": git_revision(),
                  "ended_at": now(), "command": plan.command}
        write_record(out_path, record)
        written.append(out_path)
        console.print(f"{record['display']} NFE {nfe} checkpoint it {iteration}: FID {record['metrics']['fid']:.3f} "
                      f"(n={plan.snapshot_samples})")
    return written
