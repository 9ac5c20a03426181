"""The paper's outputs: published rows, LaTeX that compiles, the plot, the HTML report in a real
browser, and `sfdbench check` catching a planted regression."""

import re
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from sfdbench.baselines import load_published
from sfdbench.diffusion import solvers
from sfdbench.harness.runner import RunPlan, run
from sfdbench.records import load_records
from sfdbench.report.check import compare, failed
from sfdbench.report.tables import combine, published_rows, render, summarize

pytestmark = pytest.mark.slow


def test_published_rows_match_the_paper():
    cifar = load_published("cifar10")
    row = cifar[(cifar["method"] == "sfd") & (cifar["nfe"] == 2)].iloc[0]
    assert row["fid"] == 4.53 and row["training_hours"] == 0.64
    assert len(cifar) == 28 and len(load_published("imagenet64")) == 26  # SFD Table 2 + 2 ECT rows
    assert set(cifar["group"]) == {"solver", "distillation"}


def test_paper_suite_tables_show_published_rows(cli):
    r = cli("table", "--suite", "cifar10", "--format", "markdown")
    assert r.returncode == 0, r.stderr
    assert "**Solver-based**" in r.stdout and "**Distillation**" in r.stdout
    assert "| SFD-v" in r.stdout and "published" in r.stdout and "| measured" not in r.stdout  # no measured rows
    assert cli("table", "--suite", "imagenet64", "--format", "csv").returncode == 0


