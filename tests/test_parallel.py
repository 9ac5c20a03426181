"""Several processes (torchrun, gloo on CPU): results do not depend on how many.

* sampling with 1 and 2 processes gives bit-identical samples (the .npz shards) and metrics;
* an SFD fit with 1 and 2 processes at the same global batch gives the same weights up to float
  summation order (measured: max |diff| 3.5e-6 after 6 iterations; asserted <= 1e-4) — dropout masks
  included, because they are drawn for the global batch;
* killing one process mid-fit and rerunning resumes from the checkpoint and finishes with the weights
  of an uninterrupted 2-process fit;
* the pieces (row shards, global-batch dropout) against their single-process definitions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sfdbench import parallel

SAMPLING = ["--suite", "digits", "--methods", "dpmpp3m", "--nfe", "3", "--seeds", "0", "--samples", "200",
            "--batch", "48", "--save-samples"]
FIT = ["--suite", "digits", "--methods", "sfd", "--nfe", "2", "--seeds", "0", "--samples", "100", "--batch", "50",
       "--set", "sfd.iterations=6", "--set", "sfd.checkpoint_every=3", "--set", "sfd.batch=32"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sfdbench(*args: str, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    extra = ["--devices", str(devices)] if devices > 1 else []
    proc = subprocess.run([sys.executable, "-m", "sfdbench", "run", *args, *extra], capture_output=True, text=True,
                          env=_env(), timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _record(out: Path) -> dict:
    (path,) = (out / "digits" / "records").glob("*.json")
    return json.loads(path.read_text())


def _weights(out: Path, method: str = "sfd") -> dict:
    (path,) = (out / "digits" / "fits").glob(f"{method}-nfe*/model.safetensors")
    return load_file(path)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("total,k", [(10, 3), (128, 2), (5, 8), (7, 1)])
def test_row_shards_partition_the_batch_in_order(total, k):
    shards = [parallel.shard_rows(total, k, r) for r in range(k)]
    rows = [i for s in shards for i in range(total)[s]]
    assert rows == list(range(total))
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_global_batch_dropout_gives_each_row_its_single_process_mask():
    x = torch.randn(6, 4, 5, 5)
    torch.manual_seed(11)
    whole = F.dropout(x, 0.3, True)
    parts = []
    for rows in (parallel.shard_rows(6, 2, 0), parallel.shard_rows(6, 2, 1)):
        torch.manual_seed(11)  # every process starts the iteration from the same seed
        with parallel.GlobalBatchDropout(rows, 6):
            parts.append(torch.nn.Dropout(0.3).train()(x[rows]))
    assert torch.equal(torch.cat(parts), whole)
    torch.manual_seed(11)  # without the mode the second half would get the first half's mask
    assert not torch.equal(F.dropout(x[3:], 0.3, True), whole[3:])


def test_one_process_is_not_distributed():
    assert parallel.world() == 1 and parallel.rank() == 0 and parallel.is_main()
    assert parallel.sum_over_processes([1.0, 2.0]) == [1.0, 2.0]
    assert parallel.gather_to_main({"a": 1}) == [{"a": 1}]
    with parallel.solo():
        assert parallel.world() == 1


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_sampling_with_two_processes_equals_one_bit_for_bit(tmp_path):
    sfdbench(*SAMPLING, "--out", str(tmp_path / "one"))
    sfdbench(*SAMPLING, "--out", str(tmp_path / "two"), devices=2)
    one, two = _record(tmp_path / "one"), _record(tmp_path / "two")
    assert one["config_hash"] == two["config_hash"]
    assert one["metrics"] == two["metrics"]
    assert (one["sampling"]["devices"], two["sampling"]["devices"]) == (1, 2)
    assert one["nfe_counted"] == two["nfe_counted"] == 3
    shards = sorted((tmp_path / "one" / "digits" / "samples").rglob("*.npz"))
    assert len(shards) == 5  # 200 samples in batches of 48
    for path in shards:
        a, b = np.load(path), np.load(tmp_path / "two" / path.relative_to(tmp_path / "one"))
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["index"], b["index"])


@pytest.mark.slow
def test_sfd_fit_with_two_processes_equals_one_and_counts_both_devices(tmp_path):
    sfdbench(*FIT, "--out", str(tmp_path / "one"))
    sfdbench(*FIT, "--out", str(tmp_path / "two"), devices=2)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) <= 1e-4
    one, two = _record(tmp_path / "one")["fine_tuning"], _record(tmp_path / "two")["fine_tuning"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["device_hours"] == pytest.approx(2 * two["wall_seconds"] / 3600)
    assert one["flops"] == two["flops"]  # the same work, counted over both processes


def _worker_pids(launcher: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun workers under ``launcher`` (read from /proc)."""
    out = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"].strip()) != launcher:
                continue
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, KeyError, ValueError):
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                out[int(item.split(b"=", 1)[1])] = int(status.parent.name)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_killing_one_process_mid_fit_then_rerunning_resumes_and_finishes(tmp_path):
    longer = [a.replace("sfd.iterations=6", "sfd.iterations=16").replace("checkpoint_every=3", "checkpoint_every=4")
              for a in FIT]
    sfdbench(*longer, "--out", str(tmp_path / "whole"), devices=2)
    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "sfdbench", "run", *longer, "--out", str(out)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("digits/fits/sfd-*/checkpoint.pt")):
        assert launcher.poll() is None, "the fit ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)  # process 1 (not the writer) dies mid-fit
    assert launcher.wait(timeout=300) != 0
    assert not list(out.glob("digits/fits/sfd-*/model.safetensors"))
    checkpoint = torch.load(next(out.glob("digits/fits/sfd-*/checkpoint.pt")), weights_only=True)
    assert 0 < checkpoint["iteration"] < 16
    sfdbench(*longer, "--out", str(out), devices=2)
    assert _max_diff(_weights(tmp_path / "whole"), _weights(out)) == 0.0


