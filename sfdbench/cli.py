"""The ``sfdbench`` command line: parses, calls the library, prints with rich, sets the exit code."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from sfdbench.errors import BadInput, SfdbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark few-step diffusion samplers: SFD and its baselines.")
teacher_app = typer.Typer(no_args_is_help=True, help="Train an embedded suite's teacher; inspect or convert an EDM "
                                                     "teacher.")
features_app = typer.Typer(no_args_is_help=True, help="Train the embedded suite's feature network.")
app.add_typer(teacher_app, name="teacher")
app.add_typer(features_app, name="features")
out = Console()


def _command_line() -> str:
    return "sfdbench " + shlex.join(sys.argv[1:])


@teacher_app.command("train")
def teacher_train(suite: str = typer.Option("digits"), out_path: Path | None = typer.Option(None, "--out"),
                  iterations: int = typer.Option(4500), batch: int = typer.Option(128), seed: int = typer.Option(0)):
    """Train an embedded suite's EDM teacher (EDM loss, EMA) and write safetensors + JSON."""
    net, meta, target = _train(suite, out_path, "teacher", iterations=iterations, batch=batch, seed=seed)
    out.print(f"wrote {target} (loss {meta['final_loss_ema']:.4f}, {meta['wall_seconds']:.0f} s)")


@teacher_app.command("inspect")
def teacher_inspect(path: Path = typer.Argument(..., help="an EDM network pickle (.pkl) or a converted .safetensors")):
    """Architecture, configuration, parameter count and sha256 of a teacher file, read without
    executing anything from it."""
    import json

    from sfdbench.networks.edm_pickle import inspect_teacher

    info = inspect_teacher(path)
    for key, value in info.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
        out.print(f"[bold]{key}[/bold]: {text}", highlight=False, soft_wrap=True)


@teacher_app.command("convert")
def teacher_convert(path: Path = typer.Argument(..., help="an EDM network pickle (.pkl), or a CompVis LDM "
                                                 "checkpoint (.ckpt, e.g. lsun_bedrooms model.ckpt)"),
                    out_path: Path = typer.Argument(..., help="the .safetensors to write (weights + config JSON); "
                                                    "for a .ckpt: the diffusers folder to write"),
                    ema: bool = typer.Option(True, "--ema/--no-ema", help=".ckpt: use the EMA U-Net weights"),
                    head_channels: int = typer.Option(32, help=".ckpt: channels per attention head (the LDM "
                                                      "config's num_head_channels; 32 for LSUN-Bedroom)"),
                    sample_size: int = typer.Option(64, help=".ckpt: latent resolution (64 for LSUN-Bedroom)")):
    """Convert an EDM pickle to safetensors (weights + its configuration), or a CompVis LDM checkpoint to a
    diffusers folder for the lsun_bedroom suite; neither file's code is ever run."""
    from sfdbench.networks.edm_pickle import convert_to_safetensors

    if path.suffix == ".ckpt":
        from sfdbench.networks.ldm_checkpoint import convert_ldm

        if head_channels < 1 or sample_size < 1:
            raise BadInput(f"--head-channels and --sample-size must be >= 1, got {head_channels}, {sample_size}")
        _check_writable_dir(out_path)
        record = convert_ldm(path, out_path, use_ema=ema, head_channels=head_channels, sample_size=sample_size)
        out.print(f"wrote {out_path} (diffusers folder; EMA weights: {record['ema']}; "
                  f"{len(record['inert_globals'])} non-tensor globals left unresolved)")
        return
    if out_path.suffix != ".safetensors":
        raise BadInput(f"{out_path} must end in .safetensors")
    _check_writable_dir(out_path.parent)
    convert_to_safetensors(path, out_path)
    out.print(f"wrote {out_path}")


@features_app.command("train")
def features_train(suite: str = typer.Option("digits"), out_path: Path | None = typer.Option(None, "--out"),
                   epochs: int = typer.Option(60), seed: int = typer.Option(0)):
    """Train an embedded suite's feature CNN and write safetensors + JSON (reports held-out accuracy)."""
    net, meta, target = _train(suite, out_path, "features", epochs=epochs, seed=seed)
    out.print(f"wrote {target} (held-out accuracy {meta['test_accuracy']:.4f})")


def _train(suite: str, out_path: Path | None, what: str, **settings):
    """Train the suite's teacher or feature network and save it with the command that made it."""
    from sfdbench.harness.progress import progress_bar
    from sfdbench.networks.checkpoint import save_weights
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    default, train = ((s.teacher_weights_path, s.train_teacher) if what == "teacher"
                      else (s.feature_weights_path, s.train_features))
    target = _writable_file(out_path or default())
    net, meta = train(progress=progress_bar, **settings)
    meta["command"] = _command_line()
    save_weights(net, target, meta)
    return net, meta, target


