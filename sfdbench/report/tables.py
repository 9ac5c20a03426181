"""Comparison tables from run records (pandas): Method, NFE, FID mean +- std over seeds,
fine-tuning time. Formats: LaTeX, Markdown, CSV."""

from __future__ import annotations

import pandas as pd

from sfdbench.errors import BadInput

FORMATS = ("latex", "markdown", "csv")
GROUP_ORDER = {"solver": 0, "distillation": 1}


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, NFE): FID mean, std (ddof=1) and seed count; fine-tuning hours and device."""
    if records.empty:
        return pd.DataFrame(columns=["group", "method", "display", "nfe", "fid_mean", "fid_std", "seeds",
                                     "n_samples", "fine_tuning_hours", "device"])
    grouped = records.groupby(["group", "method", "display", "nfe"], sort=False)
    table = grouped.agg(fid_mean=("fid", "mean"), fid_std=("fid", "std"), seeds=("seed", "nunique"),
                        n_samples=("n_samples", "max"), fine_tuning_hours=("fine_tuning_hours", "mean"),
                        device=("device", "first")).reset_index()
    table["group_order"] = table["group"].map(GROUP_ORDER).fillna(9)
    first_seen = {m: i for i, m in enumerate(records["method"].drop_duplicates())}
    table["method_order"] = table["method"].map(first_seen)
    return table.sort_values(["group_order", "method_order", "nfe"]).drop(columns=["group_order", "method_order"])


def _fid_cell(mean: float, std: float, seeds: int, latex: bool) -> str:
    if seeds < 2 or pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} $\\pm$ {std:.2f}" if latex else f"{mean:.2f} ± {std:.2f}"


def _hours_cell(hours: float, device) -> str:
    if not hours:
        return "0"
    name = str(device or "").replace("CPU: ", "")
    return f"{hours:.3f} ({name})" if name else f"{hours:.3f}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def render(summary: pd.DataFrame, fmt: str) -> str:
    """Render a ``summarize`` table in ``fmt`` (latex | markdown | csv)."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return summary.to_csv(index=False)
    latex = fmt == "latex"
    text = latex_escape if latex else str
    view = pd.DataFrame({
        "Method": [text(d) for d in summary["display"]],
        "NFE": summary["nfe"].astype(int),
        "FID": [_fid_cell(m, s, n, latex) for m, s, n in zip(summary["fid_mean"], summary["fid_std"],
                                                                summary["seeds"])],
        "Seeds": summary["seeds"].astype(int),
        "Fine-tuning (device-h)": [text(_hours_cell(h, d)) for h, d in zip(summary["fine_tuning_hours"],
                                                                             summary["device"])],
    })
    if fmt == "markdown":
        return view.to_markdown(index=False)
    return view.to_latex(index=False, escape=False, column_format="lrrrl",
                         caption="FID (mean $\\pm$ std over seeds) and fine-tuning cost.",
                         label="tab:sfdbench")
