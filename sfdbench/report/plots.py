"""The FID-vs-fine-tuning-time figure (the SFD paper's Figure 1) from a combined table."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8"]
GROUP_COLORS = {"solver": "#dbe9f6", "distillation": "#fde7d9"}
GROUP_LABELS = {"solver": "solver-based", "distillation": "distillation"}


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
    _draw_curves(ax, curves, shift)
    ax.set_xscale("log")
    if table["fid_mean"].max() / max(table["fid_mean"].min(), 1e-9) > 30:
        ax.set_yscale("log")
    spread = "; training-free methods fanned out around it" if len(names) > 1 else ""
    ax.set_xlabel(f"fine-tuning time + {shift:g} (device-hours, log scale{spread})")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + "   (numbers next to points: NFE)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _draw_curves(ax, curves: pd.DataFrame | None, shift: float) -> None:
    """Intermediate checkpoints: one dotted line per (method, NFE, guidance), ordered by iteration."""
    if curves is None or curves.empty:
        return
    cmap = plt.get_cmap("Dark2")
    done = curves.dropna(subset=["fid", "fine_tuning_hours"])
    for i, ((_method, display, nfe, _w), part) in enumerate(done.groupby(["method", "display", "nfe", "guidance"],
                                                                          sort=False)):
        part = part.sort_values("iteration")
        n = int(part["n_samples"].max())
        ax.plot(part["fine_tuning_hours"].astype(float) + shift, part["fid"], ls=":", marker=".", ms=4, lw=1,
                color=cmap(i % 8), zorder=2, label=f"{display} NFE {nfe}: checkpoints (n={n}, reduced)")