def _number_list(text: str | None, what: str, kind=int, words: str = "integers") -> list | None:
    """Comma-separated numbers of ``kind`` (None when not given; bad input when malformed or empty)."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{what} must be comma-separated {words}, got {text!r}") from None
    if not values:
        raise BadInput(f"{what} is empty")
    return values


def _int_list(text: str | None, what: str) -> list[int] | None:
    return _number_list(text, what)


def _float_list(text: str | None, what: str) -> list[float] | None:
    return _number_list(text, what, float, "numbers")


def _name_list(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


@app.command("run")
def run_cmd(suite: str = typer.Option("digits", help="suite name (see `sfdbench suites`)"),
            methods: str | None = typer.Option(None, help="comma-separated methods; default: the suite's grid"),
            nfe: str | None = typer.Option(None, help="comma-separated NFEs for every method"),
            seeds: str | None = typer.Option(None, help="comma-separated run seeds; default: the suite's"),
            samples: int | None = typer.Option(None, help="samples per (method, NFE, seed)"),
            out_dir: Path = typer.Option(Path("results"), "--out", help="results folder"),
            teacher: Path | None = typer.Option(None, help="teacher weights instead of the suite's (paper suites: an "
                                                "EDM .pkl or a .safetensors from `sfdbench teacher convert`)"),
            budget: str | None = typer.Option(None, help="equal-budget rows: 'sfd' (each fine-tuning baseline gets "
                                              "the FLOPs SFD's fit used at the same NFE), 'sfd*F' (F times that) or a "
                                              "number of FLOPs; comma-separated for several (FID against compute)"),
            reference_images: Path | None = typer.Option(None, help="paper suites: the training set's images (a "
                                                         "folder of PNGs or an .npz of uint8) for precision/recall/"
                                                         "density/coverage, KID and FD-DINOv2"),
            device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
            force: bool = typer.Option(False, help="rerun records that already exist"),
            guidance: str | None = typer.Option(None, help="comma-separated classifier-free guidance scales for "
                                                "every entry (conditional suites; 1 = none, 2 network calls per "
                                                "guided step); default: the grid's"),
            grid: str = typer.Option("default", help="default | full (every method at every listed NFE) | a suite's "
                                     "named grid (`sfdbench suites`)"),
            set_: list[str] | None = typer.Option(None, "--set", help="METHOD.KEY=VALUE hyperparameter override "
                                                      "(repeatable), e.g. --set sfd.iterations=200"),
            seed_blocks: str | None = typer.Option(None, help="comma-separated seed blocks instead of run seeds: "
                                                   "block B = samples B*n .. B*n+n-1 (EDM's --seeds convention; "
                                                   "block 0 at n = 50000 is seeds 0-49999)"),
            batch: int = typer.Option(500, help="samples per sampling batch (batches are what processes share "
                                      "out under torchrun; results do not depend on it)"),
            save_samples: bool = typer.Option(False, help="also write every batch of samples as an .npz shard "
                                              "(uint8 images, sample indices, conditioning) under "
                                              "OUT/SUITE/samples/"),
            snapshot_every: int = typer.Option(0, help="FID against compute as training proceeds: fine-tuning "
                                               "fits (SFD, PD's last round, CD, ECT) keep a checkpoint every N "
                                               "iterations, each "
                                               "evaluated on --snapshot-samples samples (drawn by `sfdbench plot`)"),
            snapshot_samples: int = typer.Option(200, help="samples per intermediate-checkpoint evaluation"),
            devices: int | None = typer.Option(None, help="start K processes with torchrun (one per GPU with "
                                               "--device cuda, gloo processes on CPU); same as `torchrun "
                                               "--nproc_per_node K -m sfdbench run ...`")):
    """Fit -> sample -> evaluate a grid of (method, NFE, seed); one JSON record each."""
    import time

    from sfdbench import parallel
    from sfdbench.harness.runner import RunPlan, default_grid, parse_overrides, run
    from sfdbench.suites import get_suite

    if devices is not None:
        raise typer.Exit(_relaunch_with_torchrun(devices))
    s = get_suite(suite)
    plan = RunPlan(suite=s.name, grid=default_grid(s.name, _name_list(methods), _int_list(nfe, "--nfe"),
                                                   _float_list(guidance, "--guidance"), grid),
                   seeds=_int_list(seeds, "--seeds") or list(s.default_seeds),
                   samples=samples if samples is not None else s.default_samples, out=out_dir, force=force,
                   teacher=teacher, device=device, method_overrides=parse_overrides(set_ or []),
                   reference_images=reference_images, budget=_budget(budget), command=_command_line(),
                   seed_blocks=_int_list(seed_blocks, "--seed-blocks"), save_samples=save_samples, batch=batch,
                   snapshot_every=snapshot_every, snapshot_samples=snapshot_samples)
    start = time.perf_counter()
    paths = run(plan)
    if parallel.is_main():
        out.print(f"{len(paths)} records in {out_dir / s.name / 'records'} ({time.perf_counter() - start:.0f} s)")
    parallel.shutdown()


def _relaunch_with_torchrun(devices: int) -> int:
    """``run --devices K``: this command again under ``torch.distributed.run`` (torchrun) with K
    processes on this machine, ``--devices`` removed; returns torchrun's exit code."""
    import os
    import subprocess

    if devices < 1:
        raise BadInput(f"--devices must be at least 1, got {devices}")
    if os.environ.get("WORLD_SIZE"):
        raise BadInput("--devices is for starting torchrun; this process already runs under torchrun")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "sfdbench", *args]
    return subprocess.run(command).returncode


