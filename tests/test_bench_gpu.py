"""scripts/bench_gpu.py keeps running: its CPU --smoke mode (tiny network, two gloo processes for the
all-GPU path, torch.compile with the eager backend) end to end, and its arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def test_smoke_run_measures_both_worlds_and_projects(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--modes", "fp32,compile", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                         **__import__("os").environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SMOKE RUN" in r.stdout and "EXTRAPOLATED" in r.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert sorted((row["mode"], row["gpus"]) for row in rows) == [("compile", 1), ("compile", 2), ("fp32", 1),
                                                                   ("fp32", 2)]
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_real_cost

    sfd = bench_real_cost.SFD
    flops = data["flops"]
    per_iteration = sfd["batch"] * ((sfd["M"] + 1) * (sfd["N"] - 1) * flops["flops_forward_per_sample"]
                                    + (sfd["N"] - 1 - int(sfd["afs"])) * flops["flops_forward_backward_per_sample"])
    assert data["sfd_flops_per_iteration"] == per_iteration > 0
    for row in rows:
        assert row["sfd_seconds_per_iteration"] > 0 and row["sample_seconds_per_batch"] > 0
        assert row["batch_per_gpu"] == data["batch"] // row["gpus"]
        assert row["sfd_fit_gpu_hours_measured"] == pytest.approx(
            row["sfd_seconds_per_iteration"] * sfd["iterations"] * row["gpus"] / 3600)
        assert row["sampling_seconds_extrapolated"] == pytest.approx(
            row["sample_seconds_per_batch"] * -(-row["samples_per_gpu"] // row["sample_batch"]))
        assert row["gpu_family"] is None and row["sfd_fit_gpu_hours_projected"] is None  # a CPU has no GPU peak


def test_gpu_families_and_peaks():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_gpu

    assert bench_gpu.gpu_family("NVIDIA H200") == "H200" and bench_gpu.gpu_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert bench_gpu.gpu_family("NVIDIA H100 80GB HBM3") == "H100" and bench_gpu.gpu_family("Tesla V100") is None
    assert bench_gpu.GPU_PEAK["A100"]["fp16 tensor"] == 312e12
    assert bench_gpu.GPU_PEAK["H100"]["fp16 tensor"] > bench_gpu.GPU_PEAK["A100"]["fp16 tensor"]
