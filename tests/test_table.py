"""Tables from records: aggregation over seeds and the three formats."""

import pandas as pd
import pytest

from sfdbench.errors import BadInput
from sfdbench.report.tables import latex_escape, render, summarize


def records():
    rows = []
    for seed, (a, b) in enumerate([(10.0, 4.0), (12.0, 5.0), (14.0, 6.0)]):
        rows.append(dict(method="sfd", display="SFD", group="distillation", nfe=2, seed=seed, fid=b,
                         fine_tuning_hours=0.01, device="CPU: Fancy_CPU 50%", n_samples=100))
        rows.append(dict(method="ddim", display="DDIM", group="solver", nfe=10, seed=seed, fid=a,
                         fine_tuning_hours=0.0, device=None, n_samples=100))
    return pd.DataFrame(rows)


def test_summary_mean_std_over_seeds_and_order():
    s = summarize(records())
    assert list(s["method"]) == ["ddim", "sfd"]  # solvers first
    ddim = s.iloc[0]
    assert ddim["fid_mean"] == pytest.approx(12.0) and ddim["fid_std"] == pytest.approx(2.0) and ddim["seeds"] == 3


def test_formats():
    s = summarize(records())
    md = render(s, "markdown")
    assert "12.00 ± 2.00" in md and "5.00 ± 1.00" in md
    assert md.index("**Solver-based**") < md.index("| DDIM") < md.index("**Distillation**") < md.index("| SFD")
    tex = render(s, "latex")
    assert "12.00 $\\pm$ 2.00" in tex and "Fancy\\_CPU 50\\%" in tex and tex.count("\\\\") >= 3
    assert "\\textit{Solver-based}" in tex and "\\textit{Distillation}" in tex
    csv = render(s, "csv")
    assert pd.read_csv(__import__("io").StringIO(csv))["fid_mean"].tolist() == [12.0, 5.0]
    with pytest.raises(BadInput):
        render(s, "html")


def test_latex_escape():
    assert latex_escape("a_b & 10% #1 {x} ~ ^") == r"a\_b \& 10\% \#1 \{x\} \textasciitilde{} \textasciicircum{}"
