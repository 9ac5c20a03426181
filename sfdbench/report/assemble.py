"""What `sfdbench table`, `plot` and `report` put together from a results folder: the suite's
table (measured + published rows), its caption, the FID-vs-fine-tuning plot files and the HTML
report. The CLI only parses and prints; the assembling lives here."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pandas as pd

from sfdbench.baselines import load_published
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.records import load_curves, read_record
from sfdbench.report.tables import combine, protocol_caption, published_rows, summarize, variant_displays


def suite_table(suite: str, records: pd.DataFrame, results: Path, published: bool = True,
                best_of_blocks: bool = False) -> pd.DataFrame:
    """Measured rows (from ``records``, loaded from ``results``) + published rows of ``suite``; bad
    input when there is nothing to show. ``best_of_blocks``: also the labelled minimum over seed
    blocks (``tables.summarize``)."""
    measured = summarize(records, best_of_blocks=best_of_blocks)
    paper = published_rows(load_published(suite) if published else pd.DataFrame())
    if measured.empty and paper.empty:
        raise BadInput(f"no {suite} records under {results} and no published rows; run `sfdbench run --suite {suite}`")
    return combine(measured, paper)


def table_caption(suite: str, records: pd.DataFrame) -> str:
    caption = (f"{suite}: FID (mean ± std over run seeds or seed blocks where measured) and fine-tuning cost in "
               "device-hours; published rows are the SFD paper's (A100 hours). ")
    if not records.empty:
        if "seed_block" in records and records["seed_block"].notna().any():
            caption += ("Rows over seed blocks: block B samples noise seeds B·n … B·n+n−1 (EDM's --seeds "
                        "convention); FID is the mean ± std over blocks, a \"best of k seed blocks\" row is the "
                        "minimum, shown only on request. ")
        caption += protocol_caption(list(records["metric_protocol"]))
        if "guidance" in records and (records["guidance"] != 1.0).any():
            caption += (" Guided rows (CFG w) cost 2 network evaluations per sampler step: their NFE column counts "
                        "sampler steps, their network calls are twice that.")
    return caption.strip()


def write_plot(suite: str, table: pd.DataFrame, target: Path, curves: pd.DataFrame | None = None) -> list[Path]:
    """The FID-vs-fine-tuning-time plot as PNG and PDF in ``target`` (``curves``: intermediate
    checkpoints) and, when measured rows report fine-tuning FLOPs, the FID-vs-FLOPs plot beside it
    (``fid_vs_compute``). The time plot's PNG comes first."""
    from sfdbench.report.plots import compute_rows, fid_vs_compute, fid_vs_finetuning

    figures = [("fid_vs_finetuning", fid_vs_finetuning(table, f"{suite}: FID vs fine-tuning time", curves))]
    if not compute_rows(table).empty:
        figures.append(("fid_vs_compute", fid_vs_compute(table, f"{suite}: FID vs fine-tuning compute", curves)))
    return [path for name, fig in figures for path in _save_figure(fig, Path(target), name)]


def _save_figure(fig, target: Path, name: str) -> list[Path]:
    """``fig`` as ``name``.png and ``name``.pdf in ``target``, each written atomically; closes it."""
    import matplotlib.pyplot as plt

    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight")
        path = target / f"{name}.{ext}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def write_report(suite, records: pd.DataFrame, results: Path, target: Path) -> Path:
    """One static HTML file (tables, plot, sample grids, run metadata) that opens offline."""
    from sfdbench.report.html import report_html

    table = suite_table(suite.name, records, results)
    plots = results / suite.name / "plots" if (results / suite.name).is_dir() else Path(tempfile.mkdtemp())
    pngs = {p.stem: p for p in write_plot(suite.name, table, plots, load_curves(results, suite.name))
            if p.suffix == ".png"}
    grids, metadata = [], {"suite": suite.name, "description": suite.description}
    if not records.empty:
        records = records.copy()
        records["display"] = variant_displays(records)
        for (display, nfe), part in records.groupby(["display", "nfe"], sort=False):
            # the grid lies next to the records, whatever the folder was called when they were written
            named = part["sample_grid"].dropna()
            path = results / suite.name / "grids" / Path(named.iloc[0]).name if not named.empty else None
            if path is not None and path.is_file():
                grids.append((f"{display}, NFE {nfe}", path))
        first = read_record(Path(records["path"].iloc[-1])) or {}
        metadata.update({"records": len(records), "seeds": sorted(set(records["seed"])),
                         "samples per record": sorted(set(records["n_samples"].dropna().astype(int))),
                         "metric protocol": first.get("metric_protocol"), "versions": first.get("versions"),
                         "git revision": first.get("git_revision"), "last run ended": first.get("ended_at"),
                         "fine-tuning devices": sorted(set(records["device"].dropna()))})
    atomic_write_bytes(target, report_html(suite.name, table, pngs["fid_vs_finetuning"], grids, metadata,
                                                  pngs.get("fid_vs_compute")).encode())
    return target
