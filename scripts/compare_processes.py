"""1 vs 2 gloo processes at the digits recipe: sampling (dpmpp3m NFE 5, 1,000 samples) and an SFD NFE 2
fit (the digits recipe), plus a 2-process SFD fit whose process 1 is killed (SIGKILL) mid-fit and which
is then resumed by rerunning the command.

    python scripts/compare_processes.py [OUT_DIR]     # default runs/compare-processes; Linux (/proc)

Prints and writes OUT_DIR/result.json (the committed one: results/reference/parallel/)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compare-processes").resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAMPLE = ["--suite", "digits", "--methods", "dpmpp3m", "--nfe", "5", "--seeds", "0", "--batch", "100",
          "--save-samples"]
FIT = ["--suite", "digits", "--methods", "sfd", "--nfe", "2", "--seeds", "0", "--batch", "100"]


def run(args: list[str], out: str, devices: int = 1) -> float:
    extra = ["--devices", str(devices)] if devices > 1 else []
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "sfdbench", "run", *args, "--out", str(ROOT / out), *extra],
                          env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.time() - start


def record(out: str) -> dict:
    (path,) = (ROOT / out / "digits" / "records").glob("*.json")
    return json.loads(path.read_text())


def weights(out: str) -> dict:
    (path,) = (ROOT / out / "digits" / "fits").glob("sfd-nfe2-*/model.safetensors")
    return load_file(path)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def worker_pids(launcher: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's workers (from /proc)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"]) != launcher:
                continue
            for item in (status.parent / "environ").read_bytes().split(b"\0"):
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item[len(b"LOCAL_RANK="):])] = int(status.parent.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def sampling(res: dict) -> None:
    res["sample_1_s"], res["sample_2_s"] = run(SAMPLE, "s1"), run(SAMPLE, "s2", 2)
    a, b = record("s1"), record("s2")
    res["sample_metrics_equal"] = a["metrics"] == b["metrics"]
    res["sample_fid"] = [a["metrics"]["fid"], b["metrics"]["fid"]]
    diffs = []
    for path in sorted((ROOT / "s1").rglob("*.npz")):
        x, y = np.load(path), np.load(ROOT / "s2" / path.relative_to(ROOT / "s1"))
        diffs.append(int(np.abs(x["images"].astype(int) - y["images"].astype(int)).max()))
    res["sample_max_abs_pixel_diff"], res["shards"] = max(diffs), len(diffs)


def fitting(res: dict) -> None:
    res["fit_1_s"], res["fit_2_s"] = run(FIT, "f1"), run(FIT, "f2", 2)
    res["fit_weights_max_abs_diff"] = max_diff(weights("f1"), weights("f2"))
    one, two = record("f1"), record("f2")
    res["fit_fid"] = [one["metrics"]["fid"], two["metrics"]["fid"]]
    for key in ("devices", "device_hours", "flops"):
        res[f"fit_{key}"] = [one["fine_tuning"][key], two["fine_tuning"][key]]


def kill_and_resume(res: dict) -> None:
    out = ROOT / "fk"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "sfdbench", "run", *FIT, "--out", str(out)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (checkpoints := list(out.glob("digits/fits/sfd-*/checkpoint.pt"))):
        time.sleep(0.1)
    time.sleep(5)  # well into the fit
    iteration = torch.load(checkpoints[0], weights_only=True)["iteration"]
    os.kill(worker_pids(launcher.pid)[1], signal.SIGKILL)
    res["kill"] = {"killed": "process 1 (SIGKILL)", "torchrun_exit": launcher.wait(),
                   "checkpoint_iteration_at_kill": iteration}
    res["resume_s"] = run(FIT, "fk", 2)
    res["resumed_vs_uninterrupted_2proc_max_abs_diff"] = max_diff(weights("f2"), weights("fk"))
    res["resumed_fid"] = record("fk")["metrics"]["fid"]


def main() -> None:
    res: dict = {}
    sampling(res)
    fitting(res)
    kill_and_resume(res)
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
