"""Comparison tables from run records and published numbers, laid out like the SFD paper's
Tables 2/3: "Solver-based" then "Distillation" groups, Method, NFE, FID mean ± std over seeds,
the other metrics when measured, fine-tuning time, and whether a row is measured or published.
Formats: LaTeX (booktabs), Markdown, CSV.

Replicates (``docs/reporting.md#seed-blocks``): a measured row averages either run seeds (noise
seed = seed x 10^7 + i) or seed blocks (block B = noise seeds B·n … B·n+n−1, EDM's ``--seeds``
convention); it is never a mix of both, and its ``replicates`` column says which. FID is the mean
± sample std (ddof = 1) over the replicates, never their minimum; ``best_of_blocks`` adds, only
when asked, a separate row with the minimum over seed blocks, labelled "best of k seed blocks"."""

from __future__ import annotations

import json

import pandas as pd

from sfdbench.errors import BadInput

FORMATS = ("latex", "markdown", "csv")
GROUPS = {"solver": "Solver-based", "distillation": "Distillation"}
EXTRA_METRICS = {"kid": "KID", "precision": "Prec.", "recall": "Rec.", "density": "Dens.", "coverage": "Cov.",
                 "class_match": "Class match", "fd_dinov2": "FD-DINOv2", "fid_heldout": "FID (held-out)",
                 "memorisation": "Memo.", "clip_score": "CLIP score"}
COLUMNS = ["group", "method", "display", "nfe", "source", "fid_mean", "fid_std", "fid_qualifier", "seeds",
           "n_samples", *EXTRA_METRICS, "fine_tuning_hours", "hours_qualifier", "device", "guidance",
           "fine_tuning_flops", "budget_flops", "replicates", "seed_blocks", "fid_statistic"]
REPLICATES = {False: "seeds", True: "seed blocks"}
MEAN, BEST = "mean", "best of blocks"


