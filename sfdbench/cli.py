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
teacher_app = typer.Typer(no_args_is_help=True, help="Train the embedded suite's teacher.")
features_app = typer.Typer(no_args_is_help=True, help="Train the embedded suite's feature network.")
app.add_typer(teacher_app, name="teacher")
app.add_typer(features_app, name="features")
out = Console()


def _command_line() -> str:
    return "sfdbench " + shlex.join(sys.argv[1:])


def _require_digits(suite: str) -> None:
    from sfdbench.suites import get_suite

    if get_suite(suite).name != "digits":
        raise BadInput(f"suite {suite!r} ships no trainable teacher; only 'digits' does")


@teacher_app.command("train")
def teacher_train(suite: str = typer.Option("digits"), out_path: Path | None = typer.Option(None, "--out"),
                  iterations: int = typer.Option(4500), batch: int = typer.Option(128), seed: int = typer.Option(0)):
    """Train the digits EDM teacher (EDM loss, EMA) and write safetensors + JSON."""
    _require_digits(suite)
    from sfdbench.harness.training import train_digits_teacher
    from sfdbench.networks.checkpoint import save_weights
    from sfdbench.suites.digits import TEACHER_WEIGHTS

    target = _writable_file(out_path or TEACHER_WEIGHTS)
    net, meta = train_digits_teacher(iterations=iterations, batch=batch, seed=seed)
    meta["command"] = _command_line()
    save_weights(net, target, meta)
    out.print(f"wrote {target} (loss {meta['final_loss_ema']:.4f}, {meta['wall_seconds']:.0f} s)")


@features_app.command("train")
def features_train(suite: str = typer.Option("digits"), out_path: Path | None = typer.Option(None, "--out"),
                   epochs: int = typer.Option(60), seed: int = typer.Option(0)):
    """Train the digits feature CNN and write safetensors + JSON (reports held-out accuracy)."""
    _require_digits(suite)
    from sfdbench.harness.training import train_digits_classifier
    from sfdbench.networks.checkpoint import save_weights
    from sfdbench.suites.digits import FEATURE_WEIGHTS

    target = _writable_file(out_path or FEATURE_WEIGHTS)
    net, meta = train_digits_classifier(epochs=epochs, seed=seed)
    meta["command"] = _command_line()
    save_weights(net, target, meta)
    out.print(f"wrote {target} (held-out accuracy {meta['test_accuracy']:.4f})")


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise BadInput(f"{what} is empty")
    return values


