"""The FID-vs-fine-tuning-time figure (the SFD paper's Figure 1) and the FID-vs-fine-tuning-FLOPs
figure (the cost comparison of the distillation methods) from a combined table."""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8"]
GROUP_COLORS = {"solver": "#dbe9f6", "distillation": "#fde7d9"}
GROUP_LABELS = {"solver": "solver-based", "distillation": "distillation"}
# what the runner appends to an equal-budget row's name (`harness.runner.budget_display`)
BUDGET_NOTE = re.compile(r" \(((?:\S+ x )?SFD's budget) at this NFE: [^)]*\)")


def time_shift(hours: pd.Series) -> float:
    """A shift so that zero fine-tuning is drawable on a log axis: the power of ten at or below
    the smallest positive time (the paper shifts its A100 hours by +1 h)."""
    positive = hours[hours > 0]
    return 10 ** math.floor(math.log10(positive.min())) if len(positive) else 1.0


def fid_vs_finetuning(table: pd.DataFrame, title: str, curves: pd.DataFrame | None = None):
    """Figure: x = fine-tuning device-hours + shift (log), y = FID; one marker per method,
    filled = measured (with seed std), hollow = published, NFE next to each point, the
    solver-based and distillation regions shaded; rows of one method and NFE at several compute
    budgets joined by a dashed line (FID against compute); ``curves`` (``records.load_curves``): each
    fit's intermediate checkpoints as a dotted line of small markers, FID on a reduced sample count
    against the compute spent up to the checkpoint, labelled as such."""
    table = table.dropna(subset=["fid_mean"]).copy()
    table["fine_tuning_hours"] = table["fine_tuning_hours"].fillna(0.0).astype(float)
    shift = time_shift(table["fine_tuning_hours"])
    table["x"] = table["fine_tuning_hours"] + shift
    # training-free methods all sit at x = shift; fan them out (one column per method, within
    # +-0.2 decades) so their markers and NFE labels do not pile up on one vertical line
    free = table["fine_tuning_hours"] == 0
    names = list(dict.fromkeys(table.loc[free, "display"]))
    if len(names) > 1:
        offsets = {n: -0.2 + 0.4 * i / (len(names) - 1) for i, n in enumerate(names)}
        table.loc[free, "x"] = shift * 10 ** table.loc[free, "display"].map(offsets).astype(float)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150)
    for group, part in table.groupby("group"):
        lo, hi = part["x"].min() / 1.6, part["x"].max() * 1.6
        ax.axvspan(lo, hi, color=GROUP_COLORS.get(group, "#eeeeee"), alpha=0.6, zorder=0, lw=0)
        ax.text(math.sqrt(lo * hi), 0.98, GROUP_LABELS.get(group, group), transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=8, color="#555555")
    cmap = plt.get_cmap("tab20")
    for i, (_, part) in enumerate(table.groupby(["method", "display"], sort=False)):
        color, marker = cmap((2 * i) % 20 + (i // 10) % 2), MARKERS[i % len(MARKERS)]
        label = part["display"].iloc[0]
        for source, rows in part.groupby("source"):
            measured = source == "measured"
            yerr = rows["fid_std"].fillna(0).to_numpy() if measured else None
            ax.errorbar(rows["x"], rows["fid_mean"], yerr=yerr, fmt=marker, ms=7, color=color, capsize=2,
                        mfc=color if measured else "none", mew=1.5, lw=1,
                        label=f"{label} ({'measured' if measured else 'published'})", zorder=3)
            for _, r in rows.iterrows():
                ax.annotate(str(int(r["nfe"])), (r["x"], r["fid_mean"]), textcoords="offset points",
                            xytext=(5, 3), fontsize=7, color=color)
    # FID against compute: one method at one NFE measured at several budgets (`run --budget sfd*0.5,sfd,sfd*2`)
    # or with several training lengths is joined by a dashed line, cheapest first
    measured = table[table["source"] == "measured"]
    for _key, part in measured.groupby(["method", "nfe"], sort=False):
        if part["x"].nunique() > 1:
            part = part.sort_values("x")
            ax.plot(part["x"], part["fid_mean"], ls="--", lw=0.8, color="#777777", zorder=2)
    _draw_curves(ax, curves, "fine_tuning_hours", shift)
    ax.set_xscale("log")
    if table["fid_mean"].max() / max(table["fid_mean"].min(), 1e-9) > 30:
        ax.set_yscale("log")
    spread = "; training-free methods fanned out around it" if len(names) > 1 else ""
    ax.set_xlabel(f"fine-tuning time + {shift:g} (device-hours, log scale{spread})")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + "   (numbers next to points: NFE)", fontsize=10)
    _readable_log_ticks(ax.xaxis)
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig, ax)
    return fig