def named_rows(records: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``records`` with a ``variant`` column and each row's table name: the display name,
    what sets its configuration apart, its parallel rounds and a below-protocol note."""
    records = records.copy()
    if "variant" not in records:
        records["variant"] = ""
    records["display"] = variant_displays(records) + parallel_notes(records) + below_protocol_notes(records)
    return records


def summarize(records: pd.DataFrame, best_of_blocks: bool = False) -> pd.DataFrame:
    """Measured rows: one per configuration (method, NFE and everything else but the seed: the
    records' ``variant``) and kind of replicate (run seeds or seed blocks) with metric means, FID
    std (ddof=1) and replicate count. Where one (method, NFE) has several configurations (an
    ablation, another sample count, another teacher), each is its own row, its name followed by what
    sets it apart, e.g. ``SFD [M=1]``. With ``best_of_blocks``, each row over two or more seed
    blocks is followed by a row whose FID is the minimum over its blocks (``fid_statistic`` =
    "best of blocks", no std); never by default."""
    if records.empty:
        return pd.DataFrame(columns=COLUMNS)
    records = named_rows(records)
    if "guidance" not in records:
        records["guidance"] = 1.0
    blocks = records["seed_block"] if "seed_block" in records else pd.Series(None, index=records.index)
    records["replicates"] = blocks.notna().map(REPLICATES)
    records["block"] = pd.to_numeric(blocks, errors="coerce")
    aggs = {"guidance": ("guidance", "first"), "fid_mean": ("fid", "mean"), "fid_std": ("fid", "std"),
            "seeds": ("seed", "nunique"),
            "n_samples": ("n_samples", "max"), "fine_tuning_hours": ("fine_tuning_hours", "mean"),
            "device": ("device", "first")}
    if "fine_tuning_flops" in records:
        aggs["fine_tuning_flops"] = ("fine_tuning_flops", "mean")
    if "budget_flops" in records:
        aggs["budget_flops"] = ("budget_flops", "first")
    aggs.update({m: (m, "mean") for m in EXTRA_METRICS if m in records})
    aggs.update(fid_min=("fid", "min"), seed_blocks=("block", _block_list))
    keys = ["group", "method", "display", "nfe", "variant", "replicates"]
    table = records.groupby(keys, sort=False).agg(**aggs).reset_index()
    table["source"], table["fid_qualifier"], table["hours_qualifier"] = "measured", "", ""
    table["fid_statistic"] = MEAN
    if best_of_blocks:
        best = table[(table["replicates"] == REPLICATES[True]) & (table["seeds"] >= 2)].copy()
        best["fid_mean"], best["fid_std"], best["fid_statistic"] = best["fid_min"], float("nan"), BEST
        for m in EXTRA_METRICS:  # the other metrics are not the best block's: leave them out
            if m in best:
                best[m] = float("nan")
        table = pd.concat([table, best]).sort_index(kind="stable").reset_index(drop=True)
    return combine(table.reindex(columns=COLUMNS), pd.DataFrame(columns=COLUMNS))


def _block_list(blocks: pd.Series) -> str:
    """The seed blocks of a row, e.g. ``0,1,2`` (empty for run-seed rows)."""
    return ",".join(str(int(b)) for b in sorted(blocks.dropna().unique()))


def parallel_notes(records: pd.DataFrame) -> pd.Series:
    """`` (3 parallel rounds)`` for records of methods whose network calls per step run in parallel
    (EPD-Solver's ``nfe_parallel``: the papers' NFE, sequential rounds of calls); the NFE column
    stays the counted calls, by which rows sort. Empty for every other record."""
    values = records["nfe_parallel"] if "nfe_parallel" in records else pd.Series(None, index=records.index)
    return pd.Series([f" ({int(v)} parallel rounds)" if v is not None and not pd.isna(v) else "" for v in values],
                     index=records.index, dtype=object)


def below_protocol_notes(records: pd.DataFrame) -> pd.Series:
    """`` (n=8 < 50000, not the protocol)`` for records sampled with fewer images than their suite's
    metric protocol asks for (``metric_protocol.n_generated``, e.g. the paper suites' 50,000), so a
    quick or test run can never pass for a paper number; empty otherwise."""
    notes = []
    for _, rec in records.iterrows():
        protocol = rec.get("metric_protocol") if "metric_protocol" in records else None
        wanted = protocol.get("n_generated") if isinstance(protocol, dict) else None
        n = rec.get("n_samples")
        below = wanted is not None and n is not None and not pd.isna(n) and int(n) < int(wanted)
        notes.append(f" (n={int(n)} < {int(wanted)}, not the protocol)" if below else "")
    return pd.Series(notes, index=records.index, dtype=object)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def variant_displays(records: pd.DataFrame) -> pd.Series:
    """Each record's display name, with ``[key=value, ...]`` appended where its (method, NFE) has
    several configurations under the same display name: the settings in which it differs from the
    configuration with the most records (hyperparameters, sample count, teacher). Configurations
    whose display names already differ (a budget row beside its recipe row) keep them as they are."""
    names = records["display"].astype(str).copy()
    keys = ["method", "nfe", "guidance", "display"] if "guidance" in records else ["method", "nfe", "display"]
    for _, part in records.groupby(keys, sort=False):
        variants = part["variant"].unique()
        if len(variants) < 2:
            continue
        settings = {}
        for v in variants:
            first = part[part["variant"] == v].iloc[0]
            flat = _flatten(first.get("hyperparameters") if "hyperparameters" in part else {})
            flat.update({"samples": first.get("n_samples"), "teacher": first.get("teacher")})
            settings[v] = flat
        common = part["variant"].value_counts(sort=True).index[0]
        for v in variants:
            diff = [f"{k}={settings[v].get(k)}" for k in sorted(set(settings[v]) | set(settings[common]))
                    if k not in ("num_steps",) and settings[v].get(k) != settings[common].get(k)]
            if v != common:
                rows = part.index[part["variant"] == v]
                names[rows] = names[rows] + f" [{', '.join(diff) or 'other config'}]"
    return names


def published_rows(published: pd.DataFrame) -> pd.DataFrame:
    """Published rows in the same columns (A100 GPU-hours as printed, no seed spread)."""
    if published.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = published.rename(columns={"fid": "fid_mean", "training_hours": "fine_tuning_hours",
                                     "training_hours_qualifier": "hours_qualifier"})
    rows["source"], rows["device"] = "published", "A100"
    rows["fid_statistic"] = "as published"
    return rows.reindex(columns=COLUMNS)


def combine(measured: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Measured and published rows sorted by group, method (first appearance), NFE, guidance, a
    method's recipe row before its equal-budget rows, measured first."""
    frames = [f for f in (measured, published) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    both = pd.concat(frames, ignore_index=True)
    key = _row_order(both, "guidance").assign(
        g=both["group"].map({g: i for i, g in enumerate(GROUPS)}).fillna(9),
        s=(both["source"] != "measured").astype(int))
    return both.loc[key.sort_values(["g", "m", "n", "w", "b", "s"], kind="stable").index].reset_index(drop=True)


def _row_order(rows: pd.DataFrame, guidance: str) -> pd.DataFrame:
    """Sort keys shared by the tables: method (first appearance) ``m``, NFE ``n``, the guidance
    column ``w``, and ``b``: 0 for a recipe row, then equal-budget rows by their ``budget_flops``."""
    budget = rows["budget_flops"] if "budget_flops" in rows else pd.Series(float("nan"), index=rows.index)
    order = {m: i for i, m in enumerate(rows["method"].drop_duplicates())}
    return pd.DataFrame({"m": rows["method"].map(order), "n": rows["nfe"].astype(int),
                         "w": pd.to_numeric(rows[guidance], errors="coerce").fillna(1.0),
                         "b": pd.to_numeric(budget, errors="coerce").fillna(0.0)})


def _over_cell(row) -> str:
    """What a row's FID is computed over: ``3 seeds``, ``3 seed blocks (0,1,2)``, ``best of 3 seed
    blocks (0,1,2)`` or, for published rows, ``as published``."""
    if row["source"] != "measured":
        return "as published"
    k = int(row["seeds"]) if not pd.isna(row["seeds"]) else 0
    kind = row.get("replicates") if isinstance(row.get("replicates"), str) else REPLICATES[False]
    if kind == REPLICATES[True]:
        blocks = f" ({row['seed_blocks']})" if isinstance(row.get("seed_blocks"), str) and row["seed_blocks"] else ""
        label = f"{k} seed block{'s' if k != 1 else ''}{blocks}"
        return f"best of {label}" if row.get("fid_statistic") == BEST else label
    return f"{k} seed{'s' if k != 1 else ''}"


def has_blocks(table: pd.DataFrame) -> bool:
    """Whether any row of ``table`` is over seed blocks (the tables then say, per row, what FID is over)."""
    return "replicates" in table and bool((table["replicates"] == REPLICATES[True]).any())


def _fid_cell(row, pm: str) -> str:
    if pd.isna(row["fid_mean"]):
        return "–"
    text = f"{row['fid_qualifier'] or ''}{row['fid_mean']:.2f}"
    if row["source"] == "measured" and row["seeds"] and row["seeds"] >= 2 and not pd.isna(row["fid_std"]):
        text += f" {pm} {row['fid_std']:.2f}"
    return text


def _hours_cell(row) -> str:
    hours = row["fine_tuning_hours"]
    if pd.isna(hours) or hours == 0:
        return "0"
    device = str(row["device"] or "").replace("CPU: ", "")
    number = f"{hours:g}" if row["source"] == "published" else f"{hours:.3g}"
    return f"{row['hours_qualifier'] or ''}{number}" + (f" ({device})" if device else "")


def _metric_cell(value) -> str:
    return "–" if pd.isna(value) else f"{value:.3f}"


def display_view(table: pd.DataFrame, pm: str) -> tuple[pd.DataFrame, list[str]]:
    metrics = [m for m in EXTRA_METRICS if m in table and table[m].notna().any()]
    view = pd.DataFrame({
        "Method": table["display"].astype(str),
        "NFE": table["nfe"].astype(int),
        "FID": [_fid_cell(r, pm) for _, r in table.iterrows()],
        **({"FID over": [_over_cell(r) for _, r in table.iterrows()]} if has_blocks(table) else {}),
        **{EXTRA_METRICS[m]: [_metric_cell(v) for v in table[m]] for m in metrics},
        "Fine-tuning (device-h)": [_hours_cell(r) for _, r in table.iterrows()],
        "Source": table["source"].astype(str),
    })
    return view, list(table["group"])


def protocol_caption(protocols: list[dict]) -> str:
    """One sentence on how the measured metrics were computed (feature space, reference set, which
    precision/recall definition, k, KID subsets), from the records' metric protocols; a note when
    the records disagree."""
    distinct = {json.dumps(p, sort_keys=True) for p in protocols if p}
    if not distinct:
        return ""
    p = json.loads(sorted(distinct)[0])
    against = (f"{p['n_reference']} reference images" if p.get("n_reference") is not None
               else str(p.get("reference_set", "?")))
    parts = [f"Metrics on {p.get('feature_extractor', '?')} features ({p.get('feature_dim', '?')}-d) against {against}"]
    if p.get("n_generated"):
        parts.append(f"protocol: {p['n_generated']:,} samples, seeds 0 to {p['n_generated'] - 1:,}")
    if "pr_definition" in p:
        parts.append(f"precision/recall: {p['pr_definition']}, k = {p.get('prdc_k', '?')}")
    if "kid_subsets" in p:
        parts.append(f"KID: {p['kid_subsets']} subsets of {p.get('kid_subset_size', '?')}")
    text = "; ".join(parts) + "."
    if len(distinct) > 1:
        text += f" Warning: the records use {len(distinct)} different metric protocols."
    return text


def render(table: pd.DataFrame, fmt: str, caption: str = "") -> str:
    """Render a ``combine``/``summarize`` table in ``fmt`` (latex | markdown | csv)."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        view, groups = display_view(table, "±")
        blocks = []
        for group in GROUPS:
            part = view[[g == group for g in groups]]
            if not part.empty:
                blocks.append(f"**{GROUPS[group]}**\n\n" + part.to_markdown(index=False))
        return "\n\n".join(blocks) + (f"\n\n{caption}" if caption else "")
    return _latex(table, caption)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_cell(text: str) -> str:
    """Escape a cell; the qualifiers ~ < > and ± become math symbols (text-mode < prints as ¡)."""
    math = {"~": r"$\sim$", "<": "$<$", ">": "$>$", "±": r"$\pm$"}
    return "".join(math.get(ch) or _LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs table with one \\midrule-separated block per group, like the paper's tables."""
    view, groups = display_view(table, "±")
    cols = list(view.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 3) + "ll}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\"]
    for group in GROUPS:
        part = view[[g == group for g in groups]]
        if part.empty:
            continue
        lines += [r"\midrule", rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{GROUPS[group]}}}}} \\"]
        for _, row in part.iterrows():
            cells = [latex_cell(v) for v in row.astype(str)]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_cell(caption)}}}", r"\label{tab:sfdbench}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Cost to quality (`sfdbench table --cost`)

