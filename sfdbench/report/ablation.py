"""Rendering of an SFD ablation (``harness.ablate.Ablation``) as the SFD paper's Table 1: rows =
knob values, per NFE the FID mean ± std over seeds and the fine-tuning device-hours, the best FID
per NFE in bold; markdown, LaTeX or CSV (the long form)."""

from __future__ import annotations

import pandas as pd

from sfdbench.errors import BadInput
from sfdbench.report.tables import latex_cell, latex_escape

FORMATS = ("markdown", "latex", "csv")


def _fid(row, pm: str) -> str:
    if pd.isna(row["fid_mean"]):
        return "–"
    text = f"{row['fid_mean']:.2f}"
    if row["seeds"] >= 2 and not pd.isna(row["fid_std"]):
        text += f" {pm} {row['fid_std']:.2f}"
    return text


def _hours(value) -> str:
    return "–" if pd.isna(value) else f"{value:.3g}"


def wide(ab, pm: str = "±") -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows = knob values, columns = FID and device-hours per NFE (the paper's Table 1 layout), and
    per FID column the row index of the best (lowest) mean."""
    cells, best = {}, {}
    labels = list(dict.fromkeys(ab.rows["label"])) if not ab.rows.empty else []
    for n in ab.nfes:
        part = ab.rows[ab.rows["nfe"] == n].set_index("label").reindex(labels)
        cells[f"FID (NFE {n})"] = [_fid(r, pm) for _, r in part.iterrows()]
        cells[f"device-h (NFE {n})"] = [_hours(v) for v in part["fine_tuning_hours"]]
        if part["fid_mean"].notna().any():
            best[f"FID (NFE {n})"] = int(part["fid_mean"].reset_index(drop=True).idxmin())
    defaults = set(ab.rows.loc[ab.rows["default"], "label"]) if not ab.rows.empty else set()
    first = [f"{lab} (default)" if lab in defaults else lab for lab in labels]
    return pd.DataFrame({ab.knob.title: first, **cells}), best


def caption(ab) -> str:
    seeds = int(ab.rows["seeds"].max()) if not ab.rows.empty else 0
    samples = int(ab.rows["n_samples"].max()) if not ab.rows.empty else 0
    text = (f"{ab.suite}: SFD ablation of {ab.knob.title} (sfd hyperparameter {ab.knob.key}); FID mean ± std "
            f"over {seeds} seed(s), {samples} samples each; fine-tuning in device-hours; best FID per NFE in bold; "
            f"the paper's setting: {ab.knob.paper}.")
    if ab.notes:
        text += " Not run: " + "; ".join(ab.notes) + "."
    return text


def render_ablation(ab, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise BadInput(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return ab.rows.to_csv(index=False)
    view, best = wide(ab)
    if fmt == "markdown":
        for col, i in best.items():
            view.loc[i, col] = f"**{view.loc[i, col]}**"
        return view.to_markdown(index=False) + "\n\n" + caption(ab) + "\n"
    return _latex(view, best, caption(ab))


def _latex(view: pd.DataFrame, best: dict[str, int], text: str) -> str:
    cols = list(view.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}",
             r"\toprule", " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for i, row in view.iterrows():
        cells = [latex_cell(v) for v in row.astype(str)]
        cells = [rf"\textbf{{{c}}}" if best.get(col) == i else c for c, col in zip(cells, cols)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_cell(text)}}}", r"\label{tab:sfdbench-ablation}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"