def fid_vs_compute(table: pd.DataFrame, title: str, curves: pd.DataFrame | None = None):
    """Figure: x = fine-tuning FLOPs (log; counted the same way for every method), y = FID, for the
    measured rows that report FLOPs (``compute_rows``: the fine-tuned methods). One colour per method
    and sampler guidance scale; filled markers are recipe rows, hollow squares equal-budget rows
    (``budget_flops`` set), which sit on the x of the SFD fit whose FLOPs they were given, so SFD and
    each baseline compare vertically at equal compute. NFE next to each point, seed std as error
    bars; rows of one method and NFE at several budgets joined by a dashed line; ``curves`` as dotted
    lines (reduced sample counts, labelled). Device-hours would rank the same fits by how busy the
    machine was; FLOPs do not."""
    rows = compute_rows(table).copy()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150)
    cmap = plt.get_cmap("tab10")
    # one colour per method and sampler guidance scale (SFD unguided and SFD with CFG are different rows)
    scale = rows["guidance"] if "guidance" in rows else pd.Series(1.0, index=rows.index)
    rows["colour_key"] = list(zip(rows["method"], pd.to_numeric(scale, errors="coerce").fillna(1.0).astype(float)))
    colors = {k: cmap(i % 10) for i, k in enumerate(dict.fromkeys(rows["colour_key"]))}
    budget = rows["budget_flops"] if "budget_flops" in rows else pd.Series(None, index=rows.index, dtype=object)
    rows["equal_budget"] = pd.to_numeric(budget, errors="coerce").notna()
    # one legend entry for a method's equal-budget rows at every NFE (their names differ only in the budget)
    rows["series"] = [series_name(d) if b else d for d, b in zip(rows["display"], rows["equal_budget"])]
    for (key, series, equal_budget), part in rows.groupby(["colour_key", "series", "equal_budget"], sort=False):
        color = colors[key]
        ax.errorbar(part["fine_tuning_flops"].astype(float), part["fid_mean"], yerr=part["fid_std"].fillna(0),
                    fmt="s" if equal_budget else "o", ms=7, color=color, mfc="none" if equal_budget else color,
                    mew=1.5, lw=1, capsize=2, label=series, zorder=3)
        for _, r in part.iterrows():
            ax.annotate(str(int(r["nfe"])), (float(r["fine_tuning_flops"]), r["fid_mean"]),
                        textcoords="offset points", xytext=(5, 3), fontsize=7, color=color)
    for (key, _nfe), part in rows.groupby(["colour_key", "nfe"], sort=False):
        if part["fine_tuning_flops"].nunique() > 1:
            part = part.sort_values("fine_tuning_flops")
            ax.plot(part["fine_tuning_flops"].astype(float), part["fid_mean"], ls="--", lw=0.7,
                    color=colors[key], alpha=0.5, zorder=2)
    _draw_curves(ax, curves, "fine_tuning_flops", colour_of=lambda key: colors.get(key, "#555555"))
    ax.set_xscale("log")
    fids = rows["fid_mean"] if curves is None or curves.empty else pd.concat([rows["fid_mean"], curves["fid"]])
    if len(fids) and fids.max() / max(fids.min(), 1e-9) > 8:  # early checkpoints would flatten the rows
        ax.set_yscale("log")
        _readable_log_ticks(ax.yaxis)
    _readable_log_ticks(ax.xaxis)
    ax.set_xlabel("fine-tuning FLOPs (teacher forwards + student forward and backward passes; log scale)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + "   (numbers next to points: NFE; hollow squares: equal-budget rows)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if rows.empty:
        ax.text(0.5, 0.5, "no fine-tuned rows with counted FLOPs", transform=ax.transAxes, ha="center")
    _legend_below(fig, ax)
    return fig


def compute_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows ``fid_vs_compute`` draws: measured, with an FID and counted fine-tuning FLOPs."""
    flops = table["fine_tuning_flops"] if "fine_tuning_flops" in table else pd.Series(float("nan"), index=table.index)
    return table[(table["source"] == "measured") & (pd.to_numeric(flops, errors="coerce") > 0)].dropna(
        subset=["fid_mean"])


def series_name(display: str) -> str:
    """An equal-budget row's name without the per-NFE FLOPs, so that a method's rows at SFD's budget
    (or a multiple of it) are one legend entry: ``PD (SFD's budget at this NFE: 5.66e+12 FLOPs)`` ->
    ``PD (SFD's budget)``. A fixed budget (``budget: X FLOPs``) keeps its name."""
    return BUDGET_NOTE.sub(lambda m: f" ({m.group(1)})", display)


def _readable_log_ticks(axis) -> None:
    """Labels at 1, 2 and 5 of each decade, written plainly (0.02, 5e+12), none on the minor ticks:
    matplotlib's default labels minor ticks of short ranges with overlapping 2x10^-2 texts."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_below(fig, ax) -> None:
    """The legend under the axes in two columns, the figure made taller to hold it, so that long
    configuration names never squeeze the plot itself."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        fig.tight_layout()
        return
    ncol = 2 if len(labels) > 4 else 1
    lines = math.ceil(len(labels) / ncol)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width if ncol == 1 else max(width, 11.0), height + 0.17 * lines)
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)
    fig.tight_layout()


def _draw_curves(ax, curves: pd.DataFrame | None, x: str, shift: float = 0.0, colour_of=None) -> None:
    """Intermediate checkpoints: one dotted line per (method, NFE, guidance), ordered by iteration,
    at ``curves[x] + shift``; ``colour_of((method, w))`` picks a line's colour (None: Dark2 in turn)."""
    if curves is None or curves.empty:
        return
    cmap = plt.get_cmap("Dark2")
    done = curves.dropna(subset=["fid", x])
    for i, ((method, display, nfe, w), part) in enumerate(done.groupby(["method", "display", "nfe", "guidance"],
                                                                        sort=False)):
        part = part.sort_values("iteration")
        n = int(part["n_samples"].max())
        color = colour_of((method, float(w))) if colour_of else cmap(i % 8)
        ax.plot(part[x].astype(float) + shift, part["fid"], ls=":", marker=".", ms=4, lw=1,
                color=color, zorder=2, label=f"{display} NFE {nfe}: checkpoints (n={n}, reduced)")
