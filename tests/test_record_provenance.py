"""Records say what FID was measured against (a content hash of the reference statistics) and how much
memory sampling and fine-tuning took (per process, with the batch held)."""

from __future__ import annotations

import json

import numpy as np
import torch

from sfdbench.harness.runner import RunPlan, run
from sfdbench.metrics.reference import ReferenceStats


def test_reference_hash_is_the_content_of_mu_and_sigma(tmp_path):
    rng = np.random.default_rng(0)
    ref = ReferenceStats.from_features(torch.as_tensor(rng.normal(size=(50, 4))))
    ref.save(tmp_path / "r.npz")
    again = ReferenceStats.load(tmp_path / "r.npz")
    assert again.sha256() == ref.sha256()  # a file and the statistics in memory hash alike
    moved = ReferenceStats(ref.mu + 1e-12, ref.sigma)
    assert moved.sha256() != ref.sha256()


def test_records_carry_the_reference_hash_and_peak_memory(tmp_path):
    plan = RunPlan(suite="digits", grid=[("sfd", 2)], seeds=[0], samples=40, out=tmp_path, batch=20,
                   method_overrides={"sfd": {"iterations": 2, "batch": 8, "checkpoint_every": 1}})
    (path,) = run(plan)
    record = json.loads(path.read_text())
    from sfdbench.suites import get_suite

    assert record["reference_statistics"]["sha256"] == get_suite("digits").reference().sha256()
    assert record["sampling"]["peak_memory"]["bytes"] > 0 and record["sampling"]["peak_memory"]["batch"] == 20
    (fit,) = tmp_path.rglob("fits/sfd-nfe2-*/fit.json")
    memory = json.loads(fit.read_text())["peak_memory"]
    assert memory["bytes"] > 0 and memory["batch_per_process"] == 8