# ------------------------------------------------------------------------------------------ seed blocks


def _plan(tmp_path, **kw):
    from sfdbench.harness.runner import RunPlan

    return RunPlan(suite="digits", grid=[("dpmpp3m", 2)], out=tmp_path, batch=50, save_samples=True,
                   **{"seeds": [0], **kw})


def test_seed_block_b_is_samples_b_n_to_b_n_plus_n(tmp_path):
    """EDM's --seeds convention: block 1 at n = 50 is samples 50..99, the second half of block 0 at n = 100."""
    from sfdbench.harness.runner import run

    (whole,) = run(_plan(tmp_path / "a", samples=100, seed_blocks=[0]))
    (block,) = run(_plan(tmp_path / "b", samples=50, seed_blocks=[1]))
    (seed1,) = run(_plan(tmp_path / "c", samples=50, seeds=[1]))
    record = json.loads(block.read_text())
    assert record["seed_block"] == 1 and record["seed"] == 1 and "block1" in block.name
    assert record["sampling"]["noise_seeds"].startswith("50 + i for i < 50")
    assert json.loads(seed1.read_text())["config_hash"] != record["config_hash"]  # not the same replicate
    (a,) = (tmp_path / "a").rglob("batch000001.npz")
    (b,) = (tmp_path / "b").rglob("batch000000.npz")
    (c,) = (tmp_path / "c").rglob("batch000000.npz")
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"])
    assert np.array_equal(np.load(b)["index"], np.arange(50, 100))
    assert not np.array_equal(np.load(b)["images"], np.load(c)["images"])  # run seed 1 is other noise


@pytest.mark.parametrize("blocks,samples", [([-1], 10), ([], 10), ([1000], 50_000)])
def test_bad_seed_blocks_are_refused_before_anything_is_written(tmp_path, blocks, samples):
    from sfdbench.errors import BadInput
    from sfdbench.harness.runner import run

    with pytest.raises(BadInput, match="--seed-blocks"):
        run(_plan(tmp_path / "x", samples=samples, seed_blocks=blocks))
    assert not (tmp_path / "x").exists()