def test_paper_suite_run_without_assets_exits_3(tmp_path):
    import os
    import sys

    env_cache = tmp_path / "cache"
    env = {**os.environ, "SFDBENCH_CACHE": str(env_cache)}
    args = ["run", "--suite", "cifar10", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "sfdbench.cli", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "edm-cifar10-32x32-uncond-vp.pkl" in line and "https://" in line and str(env_cache) in line
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (.ci/run installs it)")
def test_latex_table_compiles(tmp_path):
    table = combine(summarize(_fake_records()), published_rows(load_published("cifar10")))
    tex = render(table, "latex", caption="test: FID ± std, 50% of ~things_with_underscores")
    doc = ("\\documentclass{article}\\usepackage[T1]{fontenc}\\usepackage[utf8]{inputenc}\\usepackage{booktabs}"
           "\\begin{document}\n" + tex + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000


def _fake_records():
    rows = []
    for seed, fid in enumerate([7.0, 8.0, 9.0]):
        rows.append(dict(method="sfd", display="SFD", group="distillation", nfe=2, seed=seed, fid=fid,
                         fine_tuning_hours=0.01, device="CPU: x_y", n_samples=100, config_hash="h"))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """A tiny measured grid (2 seeds) with sample grids, for plot/report tests."""
    out = tmp_path_factory.mktemp("res")
    from conftest import run_cli

    r = run_cli("run", "--methods", "ddim,sfd", "--nfe", "2", "--seeds", "0,1", "--samples", "40", "--out", str(out),
                "--set", "sfd.iterations=2", "--set", "sfd.batch=8")
    assert r.returncode == 0, r.stderr
    return out


def test_plot_writes_png_and_pdf(cli, tiny_results):
    r = cli("plot", "--suite", "digits", "--results", str(tiny_results))
    assert r.returncode == 0, r.stderr
    png = tiny_results / "digits" / "plots" / "fid_vs_finetuning.png"
    pdf = png.with_suffix(".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:4] == b"%PDF"
    # SFD's fit counts its FLOPs, so the FID-vs-compute plot is written beside it
    compute = tiny_results / "digits" / "plots" / "fid_vs_compute.png"
    assert compute.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and compute.with_suffix(".pdf").is_file()


def test_compute_plot_puts_rows_at_their_flops_and_one_legend_entry_per_budget_series():
    from matplotlib.colors import to_rgba

    from sfdbench.report.plots import fid_vs_compute

    def row(method, display, nfe, flops, fid, budget=None):
        return {"group": "distillation", "method": method, "display": display, "nfe": nfe, "source": "measured",
                "fid_mean": fid, "fid_std": 0.5, "fine_tuning_hours": 0.01, "fine_tuning_flops": flops,
                "budget_flops": budget}

    table = pd.DataFrame([row("sfd", "SFD", 1, 3e12, 9.0), row("sfd", "SFD", 2, 6e12, 8.0),
                          row("pd", "PD", 2, 2.4e13, 14.0),
                          row("pd", "PD (SFD's budget at this NFE: 3e+12 FLOPs)", 1, 3e12, 54.0, 3e12),
                          row("pd", "PD (SFD's budget at this NFE: 6e+12 FLOPs)", 2, 6e12, 21.0, 6e12),
                          row("ddim", "DDIM", 2, None, 180.0)])  # no fine-tuning: not in this plot
    ax = fid_vs_compute(table, "t").axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["SFD", "PD", "PD (SFD's budget)"]
    points = {c.get_label(): c.lines[0] for c in ax.containers}
    budget = points["PD (SFD's budget)"]
    assert list(budget.get_xdata()) == [3e12, 6e12] and list(budget.get_ydata()) == [54.0, 21.0]
    assert budget.get_marker() == "s" and budget.get_markerfacecolor() == "none"  # hollow: equal budget
    assert to_rgba(budget.get_color()) == to_rgba(points["PD"].get_color())  # one colour per method
    assert points["SFD"].get_marker() == "o" and ax.get_xscale() == "log"
    assert ax.get_yscale() == "linear"  # FIDs within 8x of each other (DDIM, not fine-tuned, is left out)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(cli, tiny_results, tmp_path):
    r = cli("report", "--suite", "digits", "--results", str(tiny_results))
    assert r.returncode == 0, r.stderr
    page = tiny_results / "digits" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # opens offline: nothing external
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "sfdbench report: digits" in dom
    assert len(re.findall(r'<tr class="measured">', dom)) == 2  # DDIM 2 and SFD 2
    assert len(re.findall(r'<img class="grid"', dom)) == 2 and '<img class="plot"' in dom
    assert 'id="metadata"' in dom and "torch_fidelity" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_check_catches_a_silently_dropped_step(tmp_path, monkeypatch):
    plan = dict(suite="digits", grid=[("ddim", 10)], seeds=[0, 1], samples=200)
    run(RunPlan(out=tmp_path / "ref", **plan))
    run(RunPlan(out=tmp_path / "same", **plan))
    reference = load_records(tmp_path / "ref", "digits")
    ok = compare(load_records(tmp_path / "same", "digits"), reference)
    assert not failed(ok) and set(ok["status"]) == {"ok"}

    real_euler = solvers.euler

    def euler_dropping_step_3(denoiser, x, sigmas, **kw):
        """Calls the network as often as Euler (so the NFE check passes) but skips one update."""
        for i in range(len(sigmas) - 1):
            d = (x - denoiser(x, sigmas[i])) / sigmas[i]
            if i != 3:
                x = x + (sigmas[i + 1] - sigmas[i]) * d
            yield x

    monkeypatch.setitem(solvers.SOLVERS, "euler", euler_dropping_step_3)
    run(RunPlan(out=tmp_path / "broken", **plan))
    monkeypatch.setitem(solvers.SOLVERS, "euler", real_euler)
    broken = compare(load_records(tmp_path / "broken", "digits"), reference)
    assert failed(broken)
    row = broken[broken["metric"] == "fid"].iloc[0]
    assert row["status"] == "regression" and row["fresh"] > row["reference"] + row["tolerance"]
    assert torch.isfinite(torch.tensor(row["fresh"]))


def test_check_reports_improvements_without_failing():
    ref = pd.DataFrame(dict(method="m", nfe=2, seed=[0, 1], config_hash="h", fid=[10.0, 10.2]))
    better = pd.DataFrame(dict(method="m", nfe=2, seed=[0, 1], config_hash="h", fid=[5.0, 5.1]))
    result = compare(better, ref)
    assert list(result["status"]) == ["improvement"] and not failed(result)
    assert failed(compare(better.assign(config_hash="other"), ref))
    assert failed(compare(better.iloc[0:0], ref))  # missing rows fail
    extra = pd.concat([better, better.assign(method="new")])  # a method the reference does not know
    result = compare(extra, ref)
    assert failed(result) and list(result["status"]) == ["improvement", "no-reference"]


def test_plot_fans_training_free_methods_out_and_keeps_configurations_apart():
    from sfdbench.report.plots import fid_vs_finetuning

    rows = [("solver", "ddim", "DDIM", 0.0), ("solver", "heun", "Heun", 0.0), ("solver", "unipc", "UniPC", 0.0),
            ("distillation", "sfd", "SFD", 0.01), ("distillation", "sfd", "SFD [afs=False]", 0.01)]
    table = pd.DataFrame([{"group": g, "method": m, "display": d, "nfe": 4, "source": "measured", "fid_mean": 5.0,
                           "fid_std": 0.5, "fine_tuning_hours": h} for g, m, d, h in rows])
    fig = fid_vs_finetuning(table, "t")
    ax = fig.axes[0]
    xs = {c.get_label(): float(c.lines[0].get_xdata()[0]) for c in ax.containers}  # one errorbar per series
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{d} (measured)" for _, _, d, _ in rows]  # one series per configuration
    free = sorted(x for label, x in xs.items() if label.split(" (")[0] in ("DDIM", "Heun", "UniPC"))
    assert len(free) == 3 and free[0] < free[1] < free[2]  # fanned out, not on one line
    assert free[0] >= 0.01 * 10**-0.2 * 0.999 and free[2] <= 0.01 * 10**0.2 * 1.001  # within +-0.2 decades of the shift


def test_compute_plot_colours_sfd_with_and_without_guidance_apart():
    from matplotlib.colors import to_rgba

    from sfdbench.report.plots import fid_vs_compute

    table = pd.DataFrame([{"group": "distillation", "method": "sfd", "display": d, "nfe": 2, "source": "measured",
                           "fid_mean": f, "fid_std": 0.5, "fine_tuning_hours": 0.01, "fine_tuning_flops": 6e12,
                           "guidance": w} for d, f, w in (("SFD", 3.2, 1.0), ("SFD (CFG w=1.25)", 7.8, 1.25))])
    ax = fid_vs_compute(table, "t").axes[0]
    colours = {c.get_label(): to_rgba(c.lines[0].get_color()) for c in ax.containers}
    assert set(colours) == {"SFD", "SFD (CFG w=1.25)"} and colours["SFD"] != colours["SFD (CFG w=1.25)"]