COST_COLUMNS = ["group", "method", "display", "nfe", "fid_mean", "fid_std", "seeds", "fine_tuning_hours",
                "fine_tuning_flops", "teacher_evaluations", "student_evaluations", "real_images", "sfd_match",
                "flops_ratio_to_sfd"]
SFD_FAMILY = ("sfd",)


def cost_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned configuration (method, NFE, variant): FID reached and every compute column, and
    the ratio of its FLOPs to SFD's at equal or better FID: the cheapest first-stage SFD row (any
    NFE, same results folder, same target guidance scale: guided PD distilled at w = 1.25 is matched
    with SFD sampled with guidance 1.25, never with unguided SFD, whose FID measures another
    distribution) whose mean FID is at most this row's; "PD needs x N SFD's compute to match its
    FID". Rows SFD does not match get no ratio (and say so)."""
    if records.empty:
        return pd.DataFrame(columns=COST_COLUMNS)
    records = named_rows(records)
    if "seed_block" in records:  # never average seed blocks with run seeds; say which a row is over
        blocks = records["seed_block"].notna()
        records.loc[blocks, "display"] = records.loc[blocks, "display"] + " (seed blocks)"
    tuned = records[records["group"] == "distillation"]
    if tuned.empty:
        return pd.DataFrame(columns=COST_COLUMNS)
    numeric = ["fine_tuning_hours", "fine_tuning_flops", "teacher_evaluations", "student_evaluations", "real_images"]
    defaults = {**dict.fromkeys([*numeric, "budget_flops"], float("nan")), "target_guidance": 1.0}
    tuned = tuned.assign(**{col: value for col, value in defaults.items() if col not in tuned})
    table = tuned.groupby(["group", "method", "display", "nfe", "variant"], sort=False).agg(
        fid_mean=("fid", "mean"), fid_std=("fid", "std"), seeds=("seed", "nunique"),
        target_guidance=("target_guidance", "first"), budget_flops=("budget_flops", "first"),
        **{c: (c, "mean") for c in numeric}).reset_index()
    key = _row_order(table, "target_guidance")
    table = table.loc[key.sort_values(["m", "n", "w", "b"], kind="stable").index].reset_index(drop=True)
    sfd = table[table["method"].isin(SFD_FAMILY) & table["fine_tuning_flops"].notna()]
    matches, ratios = [], []
    for _, row in table.iterrows():
        w = row["target_guidance"]
        better = sfd[(sfd["fid_mean"] <= row["fid_mean"]) & (sfd["target_guidance"] == w)]
        if row["method"] in SFD_FAMILY or better.empty or pd.isna(row["fine_tuning_flops"]):
            matches.append("–" if row["method"] in SFD_FAMILY else
                           "SFD does not reach this FID here" + (f" (at w={w:g})" if w != 1.0 else ""))
            ratios.append(float("nan"))
            continue
        cheapest = better.loc[better["fine_tuning_flops"].idxmin()]
        matches.append(f"SFD NFE {int(cheapest['nfe'])}" + (f" w={w:g}" if w != 1.0 else "")
                       + f" (FID {cheapest['fid_mean']:.2f})")
        ratios.append(row["fine_tuning_flops"] / cheapest["fine_tuning_flops"])
    table["sfd_match"], table["flops_ratio_to_sfd"] = matches, ratios
    return table.reindex(columns=COST_COLUMNS)


