"""GPU benchmark of the real-size CIFAR-10 teacher: SFD iteration time and 50k-sample NFE-2 sampling
time, measured, next to the projection from FLOPs (``scripts/bench_real_cost.py``).

The network is EDM's CIFAR-10 DDPM++ (``sfdbench.networks.edm.CIFAR10_DDPMPP_CONFIG`` built by
``build_precond``; 55.7M parameters, random weights: timing does not depend on them). One SFD
iteration is sfdbench's own ``sfdbench.methods.sfd.sfd_iteration`` at the paper's NFE-2 setting
(N = 4 timestamps, M = 3, AFS, DPM-Solver++ teacher: 12 teacher forwards and 2 student forward +
backward + Adam steps per trajectory; SFD paper, Algorithm 1; ``docs/algorithms.md#sfd-training-loop``)
on a batch of 128 trajectories, in three modes:

* ``fp32``: float32 (TF32 matmuls off, as PyTorch's default for matmuls);
* ``fp16``: float16 autocast (``sfd_iteration(..., fp16=True)``, the reference trains with ``use_fp16``);
* ``compile``: ``torch.compile`` of teacher and student, float16 autocast.

Sampling: 50,000 samples at NFE 2 (AFS first step, then 2 student Euler steps: 2 network calls per
sample) in float16 autocast and fp32; ``--sample-batches`` batches are timed and the time is
*extrapolated* to 50,000 samples (the output says so).

Each measurement runs on one GPU and, when more are visible, on all of them: SFD with
``DistributedDataParallel`` (global batch 128 split across ranks, as the reference's DDP training),
sampling with 50,000 / G samples per GPU. Seconds are wall time between two barriers with the
device synchronised, after ``--warmup`` untimed repetitions (compilation happens there).

Printed: seconds per SFD iteration, achieved TFLOP/s and the fraction of the GPU's dense peak,
the measured GPU-hours of a full SFD fit (1,563 iterations = 200 kimg at batch 128, x GPUs) next to
the FLOP projection at 20 % / 40 % of peak (A100, H100, H200 dense tensor-core peaks) and the
paper's 0.64 A100-hours; and the 50k-sample time, measured (extrapolated) and projected.

    python scripts/bench_gpu.py                      # on a GPU machine: every mode, 1 and all GPUs
    python scripts/bench_gpu.py --modes fp16 --gpus 1 --json gpu.json
    python scripts/bench_gpu.py --smoke              # CPU, tiny network, 2 gloo processes: the test's run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_real_cost  # noqa: E402  (the FLOP projection and the paper's numbers: one copy)

# Dense (no sparsity) tensor-core peaks in FLOP/s. A100: bench_real_cost.A100_PEAK (A100 datasheet).
# H100 SXM5: 989.4 TFLOP/s FP16/BF16, 494.7 TF32 (NVIDIA H100 datasheet, the "with sparsity"
# figures halved); H200 SXM: the same tensor cores and figures (NVIDIA H200 datasheet).
GPU_PEAK = {
    "A100": bench_real_cost.A100_PEAK,
    "H100": {"fp16 tensor": 989.4e12, "tf32 tensor": 494.7e12},
    "H200": {"fp16 tensor": 989.4e12, "tf32 tensor": 494.7e12},
}
SFD = bench_real_cost.SFD  # N = 4, M = 3, AFS, 1563 iterations at batch 128
SAMPLES = 50_000
SAMPLE_NFE = 2
SMOKE_NET = {"precond_class": "EDMPrecond",
             "init_kwargs": {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
                             "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
                             "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
                             "dropout": 0.13, "use_fp16": False, "img_resolution": 8, "img_channels": 3,
                             "label_dim": 0}}


def gpu_family(name: str) -> str | None:
    """'A100' | 'H100' | 'H200' from a CUDA device name, else None."""
    for family in ("H200", "H100", "A100"):
        if family in name.upper():
            return family
    return None


def build(smoke: bool, device):
    import torch

    from sfdbench.networks.edm import CIFAR10_DDPMPP_CONFIG, build_precond

    spec = SMOKE_NET if smoke else CIFAR10_DDPMPP_CONFIG
    torch.manual_seed(0)
    teacher = build_precond(spec["precond_class"], spec["init_kwargs"]).to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    return teacher, student, (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)


def flops_per_sample(smoke: bool) -> dict:
    """FLOPs of one forward and one forward + backward per sample (torch's flop counter, on CPU)."""
    from sfdbench.methods.training import per_sample_flops

    teacher, student, shape = build(smoke, "cpu")
    return {"flops_forward_per_sample": per_sample_flops(teacher, shape, {}, backward=False),
            "flops_forward_backward_per_sample": per_sample_flops(student, shape, {}, backward=True)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, warmup: int, device, barrier) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` after ``warmup`` untimed calls; each timed call
    starts and ends at a barrier with the device synchronised, so it is the slowest rank's time."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rank: int, world: int, args, port: int, queue) -> None:
    """One process (rank) of one measurement: every mode's SFD iteration and sampling time."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)

    def barrier():
        if world > 1:
            dist.barrier()

    if args.smoke:
        torch.set_num_threads(1)
    results = [measure_mode(mode, rank, world, args, device, barrier) for mode in args.modes]
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        queue.put({"device": name, "results": results})
    if world > 1:
        dist.destroy_process_group()


def measure_mode(mode: str, rank: int, world: int, args, device, barrier) -> dict:
    """One mode (fp32 | fp16 | compile) on this rank: seconds per SFD iteration (the rank's share
    of the global batch, DDP across ranks) and seconds per sampling batch at NFE 2."""
    import torch

    from sfdbench.diffusion.schedules import schedule_for
    from sfdbench.methods.sfd import SFDStepConfig, sfd_iteration, student_euler_step

    teacher, student, shape = build(args.smoke, device)
    fp16 = mode in ("fp16", "compile")
    student_run = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student_run = DistributedDataParallel(student, device_ids=[rank] if device.type == "cuda" else None)
    sampler = student
    if mode == "compile":  # compile the DDP module (PyTorch's recommended order) and the sampler
        teacher = torch.compile(teacher, backend=args.compile_backend)
        student_run = torch.compile(student_run, backend=args.compile_backend)
        sampler = torch.compile(student, backend=args.compile_backend)
    optimizer = torch.optim.Adam(student.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    sigmas = schedule_for("polynomial", SFD["N"], 0.006, 80.0, 7.0).to(device)  # NFE 2: AFS + 2 calls
    cfg = SFDStepConfig(m=SFD["M"], afs=SFD["afs"])
    generator = torch.Generator(device=device).manual_seed(rank)
    batch = args.batch // world

    def iteration():
        latents = torch.randn(batch, *shape, device=device, generator=generator)
        sfd_iteration(student_run, teacher, optimizer, latents, sigmas, cfg, fp16=fp16)

    sfd_seconds = _timed(iteration, args.iterations, args.warmup, device, barrier)
    student.eval()

    def sample():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            x = torch.randn(args.sample_batch, *shape, device=device, generator=generator) * sigmas[0]
            for k in range(len(sigmas) - 1):
                x = student_euler_step(sampler, x, sigmas[k], sigmas[k + 1], analytic=k == 0)
        return x

    batch_seconds = _timed(sample, args.sample_batches, 1, device, barrier)
    per_gpu = math.ceil(args.samples / world)
    return {"mode": mode, "gpus": world, "batch_per_gpu": batch, "sfd_seconds_per_iteration": sfd_seconds,
            "sample_batch": args.sample_batch, "sample_batches_timed": args.sample_batches,
            "sample_seconds_per_batch": batch_seconds, "samples_per_gpu": per_gpu,
            "sampling_seconds_extrapolated": batch_seconds * math.ceil(per_gpu / args.sample_batch)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args) -> dict:
    """``measure`` on ``world`` processes (one per GPU; on CPU in --smoke), rank 0's results."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    if world == 1:
        measure(0, 1, args, port, queue)
    else:
        mp.start_processes(measure, args=(world, args, port, queue), nprocs=world, join=True, start_method="spawn")
    return queue.get()


def report(runs: list[dict], flops: dict, args) -> dict:
    """Rows for printing and JSON: measured next to projected."""
    utilisations = [0.2, 0.4]
    projection = bench_real_cost.sfd_projection(flops, utilisations)
    per_iteration = projection["sfd_nfe2_flops_per_iteration"]
    sampling_flops = args.samples * SAMPLE_NFE * flops["flops_forward_per_sample"]
    rows = []
    for run in runs:
        family = gpu_family(run["device"])
        peaks = GPU_PEAK.get(family)
        for r in run["results"]:
            peak = peaks["fp16 tensor" if r["mode"] in ("fp16", "compile") else "tf32 tensor"] if peaks else None
            achieved = per_iteration / r["sfd_seconds_per_iteration"] / r["gpus"]  # per GPU
            measured_hours = r["sfd_seconds_per_iteration"] * SFD["iterations"] * r["gpus"] / 3600
            rows.append({**r, "device": run["device"], "gpu_family": family,
                         "achieved_tflops_per_gpu": achieved / 1e12,
                         "fraction_of_peak": achieved / peak if peak else None,
                         "sfd_fit_gpu_hours_measured": measured_hours,
                         "sfd_fit_gpu_hours_projected": {
                             f"{u:.0%}": per_iteration * SFD["iterations"] / (peak * u) / 3600 for u in utilisations}
                         if peak else None,
                         "sampling_50k_seconds_projected": {f"{u:.0%}": sampling_flops / (peak * u) / r["gpus"]
                                                            for u in utilisations} if peak else None})
    return {"flops": flops, "sfd_flops_per_iteration": per_iteration,
            "sfd_fit_flops": per_iteration * SFD["iterations"],
            "sampling_50k_flops": sampling_flops, "samples": args.samples, "iterations": SFD["iterations"],
            "batch": args.batch,
            "paper_a100_hours": bench_real_cost.PAPER_SFD_NFE2_A100_HOURS["cifar10"],
            "a100_projection": projection["projections"], "rows": rows, "smoke": args.smoke}


def print_report(out: dict) -> None:
    def num(v, spec):
        return "–" if v is None else format(v, spec)

    smoke = " (SMOKE RUN: a tiny network on the CPU, the numbers mean nothing)" if out["smoke"] else ""
    print(f"\nSFD NFE 2 on the CIFAR-10 DDPM++ network{smoke}: "
          f"{out['sfd_flops_per_iteration'] / 1e12:.2f} TFLOP per iteration (batch {out['batch']}), "
          f"{out['sfd_fit_flops'] / 1e15:.1f} PFLOP per fit ({out['iterations']} iterations); "
          f"paper: {out['paper_a100_hours']} A100-hours.")
    print("\n| device | mode | GPUs | s / SFD iteration | TFLOP/s per GPU | of dense peak | SFD fit GPU-h measured "
          "| projected at 20 % / 40 % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        proj = r["sfd_fit_gpu_hours_projected"]
        print(f"| {r['device']} | {r['mode']} | {r['gpus']} | {r['sfd_seconds_per_iteration']:.4f} | "
              f"{r['achieved_tflops_per_gpu']:.1f} | {num(r['fraction_of_peak'], '.1%')} | "
              f"{r['sfd_fit_gpu_hours_measured']:.3f} | "
              f"{(num(proj['20%'], '.3f') + ' / ' + num(proj['40%'], '.3f')) if proj else '– (no peak known)'} |")
    print(f"\n{out['samples']:,} samples at NFE 2 ({out['sampling_50k_flops'] / 1e15:.2f} PFLOP): a few batches "
          f"measured, the time EXTRAPOLATED to {out['samples']:,} (per GPU: {out['samples']:,} / GPUs):")
    print("| device | mode | GPUs | batch | batches timed | s / batch | all samples, s (extrapolated) "
          "| projected s at 20 % / 40 % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        proj = r["sampling_50k_seconds_projected"]
        print(f"| {r['device']} | {r['mode']} | {r['gpus']} | {r['sample_batch']} | {r['sample_batches_timed']} | "
              f"{r['sample_seconds_per_batch']:.4f} | {r['sampling_seconds_extrapolated']:.1f} | "
              f"{(num(proj['20%'], '.1f') + ' / ' + num(proj['40%'], '.1f')) if proj else '–'} |")
    print("\nA100 projection (bench_real_cost): " + "; ".join(
        f"{p['peak']} at {p['utilisation']:.0%}: {p['sfd_nfe2_a100_hours']:.3f} A100-h"
        for p in out["a100_projection"]), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,fp16,compile", help="comma-separated: fp32, fp16, compile")
    parser.add_argument("--gpus", default="both", choices=["1", "all", "both"],
                        help="one GPU, all visible GPUs, or both (default)")
    parser.add_argument("--batch", type=int, default=SFD["batch"], help="global SFD batch (trajectories)")
    parser.add_argument("--iterations", type=int, default=10, help="timed SFD iterations (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation)")
    parser.add_argument("--sample-batch", type=int, default=1000)
    parser.add_argument("--sample-batches", type=int, default=5, help="timed sampling batches (median)")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples to extrapolate to")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny network, 2 processes (gloo), 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - {"fp32", "fp16", "compile"}
    if unknown:
        parser.error(f"unknown --modes {', '.join(sorted(unknown))}")
    if args.smoke:
        args.batch, args.iterations, args.warmup = 4, 1, 1
        args.sample_batch, args.sample_batches, args.samples = 8, 1, 32
        args.compile_backend = "eager"  # exercises torch.compile's path without a C++ toolchain
    import torch

    available = 2 if args.smoke else torch.cuda.device_count()
    if not args.smoke and available == 0:
        parser.error("no CUDA device visible; use --smoke for the CPU check")
    worlds = {"1": [1], "all": [available], "both": sorted({1, available})}[args.gpus]
    for world in worlds:
        if args.batch % world:
            parser.error(f"--batch {args.batch} does not split across {world} GPUs")
    runs = []
    for world in worlds:
        runs.append(run_world(world, args))
        print(f"measured on {world} {'process' if args.smoke else 'GPU'}(s)", file=sys.stderr)
    out = report(runs, flops_per_sample(args.smoke), args)
    print_report(out)
    if args.json:
        from sfdbench.io import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(out, indent=2) + "\n").encode())
    return out


if __name__ == "__main__":
    main()
