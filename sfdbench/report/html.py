"""One static, offline HTML report: tables, the plot, sample grids and run metadata inline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from sfdbench.report.tables import GROUPS, display_view

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem} h1{font-size:1.6rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0} th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;
text-align:right} th:first-child,td:first-child{text-align:left} tr.published td{color:#777;font-style:italic}
.grids{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;text-align:center;font-size:.8rem}
img.grid{image-rendering:pixelated;width:200px} img.plot{max-width:100%} code{font-size:.85rem}
"""


def _img(path: Path, cls: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(table: pd.DataFrame) -> str:
    view, groups = display_view(table, "±")
    parts = []
    for group in GROUPS:
        mask = [g == group for g in groups]
        part = view[mask]
        if part.empty:
            continue
        head = "".join(f"<th>{html.escape(c)}</th>" for c in part.columns)
        body = "".join(
            f'<tr class="{html.escape(r["Source"])}">' + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
            for _, r in part.iterrows())
        parts.append(f'<h3>{GROUPS[group]}</h3><table data-group="{group}"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table>")
    return "".join(parts)


def report_html(suite: str, table: pd.DataFrame, plot_png: Path | None, grids: list[tuple[str, Path]],
                metadata: dict, compute_png: Path | None = None) -> str:
    """The whole page as a string (images embedded as data URIs, no external resources);
    ``compute_png``: the FID-vs-fine-tuning-FLOPs plot, when there is one."""
    grid_html = "".join(f"<figure>{_img(p, 'grid', label)}<figcaption>{html.escape(label)}</figcaption></figure>"
                        for label, p in grids)
    meta_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                        for k, v in metadata.items())
    plot = _img(plot_png, "plot", "FID vs fine-tuning time") if plot_png else "<p>No plot.</p>"
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>sfdbench report: {html.escape(suite)}"
            f"</title><style>{STYLE}</style></head><body><h1>sfdbench report: {html.escape(suite)}</h1>"
            f"<h2>Results</h2>{_table_html(table)}<h2>FID vs fine-tuning time</h2>{plot}"
            + (f"<h2>FID vs fine-tuning compute</h2>{_img(compute_png, 'plot', 'FID vs fine-tuning FLOPs')}"
               if compute_png else "") +
            f"<h2>Samples (run seed 0, samples 0-63, same noise for every method)</h2>"
            f'<div class="grids">{grid_html or "<p>No sample grids.</p>"}</div>'
            f"<h2>Run metadata</h2><table id=metadata>{meta_rows}</table></body></html>\n")