def _budget(text: str | None) -> list[str] | None:
    """``--budget``: comma-separated specs, each sfd, sfd*FACTOR or a number of FLOPs (checked by the runner)."""
    if text is None:
        return None
    specs = [t.strip() for t in text.split(",")]
    if not all(specs):
        raise BadInput(f"--budget must be comma-separated budgets (sfd, sfd*0.5, 2e12), got {text!r}")
    return specs


@app.command("table")
def table_cmd(suite: str = typer.Option("digits"), fmt: str = typer.Option("markdown", "--format",
                                                                           help="latex | markdown | csv"),
              results: Path | None = typer.Option(None, help="results folder written by `sfdbench run` (default "
                                                  "results; with --ablation, results/ablate as `ablate` writes)"),
              published: bool = typer.Option(True, help="show the paper's published rows beside measured ones"),
              ablation: str | None = typer.Option(None, help="render the table of `sfdbench ablate --knob "
                                                  "KNOB` from the records under --results instead"),
              cost: bool = typer.Option(False, "--cost", help="the cost-to-quality table: FID and every compute "
                                        "column of the fine-tuned rows, and their FLOPs as a multiple of SFD's at "
                                        "equal or better FID"),
              nfe: str | None = typer.Option(None, help="with --ablation: comma-separated NFEs (default: all)"),
              set_: list[str] | None = typer.Option(None, "--set", help="with --ablation: the --set overrides "
                                                    "the ablation ran with"),
              from_: list[Path] | None = typer.Option(None, "--from", help="render `sfdbench export` files "
                                                      "instead of records (repeat to merge machines and papers)"),
              best_of_blocks: bool = typer.Option(False, "--best-of-blocks", help="also show, labelled, the "
                                                  "minimum FID over seed blocks (never shown by default)")):
    """Comparison table: measured rows (FID mean ± std over seeds or seed blocks, metrics,
    fine-tuning time) and the paper's published rows, grouped as in the paper's Tables 2/3; or,
    with --ablation, an SFD ablation table shaped like the paper's Table 1; or, with --from, the
    rows of one or more `sfdbench export` files merged into one table."""
    from sfdbench.report.tables import FORMATS, render
    from sfdbench.suites import get_suite

    if fmt not in FORMATS:
        raise BadInput(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if from_:
        if ablation is not None or cost or results is not None or nfe is not None or set_:
            raise BadInput("--from renders export files alone: drop --results, --ablation, --cost, --nfe and --set")
        from sfdbench.report.export import caption_from_exports, read_export, table_from_exports

        documents = [read_export(p) for p in from_]
        labels = [p.stem for p in from_]
        table = table_from_exports(documents, labels, best_of_blocks)
        if not published:
            table = table[table["source"] != "published"]
        print(render(table, fmt, caption=caption_from_exports(documents, labels)))
        return
    s = get_suite(suite)
    if ablation is not None:
        from sfdbench.harness.ablate import ablation_from_results
        from sfdbench.harness.runner import parse_overrides
        from sfdbench.report.ablation import render_ablation

        ab = ablation_from_results(results or Path("results/ablate"), s.name, ablation, _int_list(nfe, "--nfe") or None,
                                   parse_overrides(set_ or []))
        print(render_ablation(ab, fmt), end="")
        return
    if nfe is not None or set_:
        raise BadInput("--nfe and --set go with --ablation")
    from sfdbench.records import load_records
    from sfdbench.report.assemble import suite_table, table_caption

    results = results or Path("results")
    records = load_records(results, s.name)
    if cost:
        from sfdbench.report.tables import COST_CAPTION, cost_table, render_cost

        table = cost_table(records)
        if table.empty:
            raise BadInput(f"no fine-tuned {s.name} records under {results}; run a distillation method first")
        print(render_cost(table, fmt, caption=f"{s.name}: {COST_CAPTION}"))
        return
    print(render(suite_table(s.name, records, results, published, best_of_blocks), fmt,
                 caption=table_caption(s.name, records)))


@app.command("export")
def export_cmd(suite: str = typer.Option("digits"), fmt: str = typer.Option("json", "--format", help="json"),
               results: Path = typer.Option(Path("results"), help="results folder written by `sfdbench run`"),
               out_path: Path | None = typer.Option(None, "--out", help="the export file (default "
                                                    "RESULTS/SUITE/leaderboard.json)"),
               published: bool = typer.Option(True, help="include the paper's published rows"),
               best_of_blocks: bool = typer.Option(False, "--best-of-blocks", help="also export the labelled "
                                                   "best-of-seed-blocks rows")):
    """Leaderboard export: one self-describing JSON file of every row (measured and published)
    with full provenance; `sfdbench table --from FILE.json` renders it (docs/reporting.md)."""
    from sfdbench.baselines import load_published
    from sfdbench.records import load_records
    from sfdbench.report.assemble import suite_table, table_caption
    from sfdbench.report.export import export, write_export
    from sfdbench.suites import get_suite

    if fmt != "json":
        raise BadInput(f"unknown --format {fmt!r}; export writes json")
    s = get_suite(suite)
    target = out_path or results / s.name / "leaderboard.json"
    if target.exists() and target.is_dir():
        raise BadInput(f"--out {target} is a directory; give a .json file path")
    _check_writable_dir(target.parent)
    records = load_records(results, s.name)
    suite_table(s.name, records, results, published)  # nothing to export: bad input, nothing written
    document = export(s.name, records, load_published(s.name) if published else load_published(""),
                      caption=table_caption(s.name, records), best_of_blocks=best_of_blocks)
    write_export(document, target)
    out.print(f"wrote {target} ({len(document['rows'])} rows)")


@app.command("plot")
def plot_cmd(suite: str = typer.Option("digits"),
             results: Path = typer.Option(Path("results"), help="results folder written by `sfdbench run`"),
             out_dir: Path | None = typer.Option(None, "--out", help="folder for the PNG and PDF "
                                                 "(default RESULTS/SUITE/plots)"),
             published: bool = typer.Option(True, help="draw the paper's published points (hollow)")):
    """FID vs fine-tuning time (log x, device-hours): PNG + PDF."""
    from sfdbench.records import load_curves, load_records
    from sfdbench.report.assemble import suite_table, write_plot
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    target = out_dir or results / s.name / "plots"
    _check_writable_dir(target)
    paths = write_plot(s.name, suite_table(s.name, load_records(results, s.name), results, published), target,
                       load_curves(results, s.name))
    out.print("wrote " + ", ".join(map(str, paths)))


@app.command("report")
def report_cmd(suite: str = typer.Option("digits"),
               results: Path = typer.Option(Path("results"), help="results folder written by `sfdbench run`"),
               out_path: Path | None = typer.Option(None, "--out",
                                                    help="HTML file (default RESULTS/SUITE/report.html)")):
    """One static HTML file (tables, plot, sample grids, run metadata) that opens offline."""
    from sfdbench.records import load_records
    from sfdbench.report.assemble import write_report
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    target = out_path or results / s.name / "report.html"
    if target.suffix != ".html":
        raise BadInput(f"--out {target} must end in .html")
    _check_writable_dir(target.parent)
    write_report(s, load_records(results, s.name), results, target)
    out.print(f"wrote {target}")


@app.command("check")
def check_cmd(suite: str = typer.Option("digits"),
              results: Path = typer.Option(Path("results/check"), help="where the fresh check records go"),
              reference: Path = typer.Option(Path("results/reference"), help="committed reference records"),
              update_reference: bool = typer.Option(False, help="copy the fresh records into --reference"),
              run_grid: bool = typer.Option(True, "--run/--no-run", help="run the suite's check grid first"),
              measure_tolerances: bool = typer.Option(False, "--measure-tolerances", help="treat the fresh records "
                                                      "as a rerun on another machine: write the measured paired "
                                                      "differences and tolerances to REFERENCE/SUITE/tolerances.json")):
    """Regression gate: run the suite's quick grid and compare with the committed references, per
    seed (paired) where a measured tolerance exists (docs/reporting.md#regression-gate).
    Exit 1 when a metric is worse than its tolerance; improvements are reported, not failed."""
    import shutil

    from rich.table import Table

    from sfdbench.harness.runner import RunPlan, run
    from sfdbench.records import load_records, records_dir
    from sfdbench.report.check import compare, failed
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    if not s.check_grid:
        raise BadInput(f"suite {s.name!r} has no check grid")
    if run_grid:
        run(RunPlan(suite=s.name, grid=[(e.method, n, e.guidance) for e in s.check_grid for n in e.nfes],
                    seeds=list(s.check_seeds), samples=s.check_samples, out=results, command=_command_line()))
    fresh = load_records(results, s.name)
    if update_reference:
        target = records_dir(reference, s.name)
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*.json"):
            old.unlink()
        for path in fresh["path"]:
            shutil.copy2(path, target / Path(path).name)
        out.print(f"reference updated: {len(fresh)} records in {target}")
        return
    ref = load_records(reference, s.name)
    if ref.empty:
        raise BadInput(f"no reference records in {records_dir(reference, s.name)}; create them with --update-reference")
    if measure_tolerances:
        from sfdbench.report.check import machine_of, tolerances_path
        from sfdbench.report.check import measure_tolerances as measure
        from sfdbench.report.export import write_export as write_json

        if fresh.empty:
            raise BadInput(f"no fresh {s.name} records under {results} to measure tolerances from")
        document = measure(fresh, ref, s.name, machine_of(fresh), machine_of(ref))
        write_json(document, tolerances_path(reference, s.name))
        out.print(f"wrote {tolerances_path(reference, s.name)} ({len(document['rows'])} rows, "
                  f"{len(document['skipped'])} skipped)")
        return
    from sfdbench.report.check import load_tolerances

    comparison = compare(fresh, ref, load_tolerances(reference, s.name))
    table = Table("method", "NFE", "guidance", "metric", "reference", "fresh", "delta", "max |d_s|", "tolerance",
                  "rule", "status", title=f"sfdbench check: {s.name}")
    colors = {"ok": "green", "improvement": "cyan"}
    for _, r in comparison.iterrows():
        color = colors.get(r["status"], "red")
        table.add_row(r["method"], str(r["nfe"]), f"{r['guidance']:g}", r["metric"], f"{r['reference']:.3f}",
                      f"{r['fresh']:.3f}", f"{r['delta']:+.3f}", f"{r['max_abs_paired']:.3f}",
                      f"{r['tolerance']:.3f}", r["rule"], f"[{color}]{r['status']}[/{color}]")
    Console(width=max(out.width, 150)).print(table)  # CI logs are not terminals: never truncate the cells
    if failed(comparison):
        out.print("[red]regression: a metric moved beyond its tolerance (or a configuration changed; "
                  "regenerate references with --update-reference if that was intended)[/red]")
        raise typer.Exit(1)
    out.print("[green]no regression[/green]")


@app.command("suites")
def suites_cmd():
    """List the suites."""
    from rich.table import Table

    from sfdbench.suites import get_suite, suite_names

    table = Table("suite", "latent", "default grid", "other grids (--grid)", "description")

    def show(grid) -> str:
        return "; ".join(f"{e.method} {','.join(map(str, e.nfes))}" + (f" (w={e.guidance:g})" if e.guidance else "")
                         for e in grid)

    for name in suite_names():
        s = get_suite(name)
        others = ["full"] if s.full_grid else []
        others += [f"{key}: {show(grid)}" for key, grid in s.extra_grids.items()]
        table.add_row(name, "x".join(map(str, s.latent_shape)), show(s.default_grid), "\n".join(others),
                      s.description)
    out.print(table)


@app.command("methods")
def methods_cmd():
    """List the methods and the NFEs each supports."""
    from rich.table import Table

    from sfdbench.methods import all_methods

    table = Table("method", "name", "group", "NFE", "description")
    for m in all_methods():
        table.add_row(m.name, m.display, m.group, m.nfe_rule(), m.description)
    out.print(table)


assets_app = typer.Typer(invoke_without_command=True, help="The real suites' downloadable assets: list (default), "
                         "download, verify. The cache is $SFDBENCH_CACHE (default ~/.cache/sfdbench).")
app.add_typer(assets_app, name="assets")


@assets_app.callback()
def assets_main(ctx: typer.Context):
    """List the real suites' downloadable assets (`sfdbench assets` = `sfdbench assets list`), download
    them (resumable, verified by sha256) or verify the files present."""
    if ctx.invoked_subcommand is None:
        assets_list()


@assets_app.command("list")
def assets_list():
    """Table of every asset: key, kind, suites, present, size, sha256 pin; then paths and URLs."""
    from rich import box
    from rich.filesize import decimal
    from rich.table import Column, Table

    from sfdbench.io import cache_dir
    from sfdbench.suites.assets import ASSETS, locate, read_record

    table = Table(Column("key", no_wrap=True), Column("kind", no_wrap=True), Column("suites", min_width=10), "present",
                  "size", "sha256", title=f"cache: {cache_dir()} (set SFDBENCH_CACHE to move it)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    where = []
    for key, asset in ASSETS.items():
        path = locate(asset)
        if asset.sha256:
            check = "pinned"
        elif asset.sha256_prefix:
            check = f"prefix {asset.sha256_prefix}"
        elif path == asset.path and asset.sidecar_path.is_file():
            try:
                check = "first download" if read_record(asset) else ""
            except BadInput:
                check = "[red]record unreadable[/red]"
        elif path is not None:
            check = "[yellow]unverified[/yellow]"
        else:
            check = "none yet"
        size = path.stat().st_size if path is not None else asset.size
        table.add_row(key, asset.kind, " ".join(asset.suites), "[green]yes[/green]" if path else "[red]no[/red]",
                      decimal(size) if size is not None else "?", check)
        where.append(f"  {key}: {path}" if path else f"  {key}: {asset.url} -> {asset.path}")
    out.print(table)
    out.print("\n".join(["files:", *where]), highlight=False, soft_wrap=True)
    out.print("download: `sfdbench assets download --suite SUITE` or `sfdbench assets download KEY...`; "
              "check: `sfdbench assets verify`", highlight=False, soft_wrap=True)


def _selected_assets(names: list[str] | None, suite: str | None) -> list | None:
    """The assets named (BadInput listing the known keys for an unknown one), a suite's assets, or None (all)."""
    from sfdbench.suites.assets import ASSETS, assets_for_suite

    if names and suite is not None:
        raise BadInput("give asset names or --suite, not both")
    if suite is not None:
        from sfdbench.suites import get_suite

        return assets_for_suite(get_suite(suite).name)
    if not names:
        return None
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise BadInput(f"unknown asset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                       f"known assets: {', '.join(ASSETS)}")
    return [ASSETS[n] for n in dict.fromkeys(names)]


@assets_app.command("download")
def assets_download(names: list[str] | None = typer.Argument(None, help="asset keys (see `sfdbench assets`)"),
                    suite: str | None = typer.Option(None, help="every asset this suite uses"),
                    all_: bool = typer.Option(False, "--all", help="every asset"),
                    timeout: float = typer.Option(60.0, help="seconds without data before giving up")):
    """Download assets into the cache (resumable, sha256-checked); exit 3 when one cannot be fetched.

    A partial download (FILE.part) is resumed with an HTTP Range request; the complete file is checked
    against its pinned sha256 or the one recorded at its first download, then renamed into place."""
    import time

    from rich.filesize import decimal
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from sfdbench.errors import MissingAsset
    from sfdbench.suites.assets import ASSETS, download, locate

    selected = _selected_assets(names, suite)
    if selected is None:
        if not all_:
            raise BadInput(f"name the assets to download ({', '.join(ASSETS)}), or give --suite SUITE or --all")
        selected = list(ASSETS.values())
    if not selected:
        out.print(f"suite {suite!r} downloads nothing")
        return
    err = Console(stderr=True)
    failures = []
    for asset in selected:
        present = locate(asset)
        if present is not None:
            out.print(f"{asset.key}: present ({present})", highlight=False, soft_wrap=True)
            continue
        start = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task(asset.key, total=asset.size)

            def progress(done: int, total: int | None, bar=bar, task=task) -> None:
                bar.update(task, completed=done, total=total)

            try:
                path = download(asset, progress=progress, timeout=timeout)
            except MissingAsset as exc:
                failures.append((asset, exc))
                continue
        out.print(f"{asset.key}: {decimal(path.stat().st_size)} in {time.perf_counter() - start:.0f} s -> {path}",
                  highlight=False, soft_wrap=True)
    if len(failures) == 1 and len(selected) == 1:
        raise failures[0][1]
    if failures:
        for _asset, exc in failures:
            print(f"sfdbench: error: {exc}", file=sys.stderr)
        keys = " ".join(a.key for a, _ in failures)
        raise MissingAsset(f"{len(failures)} of {len(selected)} downloads failed ({keys}); rerun "
                           f"`sfdbench assets download {keys}` to resume")


@assets_app.command("verify")
def assets_verify(names: list[str] | None = typer.Argument(None, help="asset keys; default: every asset present"),
                  suite: str | None = typer.Option(None, help="every asset this suite uses")):
    """Recompute the sha256 of present assets; exit 3 on a mismatch or a missing requested asset.

    Each file is compared with its pinned sha256 (or prefix) or with the sha256 recorded at its first
    download (FILE.sha256); an unpinned file placed by hand is reported as unverified."""
    import contextlib

    from rich.table import Column, Table

    from sfdbench.errors import MissingAsset
    from sfdbench.suites.assets import ASSETS, locate, verify

    selected = _selected_assets(names, suite)
    requested = selected is not None
    table = Table(Column("key", no_wrap=True), "status", Column("sha256", overflow="fold"),
                  Column("path", overflow="fold"))
    problems, missing = [], []
    err = Console(stderr=True)
    for asset in selected if requested else ASSETS.values():
        path = locate(asset)
        if path is None:
            if requested:
                missing.append(asset.key)
            table.add_row(asset.key, "[red]missing[/red]" if requested else "missing", "", str(asset.path))
            continue
        with err.status(f"sha256 of {path}") if err.is_terminal else contextlib.nullcontext():
            result = verify(asset)
        if result["ok"] is None:
            status = "[yellow]unverified local file[/yellow] (no pin, no first-download record)"
        elif result["ok"]:
            status = f"[green]ok[/green] ({result['source']})"
        else:
            status = f"[red]MISMATCH[/red]: expected {result['expected']} ({result['source']})"
            problems.append(f"{asset.key}: {path} has sha256 {result['sha256']}, expected {result['expected']} "
                            f"({result['source']})")
        table.add_row(asset.key, status, result["sha256"], str(path))
    out.print(table)
    if problems:
        keys = " ".join(p.split(":", 1)[0] for p in problems)
        raise MissingAsset("; ".join(problems) + f"; delete the file(s) and run `sfdbench assets download {keys}`")
    if missing:
        raise MissingAsset(f"missing: {', '.join(missing)}; run `sfdbench assets download {' '.join(missing)}`")


@app.command("fid-ci")
def fid_ci_cmd(samples_path: Path = typer.Option(..., "--samples", help="an .npz of uint8 images: `images` [N, C, H, "
                                                 "W] as `sfdbench sample --out x.npz` writes, or `arr_0` [N, H, W, C] "
                                                 "as the ADM/EDM sampling scripts write"),
               suite: str = typer.Option("digits", help="whose feature space and reference set"),
               n_boot: int = typer.Option(200, help="bootstrap replicates"),
               level: float = typer.Option(0.95, help="confidence level"),
               method: str = typer.Option("shifted", help="shifted | percentile | basic (see "
                                          "sfdbench.metrics.bootstrap)"),
               seed: int = typer.Option(0, help="seed of the resampling")):
    """FID of one sample set with a bootstrap confidence interval (resampling the generated
    features against the fixed reference statistics)."""
    from sfdbench.metrics.bootstrap import bootstrap_fid
    from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    features, reference = s.fid_features_and_reference(_load_npz_images(samples_path, s.image_channels))
    low, high, std = bootstrap_fid(features, reference, n_boot=n_boot, seed=seed, level=level, method=method)
    point = fid_from_statistics(fid_statistics(features), reference.fid_stats())
    out.print(f"FID {point:.3f}, {level:.0%} CI [{low:.3f}, {high:.3f}] ({method} bootstrap, {n_boot} replicates "
              f"of {len(features)} samples, seed {seed}; bootstrap std {std:.3f}; {s.name} features)",
              highlight=False, soft_wrap=True)


def _load_npz_images(path: Path, channels: int):
    """uint8 images [N, C, H, W] from an npz without executing anything (no pickles)."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BadInput(f"{path} is a single .npy array, not an npz; save it with np.savez(path, images=...)")
        with data:
            if "images" in data:
                images = data["images"]
            elif "arr_0" in data:
                images = data["arr_0"]
                if images.ndim == 4 and images.shape[-1] == channels and images.shape[1] != channels:
                    images = images.transpose(0, 3, 1, 2)  # NHWC (ADM/EDM convention) -> NCHW
            else:
                raise BadInput(f"{path} holds {', '.join(data.files) or 'nothing'}; expected `images` [N, C, H, W] "
                               "or `arr_0` [N, H, W, C]")
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"cannot read {path} as an npz of images ({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(images)


@app.command("sample")
def sample_cmd(model: Path | None = typer.Option(None, help="a distilled model.safetensors written by `sfdbench run`"),
               method: str | None = typer.Option(None, help="instead of --model: a training-free solver method "
                                                 "(e.g. dpmpp3m) sampling the teacher at --nfe"),
               suite: str = typer.Option("digits"), samples: int = typer.Option(64), seed: int = typer.Option(0),
               out_path: Path = typer.Option(Path("samples.png"), "--out", help=".png grid or .npz of uint8"),
               nfe: int | None = typer.Option(None, help="NFE for a model trained on several (SFD-v: 2-5); "
                                                          "default: the model's own"),
               guidance: float = typer.Option(1.0, help="classifier-free guidance scale (conditional suites)"),
               teacher: Path | None = typer.Option(None, help="the teacher the model was distilled from, when "
                                                   "not the suite's own"),
               device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda")):
    """Sample a distilled model at its NFE (or, for SFD-v, at --nfe); write a PNG grid or an npz of
    uint8 images."""
    import io

    import numpy as np

    from sfdbench.harness.runner import check_guidance
    from sfdbench.harness.sampling import generate
    from sfdbench.io import atomic_write_bytes
    from sfdbench.methods import load_model
    from sfdbench.suites import get_suite

    if out_path.suffix not in (".png", ".npz"):
        raise BadInput(f"--out {out_path} must end in .png or .npz")
    if samples < 1:
        raise BadInput("--samples must be at least 1")
    _check_writable_dir(out_path.parent)
    s = get_suite(suite)
    check_guidance(s, guidance)
    if (model is None) == (method is None):
        raise BadInput("give exactly one of --model (a distilled model file) or --method (a solver)")
    teacher_net = s.load_teacher(teacher, device=device)
    if model is not None:
        fitted = load_model(model, s, teacher_net, device, nfe=nfe)
    else:
        fitted = _solver_fitted(method, nfe, s, teacher_net, device)
    u8, _, stats = generate(fitted, s, seed, samples, device=device, guidance=guidance)
    buf = io.BytesIO()
    if out_path.suffix == ".npz":
        np.savez(buf, images=u8.numpy())
    else:
        import torchvision

        torchvision.utils.save_image(u8.float() / 255.0, buf, format="png", nrow=int(samples**0.5 + 0.999),
                                     padding=1)
    atomic_write_bytes(out_path, buf.getvalue())
    out.print(f"wrote {samples} samples at NFE {stats['sampler_nfe']:g} ({stats['nfe_counted']:g} network "
              f"evaluations per sample) to {out_path}")


def _solver_fitted(method: str, nfe: int | None, suite, teacher, device):
    """A solver-group method's sampler of ``teacher`` (``sfdbench sample --method``). Methods that fit
    something first (a GITS search, an AMED predictor) fit in a temporary folder that is discarded."""
    import tempfile

    import torch

    from sfdbench.methods import FitContext, get_method

    m = get_method(method)
    if m.group != "solver":
        raise BadInput(f"--method {method!r} fine-tunes the network; run it with `sfdbench run` and sample its model "
                       "file with --model")
    if nfe is None:
        raise BadInput("--method needs --nfe")
    m.check_nfe(nfe, suite)
    workdir = Path(tempfile.mkdtemp(prefix="sfdbench-sample-"))
    try:
        return m.fit(FitContext(suite=suite, teacher=teacher, nfe=nfe, workdir=workdir, device=torch.device(device),
                                progress=None))
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


@app.command("gits-schedule")
def gits_schedule_cmd(suite: str = typer.Option("digits", help="suite name (see `sfdbench suites`)"),
                      nfe: int = typer.Option(..., help="the NFE to search a schedule for"),
                      teacher: Path | None = typer.Option(None, help="teacher weights instead of the suite's"),
                      device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
                      set_: list[str] | None = typer.Option(None, "--set", help="gits.KEY=VALUE (or "
                                                            "gits-ddim.KEY=VALUE) hyperparameter override "
                                                            "(repeatable)")):
    """Search and print GITS's time schedule (Chen et al., ICML 2024) for one NFE: the sigmas, their
    indices on the fine grid and the search cost. Writes nothing."""
    import torch

    from sfdbench.harness.progress import progress_bar
    from sfdbench.harness.runner import parse_overrides
    from sfdbench.methods import get_method
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    overrides = parse_overrides(set_ or [])
    other = sorted(set(overrides) - {"gits", "gits-ddim"})
    if other:
        raise BadInput(f"gits-schedule takes --set gits.KEY=VALUE only, got a setting of {other[0]}")
    name = "gits-ddim" if "gits-ddim" in overrides else "gits"
    s.method_options = {**s.method_options, name: {**s.method_options.get(name, {}), **overrides.get(name, {})}}
    method = get_method(name)
    method.check_nfe(nfe, s)
    hp = method.hyperparameters(s, nfe)
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, ValueError) as exc:
        raise BadInput(f"--device {device!r} is not usable here ({exc})") from None
    result = method.search(s, s.load_teacher(teacher, dev), nfe, dev, progress=progress_bar, hp=hp)
    acc = result.accounting
    out.print(f"GITS schedule for {s.name} at NFE {nfe} ({method.display_name(hp)}; grid {hp['grid_steps']} "
              f"{hp['schedule']} levels, {hp['metric']} cost, coeff {hp['coeff']:g})", highlight=False)
    out.print("sigmas:  " + ", ".join(f"{v:.4f}" for v in result.sigmas), highlight=False)
    out.print("indices: " + ", ".join(str(i) for i in result.indices), highlight=False)
    out.print(f"search: {acc.wall_seconds:.2f} s on {acc.device} ({acc.device_hours:.2e} device-hours), "
              f"{result.trajectories} teacher trajectories, {result.teacher_evaluations} teacher evaluations, "
              f"{acc.flops:.3e} FLOPs", highlight=False, soft_wrap=True)


@app.command("ablate")
def ablate_cmd(suite: str = typer.Option("digits", help="suite name (see `sfdbench suites`)"),
               knob: str = typer.Option(..., help="teacher | K | sigma_min | afs | loss | rho, several "
                                        "comma-separated, or all"),
               nfe: str = typer.Option("2", help="comma-separated NFEs"),
               seeds: str | None = typer.Option(None, help="comma-separated run seeds; default: the suite's"),
               samples: int | None = typer.Option(None, help="samples per (variant, NFE, seed)"),
               out_dir: Path = typer.Option(Path("results/ablate"), "--out",
                                            help="results folder (records as `run`; kept apart from the main "
                                                 "results by default so the main table is not crowded with "
                                                 "ablation variants)"),
               fmt: str = typer.Option("markdown", "--format", help="markdown | latex | csv"),
               device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
               force: bool = typer.Option(False, help="rerun records that already exist"),
               set_: list[str] | None = typer.Option(None, "--set", help="METHOD.KEY=VALUE override for every "
                                                         "variant (repeatable), e.g. --set sfd.iterations=50")):
    """SFD ablation of one knob or several (the paper's Table 1): one `sfd` run per value, then
    per knob a table of FID mean ± std and fine-tuning device-hours per NFE."""
    from sfdbench.harness.ablate import knob_names, run_ablations
    from sfdbench.harness.runner import parse_overrides
    from sfdbench.report.ablation import FORMATS, render_ablation
    from sfdbench.suites import get_suite

    if fmt not in FORMATS:
        raise BadInput(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    s = get_suite(suite)
    names = knob_names(knob)
    _check_writable_dir(out_dir)
    seed_list = _int_list(seeds, "--seeds") or list(s.default_seeds)
    results = run_ablations(s.name, names, _int_list(nfe, "--nfe"), seed_list,
                            samples if samples is not None else s.default_samples, out_dir,
                            parse_overrides(set_ or []), device=device, force=force)
    if fmt == "csv":  # one CSV: the knob column tells the tables apart
        import pandas as pd

        text = pd.concat([r.rows for r in results], ignore_index=True).to_csv(index=False)
    else:
        text = "\n".join(render_ablation(result, fmt) for result in results)
    out.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True, end="")


reference_app = typer.Typer(no_args_is_help=True, help="Build a suite's reference statistics from its images.")
app.add_typer(reference_app, name="reference")


@reference_app.command("build")
def reference_build(suite: str = typer.Option(..., help="a latent suite: lsun_bedroom or ms_coco"),
                    images: Path = typer.Option(..., help="folder of the reference images (.png/.jpg, recursive)"),
                    batch: int = typer.Option(64, help="images per feature batch"),
                    device: str = typer.Option("cpu")):
    """FID (and, with the DINOv2 weights present, FD-DINOv2) reference statistics of a folder of images,
    streamed in batches, cached in the suite's reference path with a provenance record (docs/suites.md)."""
    from sfdbench.suites import get_suite
    from sfdbench.suites.latent import LatentSuite, build_reference

    s = get_suite(suite)
    if not isinstance(s, LatentSuite):
        raise BadInput(f"suite {suite!r} has its own reference statistics; `reference build` is for lsun_bedroom "
                       "and ms_coco")
    if batch < 1:
        raise BadInput(f"--batch must be >= 1, got {batch}")
    for path in build_reference(s, images, batch=batch, device=device, command=_command_line()):
        out.print(f"reference statistics: {path}")


def _writable_file(path: Path) -> Path:
    path = Path(path)
    if path.exists() and path.is_dir():
        raise BadInput(f"--out {path} is a directory; give a .safetensors file path")
    if path.suffix != ".safetensors":
        raise BadInput(f"--out {path} must end in .safetensors")
    _check_writable_dir(path.parent)
    return path


def _check_writable_dir(path: Path) -> None:
    """Fail early (exit 2) when ``path`` (or its nearest existing parent) cannot be written."""
    from sfdbench.harness.runner import check_writable

    check_writable(path)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code in non-standalone mode
    except SfdbenchError as exc:
        print(f"sfdbench: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        print("sfdbench: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            print(f"sfdbench: error: {exc.format_message()}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
