"""Peak host memory of evaluating N samples of the ms_coco suite, streaming vs keeping the images.

A tiny random Stable Diffusion pipeline (tests/latent_tiny.py) whose VAE decodes 4x16x16 latents to
3x512x512 images (the real suite's image size), DDIM at 2 steps with guidance 7.5, the stand-in Inception
weights and a tiny random open_clip model. Each measurement runs in a fresh process and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set size) after sampling, decoding and
evaluating N samples in batches of 16:

* ``stream``: ``harness.sampling.generate_rows`` (per batch ``suite.summarize``; rows kept) then
  ``suite.evaluate_summaries``;
* ``keep``: the same batches, but every decoded uint8 image kept (what a non-streaming suite holds).

Usage: ``python scripts/latent_memory.py 32 256`` (prints one line per (mode, N)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(n: int, mode: str, work: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import dataclasses
    import resource

    import numpy as np
    import torch
    from latent_tiny import PROMPTS, tiny_clip, write_sd
    from standin_weights import write_standin_inception

    from sfdbench.diffusion import solvers
    from sfdbench.diffusion.schedules import schedule_for
    from sfdbench.harness.sampling import _counting_views, _sample_batch, generate_rows
    from sfdbench.methods.base import Fitted
    from sfdbench.suites import assets
    from sfdbench.suites.latent import ms_coco

    torch.set_num_threads(1)
    inception = assets.ASSETS["inception-v3-compat"]
    assets.ASSETS["inception-v3-compat"] = dataclasses.replace(inception, sha256_prefix=None)
    if not (work / "cache" / "assets" / inception.filename).is_file():
        write_standin_inception(work / "cache" / "assets", filename=inception.filename)
    captions = assets.ASSETS["ms-coco-captions-30k"].path
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text("id,text\n" + "".join(f"{i},\"{p}\"\n" for i, p in enumerate(PROMPTS)))
    folder = work / "sd512"
    if not folder.is_dir():
        write_sd(folder, latent=16, vae_blocks=6)
    suite = ms_coco((4, 16, 16), 512)
    suite.clip_loader = tiny_clip
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64)) * 0.1
    suite.reference_path().parent.mkdir(parents=True, exist_ok=True)
    np.savez(suite.reference_path(), mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T + 0.01 * np.eye(2048))
    teacher = suite.load_teacher(folder)
    sigmas = schedule_for("discrete", 3, suite.sigma_min, suite.sigma_max, 1.0, suite.discrete_vp)
    fitted = Fitted(denoiser=teacher, sample=solvers.sampler(solvers.euler, sigmas), nfe=2)
    batch = 16
    if mode == "stream":
        rows, stats = generate_rows(fitted, suite, 0, n, batch, "cpu", 7.5)
        metrics = suite.evaluate_summaries(rows)
        held = sum(v.numel() * v.element_size() for v in rows.values())
    else:
        _, view = _counting_views(fitted, suite, 7.5)
        kept = []
        for start in range(0, n, batch):
            images, cond, _ = _sample_batch(fitted, suite, view, 0, start, min(batch, n - start), "cpu")
            kept.append(images)
        images = torch.cat(kept)
        metrics = {"fid": None}
        held = images.numel()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n": n, "peak_rss_mib": round(peak_kib / 1024, 1), "held_mib": round(held / 2**20, 2),
            "fid": metrics.get("fid"), "clip_score": metrics.get("clip_score")}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))))
        return
    sizes = [int(a) for a in sys.argv[1:]] or [32, 256]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SFDBENCH_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
        for mode in ("stream", "keep"):
            for n in sizes:
                res = subprocess.run([sys.executable, __file__, "--one", str(n), mode, tmp], env=env,
                                     capture_output=True, text=True)
                print(res.stdout.strip().splitlines()[-1] if res.returncode == 0 else res.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
