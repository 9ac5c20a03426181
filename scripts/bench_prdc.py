"""Benchmark: sfdbench's tiled density/coverage (sfdbench.metrics.knn.prdc) vs the ``prdc`` package.

Each (implementation, size) runs in its own Python process so that peak memory is not shared:
features are generated first (float32, like Inception pool3 outputs), the kernel's peak RSS is reset
(``/proc/self/clear_refs``), the metric is computed, and ``VmHWM`` minus the RSS before the call is
the peak memory the metric itself needed.

    nice python scripts/bench_prdc.py                    # 10k x 2048 both, then 50k x 2048 ours
    nice python scripts/bench_prdc.py --sizes 2000 --big 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(impl: str, n: int, dim: int, k: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    real = rng.standard_normal((n, dim), dtype=np.float32)
    fake = rng.standard_normal((n, dim), dtype=np.float32) * 1.05 + 0.02
    if impl == "ours":
        import torch

        from sfdbench.metrics.knn import prdc

        real, fake = torch.from_numpy(real), torch.from_numpy(fake)
        fn = prdc
    else:
        from prdc import compute_prdc

        def fn(r, f, kk):
            with contextlib.redirect_stdout(io.StringIO()):
                return compute_prdc(r, f, kk)

    reset = _reset_peak()
    rss_before = _status_kb("VmRSS")
    start = time.perf_counter()
    values = {key: float(v) for key, v in fn(real, fake, k).items()}
    seconds = time.perf_counter() - start
    hwm = _status_kb("VmHWM")
    return {"impl": impl, "n": n, "dim": dim, "seconds": seconds, "peak_increase_mb": (hwm - rss_before) / 1024,
            "peak_rss_mb": hwm / 1024, "inputs_mb": 2 * n * dim * 4 / 2**20, "hwm_reset": reset, **values}


def run_worker(impl: str, n: int, dim: int, k: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--dim", str(dim), "--k", str(k),
           "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000], help="n for the ours-vs-prdc comparison")
    ap.add_argument("--big", type=int, default=50_000, help="n for ours alone (0: skip)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["ours", "prdc"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.dim, args.k, args.seed)))
        return
    rows = []
    for n in args.sizes:
        for impl in ("ours", "prdc"):
            rows.append(run_worker(impl, n, args.dim, args.k, args.seed))
            print(f"done {impl} n={n}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    if args.big:
        rows.append(run_worker("ours", args.big, args.dim, args.k, args.seed))
    keys = ("precision", "recall", "density", "coverage")
    print(f"{'impl':<5} {'n':>6} {'dim':>5} {'time s':>8} {'peak +MB':>9} {'peak RSS MB':>11} {'inputs MB':>9}  "
          f"{'precision':>9} {'recall':>7} {'density':>8} {'coverage':>8}")
    for r in rows:
        print(f"{r['impl']:<5} {r['n']:>6} {r['dim']:>5} {r['seconds']:>8.1f} {r['peak_increase_mb']:>9.0f} "
              f"{r['peak_rss_mb']:>11.0f} {r['inputs_mb']:>9.0f}  {r['precision']:>9.4f} {r['recall']:>7.4f} "
              f"{r['density']:>8.4f} {r['coverage']:>8.4f}")
    for n in args.sizes:
        ours = next(r for r in rows if r["impl"] == "ours" and r["n"] == n)
        ref = next(r for r in rows if r["impl"] == "prdc" and r["n"] == n)
        diff = max(abs(ours[key] - ref[key]) for key in keys)
        print(f"n={n}: time ours/prdc = {ours['seconds'] / ref['seconds']:.2f}, peak memory ours/prdc = "
              f"{ours['peak_increase_mb'] / ref['peak_increase_mb']:.3f}, max |ours - prdc| = {diff:.2e} "
              "(prdc rounds float32-input distances to float32)")


if __name__ == "__main__":
    main()
