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

METHOD = "sfd"


@dataclass(frozen=True)
class Knob:
    name: str  # as given on the command line
    key: str  # the sfd hyperparameter it sets
    title: str  # the table's first column
    values: tuple  # in the hyperparameter's own type (floats stay floats, so the default shares its hash)
    labels: dict = field(default_factory=dict)  # value -> text in the table
    paper: str = ""  # the paper's setting (its CIFAR-10 configuration)

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
    """The knob's values that can run here, and one note per value that cannot (and why, as the
    method says: e.g. LPIPS offline)."""
    from sfdbench.diffusion.solvers import SOLVERS
    from sfdbench.methods import get_method

    method = get_method(METHOD)
    values, notes = [], []
    for value in k.values:
        why = method.unavailable({k.key: value})
        if k.name == "teacher" and value not in SOLVERS:
            notes.append(f"{k.label(value)}: not in sfdbench.diffusion.solvers.SOLVERS")
        elif why:
            notes.append(f"{k.label(value)}: unavailable ({why})")
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
