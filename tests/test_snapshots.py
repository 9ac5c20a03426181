"""Intermediate checkpoints (``run --snapshot-every``): FID against compute as training proceeds.

The checkpoints observe a fit without changing it (same final weights, same config hash), carry the
accounting up to their iteration, are evaluated on a reduced sample count into ``curves/`` (never into
the tables) and are drawn by ``sfdbench plot``."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from sfdbench.harness.runner import RunPlan, run
from sfdbench.records import load_curves, load_records


def _plan(out, method="sfd", snapshot_every=0, **sets):
    return RunPlan(suite="digits", grid=[(method, 2)], seeds=[0], samples=60, out=out, batch=60,
                   snapshot_every=snapshot_every, snapshot_samples=40,
                   method_overrides={method: {"iterations": 6, "batch": 16, "checkpoint_every": 3, **sets}})


@pytest.mark.slow
def test_sfd_snapshots_observe_the_fit_and_become_curve_records(tmp_path):
    (plain,) = run(_plan(tmp_path / "plain"))
    (snap,) = run(_plan(tmp_path / "snap", snapshot_every=2))
    assert json.loads(plain.read_text())["config_hash"] == json.loads(snap.read_text())["config_hash"]
    (a,) = (tmp_path / "plain").rglob("fits/sfd-nfe2-*/model.safetensors")
    (b,) = (tmp_path / "snap").rglob("fits/sfd-nfe2-*/model.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert all((wa[k] == wb[k]).all() for k in wa)  # taking checkpoints does not change the fit

    curves = load_curves(tmp_path / "snap", "digits")
    assert list(curves["iteration"]) == [2, 4]  # every 2 iterations, the last (6) is the fit itself
    assert (curves["n_samples"] == 40).all() and curves["fid"].notna().all()
    final = json.loads(snap.read_text())["fine_tuning"]
    flops = list(curves["fine_tuning_flops"])
    assert flops[0] < flops[1] < final["flops"]
    assert flops[1] == pytest.approx(final["flops"] * 4 / 6)  # compute up to the checkpoint, not the whole fit
    assert len(load_records(tmp_path / "snap", "digits")) == 1  # tables never see the checkpoints

    from sfdbench.report.assemble import suite_table
    from sfdbench.report.plots import fid_vs_finetuning

    table = suite_table("digits", load_records(tmp_path / "snap", "digits"), tmp_path / "snap", False)
    fig = fid_vs_finetuning(table, "t", curves)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("checkpoints (n=40, reduced)" in label for label in labels)


@pytest.mark.slow
def test_ect_snapshots_hold_the_evaluation_ema(tmp_path):
    run(_plan(tmp_path, method="ect", snapshot_every=3))
    curves = load_curves(tmp_path, "digits")
    assert list(curves["iteration"]) == [3]
    (meta,) = tmp_path.rglob("snapshots/it000003/fit.json")
    fit = json.loads(meta.read_text())
    assert fit["weights"] == "evaluation EMA" and fit["snapshot_iteration"] == 3
    assert fit["teacher_trajectories"] == 3 * 16


def test_bad_snapshot_settings_are_refused(tmp_path):
    from sfdbench.errors import BadInput

    with pytest.raises(BadInput, match="--snapshot-every"):
        run(_plan(tmp_path / "x", snapshot_every=-1))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_pd_snapshots_come_from_the_last_round_with_the_whole_chains_cost(tmp_path):
    plan = RunPlan(suite="digits", grid=[("pd", 2)], seeds=[0], samples=60, out=tmp_path, batch=60, snapshot_every=2,
                   snapshot_samples=40,
                   method_overrides={"pd": {"start_steps": 8, "iterations": 4, "batch": 16, "checkpoint_every": 2}})
    (record,) = run(plan)
    final = json.loads(record.read_text())
    curves = load_curves(tmp_path, "digits")
    assert list(curves["iteration"]) == [2]  # rounds 8 -> 4 -> 2; a checkpoint halfway through the last
    last = final["fit_info"]["stages"][-1]["flops"]
    flops, total = float(curves["fine_tuning_flops"].iloc[0]), final["fine_tuning"]["flops"]
    assert flops == pytest.approx(total - last / 2, rel=1e-6)  # all of round 1, half of round 2
