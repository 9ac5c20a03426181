"""1 vs 2 gloo processes at the digits recipe: sampling (dpmpp3m NFE 5, 1000 samples) and an SFD NFE 2 fit
(digits recipe), plus a 2-process SFD fit killed mid-way (process 1, SIGKILL) and resumed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
from safetensors.torch import load_file

ROOT = Path("/work/p15"); env = {**os.environ, "OMP_NUM_THREADS": "1"}
SAMPLE = ["--suite", "digits", "--methods", "dpmpp3m", "--nfe", "5", "--seeds", "0", "--batch", "100", "--save-samples"]
FIT = ["--suite", "digits", "--methods", "sfd", "--nfe", "2", "--seeds", "0", "--batch", "100"]

def run(args, out, devices=1):
    extra = ["--devices", str(devices)] if devices > 1 else []
    t = time.time(); p = subprocess.run([sys.executable, "-m", "sfdbench", "run", *args, "--out", str(ROOT / out), *extra], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return time.time() - t

def rec(out):
    (p,) = (ROOT / out / "digits" / "records").glob("*.json"); return json.loads(p.read_text())

def weights(out):
    (p,) = (ROOT / out / "digits" / "fits").glob("sfd-nfe2-*/model.safetensors"); return load_file(p)

def maxdiff(a, b): return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

res = {}
res["sample_1_s"] = run(SAMPLE, "s1"); res["sample_2_s"] = run(SAMPLE, "s2", 2)
a, b = rec("s1"), rec("s2")
res["sample_metrics_equal"] = a["metrics"] == b["metrics"]; res["sample_fid"] = [a["metrics"]["fid"], b["metrics"]["fid"]]
diffs = []
for f in sorted((ROOT / "s1").rglob("*.npz")):
    x, y = np.load(f), np.load(ROOT / "s2" / f.relative_to(ROOT / "s1"))
    diffs.append(int(np.abs(x["images"].astype(int) - y["images"].astype(int)).max()))
res["sample_max_abs_pixel_diff"] = max(diffs); res["shards"] = len(diffs)
res["fit_1_s"] = run(FIT, "f1"); res["fit_2_s"] = run(FIT, "f2", 2)
res["fit_weights_max_abs_diff"] = maxdiff(weights("f1"), weights("f2"))
r1, r2 = rec("f1"), rec("f2")
res["fit_fid"] = [r1["metrics"]["fid"], r2["metrics"]["fid"]]
res["fit_devices"] = [r1["fine_tuning"]["devices"], r2["fine_tuning"]["devices"]]
res["fit_device_hours"] = [r1["fine_tuning"]["device_hours"], r2["fine_tuning"]["device_hours"]]
res["fit_flops"] = [r1["fine_tuning"]["flops"], r2["fine_tuning"]["flops"]]
# kill process 1 mid-fit, then resume
out = ROOT / "fk"
launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sfdbench", "run", *FIT, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    ck = list(out.glob("digits/fits/sfd-*/checkpoint.pt"))
    if ck: break
    time.sleep(0.1)
time.sleep(5)
import torch
it = torch.load(ck[0], weights_only=True)["iteration"]
kids = {}
for st in Path("/proc").glob("[0-9]*/status"):
    try:
        f = dict(l.split(":\t", 1) for l in st.read_text().splitlines() if ":\t" in l)
        if int(f["PPid"]) == launcher.pid:
            for item in (st.parent / "environ").read_bytes().split(b"\0"):
                if item.startswith(b"LOCAL_RANK="): kids[int(item[11:])] = int(st.parent.name)
    except Exception: pass
os.kill(kids[1], signal.SIGKILL); rc = launcher.wait()
res["kill"] = {"killed": "process 1 (SIGKILL)", "torchrun_exit": rc, "checkpoint_iteration_at_kill": it}
res["resume_s"] = run(FIT, "fk", 2)
res["resumed_vs_uninterrupted_2proc_max_abs_diff"] = maxdiff(weights("f2"), weights("fk"))
res["resumed_fid"] = rec("fk")["metrics"]["fid"]
(ROOT / "result.json").write_text(json.dumps(res, indent=2)); print(json.dumps(res, indent=2))