def _name_list(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


@app.command("run")
def run_cmd(suite: str = typer.Option("digits", help="suite name (see `sfdbench suites`)"),
            methods: str | None = typer.Option(None, help="comma-separated methods; default: the suite's grid"),
            nfe: str | None = typer.Option(None, help="comma-separated NFEs for every method"),
            seeds: str | None = typer.Option(None, help="comma-separated run seeds; default: the suite's"),
            samples: int | None = typer.Option(None, help="samples per (method, NFE, seed)"),
            out_dir: Path = typer.Option(Path("results"), "--out", help="results folder"),
            teacher: Path | None = typer.Option(None, help="teacher weights instead of the suite's"),
            device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
            force: bool = typer.Option(False, help="rerun records that already exist"),
            set_: list[str] | None = typer.Option(None, "--set", help="METHOD.KEY=VALUE hyperparameter override "
                                                      "(repeatable), e.g. --set sfd.iterations=200")):
    """Fit -> sample -> evaluate a grid of (method, NFE, seed); one JSON record each."""
    import time

    from sfdbench.harness.runner import RunPlan, default_grid, parse_overrides, run
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    plan = RunPlan(suite=s.name, grid=default_grid(s.name, _name_list(methods), _int_list(nfe, "--nfe")),
                   seeds=_int_list(seeds, "--seeds") or list(s.default_seeds),
                   samples=samples if samples is not None else s.default_samples, out=out_dir, force=force,
                   teacher=teacher, device=device, method_overrides=parse_overrides(set_ or []))
    start = time.perf_counter()
    paths = run(plan)
    out.print(f"{len(paths)} records in {out_dir / s.name / 'records'} ({time.perf_counter() - start:.0f} s)")


@app.command("table")
def table_cmd(suite: str = typer.Option("digits"), fmt: str = typer.Option("markdown", "--format",
                                                                           help="latex | markdown | csv"),
              results: Path = typer.Option(Path("results"), help="results folder written by `sfdbench run`"),
              published: bool = typer.Option(True, help="show the paper's published rows beside measured ones")):
    """Comparison table: measured rows (FID mean ± std over seeds, metrics, fine-tuning time)
    and the paper's published rows, grouped as in the paper's Tables 2/3."""
    from sfdbench.report.tables import FORMATS, render
    from sfdbench.suites import get_suite

    if fmt not in FORMATS:
        raise BadInput(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    s = get_suite(suite)
    table = _suite_table(s.name, results, published)
    caption = (f"{s.name}: FID (mean ± std over seeds where measured) and fine-tuning cost in device-hours; "
               "published rows are the SFD paper's (A100 hours).")
    print(render(table, fmt, caption=caption))


def _suite_table(suite: str, results: Path, published: bool = True):
    """Measured + published rows of ``suite``; bad input when there is nothing to show."""
    from sfdbench.baselines import load_published
    from sfdbench.records import load_records
    from sfdbench.report.tables import combine, published_rows, summarize

    measured = summarize(load_records(results, suite))
    paper = published_rows(load_published(suite)) if published else summarize(load_records(Path("/nonexistent"),
                                                                                           suite))
    if measured.empty and paper.empty:
        raise BadInput(f"no {suite} records under {results} and no published rows; run `sfdbench run --suite {suite}`")
    return combine(measured, paper)


@app.command("plot")
def plot_cmd(suite: str = typer.Option("digits"),
             results: Path = typer.Option(Path("results"), help="results folder written by `sfdbench run`"),
             out_dir: Path | None = typer.Option(None, "--out", help="folder for the PNG and PDF "
                                                   "(default RESULTS/SUITE/plots)"),
             published: bool = typer.Option(True, help="draw the paper's published points (hollow)")):
    """FID vs fine-tuning time (log x, device-hours): PNG + PDF."""
    import io

    import matplotlib.pyplot as plt

    from sfdbench.networks.checkpoint import atomic_write_bytes
    from sfdbench.report.plots import fid_vs_finetuning
    from sfdbench.suites import get_suite

    s = get_suite(suite)
    target = out_dir or results / s.name / "plots"
    _check_writable_dir(target)
    table = _suite_table(s.name, results, published)
    fig = fid_vs_finetuning(table, f"{s.name}: FID vs fine-tuning time")
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight")
        path = target / f"fid_vs_finetuning.{ext}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    out.print("wrote " + ", ".join(map(str, paths)))


@app.command("suites")
def suites_cmd():
    """List the suites."""
    from rich.table import Table

    from sfdbench.suites import get_suite, suite_names

    table = Table("suite", "image", "default grid", "description")
    for name in suite_names():
        s = get_suite(name)
        grid = "; ".join(f"{e.method} {','.join(map(str, e.nfes))}" for e in s.default_grid)
        table.add_row(name, "x".join(map(str, s.image_shape)), grid, s.description)
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


@app.command("sample")
def sample_cmd(model: Path = typer.Option(..., help="a distilled model.safetensors written by `sfdbench run`"),
               suite: str = typer.Option("digits"), samples: int = typer.Option(64), seed: int = typer.Option(0),
               out_path: Path = typer.Option(Path("samples.png"), "--out", help=".png grid or .npz of uint8")):
    """Sample a distilled model at its NFE; write a PNG grid or an npz of uint8 images."""
    import io

    import numpy as np

    from sfdbench.harness.sampling import generate
    from sfdbench.methods.sfd import load_fitted
    from sfdbench.metrics.images import to_uint8
    from sfdbench.networks.checkpoint import atomic_write_bytes
    from sfdbench.suites import get_suite

    if out_path.suffix not in (".png", ".npz"):
        raise BadInput(f"--out {out_path} must end in .png or .npz")
    if samples < 1:
        raise BadInput("--samples must be at least 1")
    _check_writable_dir(out_path.parent)
    s = get_suite(suite)
    fitted = load_fitted(model, s.load_teacher(), "cpu")
    images, stats = generate(fitted, seed, samples, s.image_shape)
    u8 = to_uint8(images)
    buf = io.BytesIO()
    if out_path.suffix == ".npz":
        np.savez(buf, images=u8.numpy())
    else:
        import torchvision

        torchvision.utils.save_image(u8.float() / 255.0, buf, format="png", nrow=int(samples**0.5 + 0.999),
                                     padding=1)
    atomic_write_bytes(out_path, buf.getvalue())
    out.print(f"wrote {samples} samples at NFE {stats['nfe_counted']:g} to {out_path}")


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
    import os

    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to {path}: {probe} is not a writable directory; choose another --out")


def main() -> None:
    try:
        app(standalone_mode=False)
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


if __name__ == "__main__":
    main()
