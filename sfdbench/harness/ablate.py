"""Ablations of first-stage SFD, laid out like the SFD paper's Table 1: one knob at a time
(teacher solver, K = M + 1, sigma_min, AFS, loss, rho), every other setting at the suite's value.

Each variant is an ordinary ``sfd`` run with one hyperparameter override
(``RunPlan.method_overrides``), so its records land in OUT/SUITE/records like any run and the
config hash keeps the variants apart; the variant equal to the default shares its records (and
its fit) with a plain ``sfdbench run --methods sfd`` written to the same folder. (The CLI's
default ``--out`` is ``results/ablate``, apart from the main results: ``sfdbench table`` averages
every record of a (method, NFE), whatever its configuration.) The table has one row per knob
value and, per NFE, FID mean ± std over seeds and the fine-tuning device-hours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sfdbench.errors import BadInput

FORMATS = ("markdown", "latex", "csv")
METHOD = "sfd"


@dataclass(frozen=True)
class Knob:
    name: str  # as given on the command line
    key: str  # the sfd hyperparameter it sets
    title: str  # the table's first column
    values: tuple  # in the hyperparameter's own type (floats stay floats, so the default shares its hash)
    labels: dict = field(default_factory=dict)  # value -> text in the table
    paper: str = ""  # the paper's setting (spec 4.9)

    def label(self, value) -> str:
        return self.labels.get(value, str(value))


TEACHER_LABELS = {"dpmpp": "DPM-Solver++(3M)", "heun": "Heun", "dpm2": "DPM-Solver-2", "ipndm": "iPNDM",
                  "euler": "Euler"}
KNOBS = {
    "teacher": Knob("teacher", "teacher_solver", "Teacher solver", ("dpmpp", "heun", "dpm2", "ipndm", "euler"),
                    TEACHER_LABELS, "DPM-Solver++(3M)"),
    "K": Knob("K", "M", "K = M + 1", (1, 2, 3, 4), {m: f"K = {m + 1}" for m in range(1, 5)}, "K = 4"),
    "sigma_min": Knob("sigma_min", "sigma_min", "sigma_min", (0.002, 0.006, 0.02), {}, "0.006"),
    "afs": Knob("afs", "afs", "AFS", (True, False), {True: "on", False: "off"}, "on"),
    "loss": Knob("loss", "loss", "Loss", ("l1", "l2", "lpips"), {"l1": "L1", "l2": "L2", "lpips": "LPIPS"}, "L1"),
    "rho": Knob("rho", "rho", "rho", (3.0, 5.0, 7.0, 9.0), {}, "7"),
}


def knob(name: str) -> Knob:
    if name not in KNOBS:
        raise BadInput(f"unknown --knob {name!r}; choose one of {', '.join(KNOBS)}")
    return KNOBS[name]


def available_values(k: Knob) -> tuple[list, list[str]]:
    """The knob's values that can run here, and one note per value that cannot (and why)."""
    from sfdbench.diffusion.solvers import SOLVERS
    from sfdbench.methods.sfd import lpips_loss

    values, notes = [], []
    for value in k.values:
        if k.name == "teacher" and value not in SOLVERS:
            notes.append(f"{k.label(value)}: not in sfdbench.diffusion.solvers.SOLVERS")
        elif k.name == "loss" and value == "lpips" and lpips_loss()[0] is None:
            notes.append(f"LPIPS: unavailable ({lpips_loss()[1]})")
        else:
            values.append(value)
    return values, notes


@dataclass
class Ablation:
    suite: str
    knob: Knob
    nfes: list[int]
    default: object  # the knob's value in the suite's (and --set's) configuration
    rows: pd.DataFrame  # long form: one row per (value, NFE)
    notes: list[str]


def plans(suite: str, knob_name: str, nfes: list[int], seeds: list[int], samples: int, out: Path,
          overrides: dict | None = None, device: str = "cpu", force: bool = False, teacher: Path | None = None):
    """(knob, [(value, RunPlan)], notes, default value): one ``sfd`` plan per available value."""
    from sfdbench.harness.runner import RunPlan, make_suite
    from sfdbench.methods import get_method

    k = knob(knob_name)
    overrides = {m: dict(v) for m, v in (overrides or {}).items()}
    if k.key in overrides.get(METHOD, {}):
        raise BadInput(f"--set {METHOD}.{k.key} conflicts with --knob {k.name}, which varies it")
    if not nfes:
        raise BadInput("--nfe is empty")
    values, notes = available_values(k)
    base = RunPlan(suite=suite, grid=[(METHOD, n) for n in nfes], seeds=seeds, samples=samples, out=Path(out),
                   force=force, teacher=teacher, device=device, method_overrides=overrides)
    method = get_method(METHOD)
    for n in nfes:
        method.check_nfe(n)
    default = method.hyperparameters(make_suite(base), nfes[0])[k.key]
    out_plans = []
    for value in values:
        sets = {**overrides, METHOD: {**overrides.get(METHOD, {}), k.key: value}}
        out_plans.append((value, RunPlan(suite=suite, grid=base.grid, seeds=seeds, samples=samples, out=Path(out),
                                         force=force, teacher=teacher, device=device, method_overrides=sets)))
    return k, out_plans, notes, default


def run_ablation(suite: str, knob_name: str, nfes: list[int], seeds: list[int], samples: int, out: Path,
                 overrides: dict | None = None, device: str = "cpu", force: bool = False,
                 teacher: Path | None = None) -> Ablation:
    """Validate every variant first (nothing is written when one is bad), then run them in order."""
    return run_ablations(suite, [knob_name], nfes, seeds, samples, out, overrides, device, force, teacher)[0]