def render_cost(table: pd.DataFrame, fmt: str, caption: str = "") -> str:
    if fmt not in FORMATS:
        raise BadInput(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)

    def number(v, spec):
        return "–" if pd.isna(v) else format(v, spec)

    view = pd.DataFrame({
        "Method": table["display"].astype(str), "NFE": table["nfe"].astype(int),
        "FID": [number(m, ".2f") + ("" if pd.isna(s) else f" ± {s:.2f}") for m, s in zip(table["fid_mean"],
                                                                                          table["fid_std"])],
        "Device-h": [number(v, ".3g") for v in table["fine_tuning_hours"]],
        "FLOPs": [number(v, ".3g") for v in table["fine_tuning_flops"]],
        "Teacher evals": [number(v, ".3g") for v in table["teacher_evaluations"]],
        "Student evals": [number(v, ".3g") for v in table["student_evaluations"]],
        "Real images": [number(v, ".3g") for v in table["real_images"]],
        "SFD at ≤ this FID": table["sfd_match"].astype(str),
        "× SFD's FLOPs": [number(v, ".1f") for v in table["flops_ratio_to_sfd"]],
    })
    if fmt == "markdown":
        return view.to_markdown(index=False) + (f"\n\n{caption}" if caption else "")
    cols = list(view.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{lr" + "r" * (len(cols) - 4) + "lr}",
             r"\toprule", " & ".join(latex_cell(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_cell(v) for v in row.astype(str)) + r" \\" for _, row in view.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_cell(caption)}}}", r"\label{tab:sfdbench-cost}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


COST_CAPTION = ("Fine-tuning compute to quality. FLOPs: torch's flop counter per sample (teacher forward; student "
                "forward + backward) x counted evaluations, teacher trajectories included; device-hours = wall x "
                "devices. The ratio divides a row's FLOPs by those of the cheapest first-stage SFD fit in the same "
                "results whose FID is at most the row's, at the same target guidance scale.")