def knob_names(text: str) -> list[str]:
    """``all`` or a comma-separated list of knob names, each checked."""
    names = list(KNOBS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BadInput("--knob is empty; name one of " + ", ".join(KNOBS) + " or all")
    for name in names:
        knob(name)
    return names


def run_ablations(suite: str, names: list[str], nfes: list[int], seeds: list[int], samples: int, out: Path,
                  overrides: dict | None = None, device: str = "cpu", force: bool = False,
                  teacher: Path | None = None) -> list[Ablation]:
    """Several knobs in one go: every variant of every knob is validated before the first runs."""
    from sfdbench.harness.runner import run, validate
    from sfdbench.records import read_record

    planned = [plans(suite, name, nfes, seeds, samples, out, overrides, device, force, teacher) for name in names]
    for _, variant_plans, _, _ in planned:
        for _, plan in variant_plans:
            validate(plan)
    ablations = []
    for k, variant_plans, notes, default in planned:
        records = [r for _, plan in variant_plans for r in (read_record(p) for p in run(plan)) if r is not None]
        ablations.append(collect(records, suite, k, nfes, variant_plans, notes, default, samples))
    return ablations


def ablation_from_results(results: Path, suite: str, knob_name: str, nfes: list[int] | None = None,
                          overrides: dict | None = None, samples: int | None = None) -> Ablation:
    """The ablation table of records already under ``results`` (``sfdbench table --ablation``):
    the variants are recognised by their hyperparameters, so runs of other knobs in the same
    folder do not leak in. Without ``nfes``, every NFE that has records of some variant."""
    from sfdbench.records import read_record, records_dir

    records = [r for r in (read_record(p) for p in sorted(records_dir(results, suite).glob(f"{METHOD}-nfe*.json")))
               if r is not None and r.get("method") == METHOD and r.get("suite") == suite]
    if nfes is None:
        nfes = sorted({r["nfe"] for r in records})
        if not nfes:
            raise BadInput(f"no {METHOD} records of suite {suite} under {results}; run `sfdbench ablate` first")
    k, variant_plans, notes, default = plans(suite, knob_name, nfes, [0], 1, results, overrides)
    ab = collect(records, suite, k, nfes, variant_plans, notes, default, samples)
    if ab.rows["seeds"].sum() == 0:
        raise BadInput(f"no records of the {k.name} ablation under {results} (suite {suite}, NFE "
                       f"{', '.join(map(str, nfes))}); run `sfdbench ablate --suite {suite} --knob {k.name}`")
    return ab


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def collect(records: list[dict], suite: str, k: Knob, nfes: list[int], variant_plans, notes: list[str], default,
            samples: int | None = None) -> Ablation:
    """Rows of the ablation: per (knob value, NFE), the records whose hyperparameters are exactly
    that variant's (and, where several sample counts exist, those of ``samples`` or else the
    largest), summarised as FID mean ± std over seeds and mean fine-tuning device-hours."""
    from sfdbench.harness.runner import make_suite
    from sfdbench.methods import get_method

    method = get_method(METHOD)
    rows = []
    for value, plan in variant_plans:
        variant_suite = make_suite(plan)
        for n in nfes:
            expected = method.hyperparameters(variant_suite, n)
            recs = [r for r in records if r["nfe"] == n and _same(r.get("hyperparameters"), expected)]
            counts = sorted({r.get("n_samples") for r in recs if r.get("n_samples")})
            wanted = samples if samples is not None else (counts[-1] if counts else None)
            recs = [r for r in recs if r.get("n_samples") == wanted]
            fids = pd.Series([r["metrics"]["fid"] for r in recs], dtype=float)
            hours = pd.Series([(r.get("fine_tuning") or {}).get("device_hours", 0.0) for r in recs], dtype=float)
            rows.append({"knob": k.name, "hyperparameter": k.key, "value": value, "label": k.label(value),
                         "default": value == default, "nfe": n, "fid_mean": fids.mean(), "fid_std": fids.std(ddof=1),
                         "seeds": len(recs), "n_samples": wanted or 0, "fine_tuning_hours": hours.mean(),
                         "device": (recs[0].get("fine_tuning") or {}).get("device") if recs else None,
                         "config_hash": ",".join(r["config_hash"] for r in recs)})
    return Ablation(suite, k, list(nfes), default, pd.DataFrame(rows), notes)


# ---------------------------------------------------------------------------------------------
# The table


def _fid(row, pm: str) -> str:
    if pd.isna(row["fid_mean"]):
        return "–"
    text = f"{row['fid_mean']:.2f}"
    if row["seeds"] >= 2 and not pd.isna(row["fid_std"]):
        text += f" {pm} {row['fid_std']:.2f}"
    return text


def _hours(value) -> str:
    return "–" if pd.isna(value) else f"{value:.3g}"


def wide(ab: Ablation, pm: str = "±") -> tuple[pd.DataFrame, dict[str, int]]:
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


def caption(ab: Ablation) -> str:
    seeds = int(ab.rows["seeds"].max()) if not ab.rows.empty else 0
    samples = int(ab.rows["n_samples"].max()) if not ab.rows.empty else 0
    text = (f"{ab.suite}: SFD ablation of {ab.knob.title} ({METHOD} hyperparameter {ab.knob.key}); FID mean ± std "
            f"over {seeds} seed(s), {samples} samples each; fine-tuning in device-hours; best FID per NFE in bold; "
            f"the paper's setting: {ab.knob.paper}.")
    if ab.notes:
        text += " Not run: " + "; ".join(ab.notes) + "."
    return text


def render_ablation(ab: Ablation, fmt: str = "markdown") -> str:
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
    from sfdbench.report.tables import latex_cell, latex_escape

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
