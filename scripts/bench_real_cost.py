"""Cost of the paper's real-size teachers, measured on this machine and projected to an A100.

For each released EDM teacher configuration (CIFAR-10 DDPM++ 56M, ImageNet-64 ADM 296M) built with
random weights in fp32 on the CPU, in its own Python process (so peak memory is not shared):

* FLOPs of one forward and of one forward + backward per sample, counted by torch's own
  ``torch.utils.flop_counter.FlopCounterMode`` (``sfdbench.methods.training.per_sample_flops``, the
  function that also counts fine-tuning FLOPs in run records);
* wall milliseconds per forward and per forward + backward at ``--batch`` (median of ``--repeats``);
* peak resident memory of the first (cold) forward and forward + backward, each in a fresh process
  (``VmHWM`` after resetting it via ``/proc/self/clear_refs``, minus the resident size before the
  call), and the process's peak (weights, gradients and activations together).

Then, from FLOPs alone (the paper's settings, ``docs/suites.md#cost-model``):

* one first-stage SFD iteration at NFE 2 = batch x (teacher trajectory: (M + 1)(N - 1) forwards with
  N = 4, M = 3, i.e. 12; student: N - 1 - AFS = 2 forward + backward);
* SFD NFE 2 on CIFAR-10 = 1563 iterations (200 kimg at batch 128) -> A100-hours at the stated
  utilisations of the A100's dense peak (312 TFLOP/s fp16 tensor cores: the reference trains with
  ``use_fp16``; 156 TFLOP/s TF32), next to the paper's 0.64 (and 3.34 on ImageNet-64) A100-hours;
* 50,000 samples at NFE 2 (2 forwards each).

    nice python scripts/bench_real_cost.py                       # both configs, batch 2
    nice python scripts/bench_real_cost.py --configs cifar10 --batch 4 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

A100_PEAK = {"fp16 tensor": 312e12, "tf32 tensor": 156e12}
PAPER_SFD_NFE2_A100_HOURS = {"cifar10": 0.64, "imagenet64": 3.34}  # SFD paper, Tables 2 and 3
SFD = {"N": 4, "M": 3, "afs": True, "iterations": 1563, "batch": 128}  # NFE 2, 200 kimg at batch 128


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(fn) -> tuple[float, float]:
    """(seconds, peak MiB above the resident size before) of one call of ``fn``."""
    before = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (_status_kb("VmHWM") - before) / 1024


def measure(config: str, mode: str, batch: int, repeats: int, threads: int) -> dict:
    """One configuration and one ``mode`` (forward | forward_backward), in this process: the first
    (cold) call gives the peak memory above the resident size before it, the next ``repeats`` the
    median time."""
    import torch

    from sfdbench.methods.training import per_sample_flops
    from sfdbench.networks.edm import CIFAR10_DDPMPP_CONFIG, IMAGENET64_ADM_CONFIG, build_precond

    torch.set_num_threads(threads)
    spec = {"cifar10": CIFAR10_DDPMPP_CONFIG, "imagenet64": IMAGENET64_ADM_CONFIG}[config]
    torch.manual_seed(0)
    net = build_precond(spec["precond_class"], spec["init_kwargs"])
    label_dim = net.label_dim
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    cond = {"class_labels": torch.eye(label_dim)[:batch]} if label_dim else {}
    x = torch.randn(batch, *shape)
    sigma = torch.full((batch,), 1.0)
    backward = mode == "forward_backward"
    net.train(backward).requires_grad_(backward)

    def call():
        if backward:
            out = net(x, sigma, **cond)
            out.float().square().mean().backward()
            net.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                net(x, sigma, **cond)

    _, cold_peak = _peak_mib(call)
    times = [_peak_mib(call)[0] for _ in range(repeats)]
    cond_one = {"class_labels": torch.eye(label_dim)[:1]} if label_dim else {}
    flops = per_sample_flops(net, shape, cond_one, backward=backward)
    ms = 1e3 * statistics.median(times)
    return {"config": config, "parameters": sum(p.numel() for p in net.parameters()), "image_shape": list(shape),
            "label_dim": label_dim, "batch": batch, "threads": threads, "repeats": repeats,
            f"flops_{mode}_per_sample": flops, f"cpu_ms_{mode}": ms, f"peak_mib_{mode}": cold_peak,
            f"process_peak_mib_{mode}": _status_kb("VmHWM") / 1024,
            f"achieved_cpu_gflops_{mode}": flops * batch / (ms / 1e3) / 1e9}


def sfd_projection(m: dict, utilisations: list[float]) -> dict:
    """FLOPs of SFD NFE 2 (the paper's CIFAR-10 length) and of 50k samples at NFE 2 -> A100 time."""
    teacher_nfe = (SFD["M"] + 1) * (SFD["N"] - 1)
    student_steps = SFD["N"] - 1 - int(SFD["afs"])
    per_iteration = SFD["batch"] * (teacher_nfe * m["flops_forward_per_sample"]
                                    + student_steps * m["flops_forward_backward_per_sample"])
    total = per_iteration * SFD["iterations"]
    sampling = 50_000 * 2 * m["flops_forward_per_sample"]
    out = {"sfd_nfe2_flops_per_iteration": per_iteration, "sfd_nfe2_total_flops": total,
           "sampling_50k_nfe2_flops": sampling, "teacher_forwards_per_trajectory": teacher_nfe,
           "student_forward_backward_per_trajectory": student_steps, "projections": []}
    for peak_name, peak in A100_PEAK.items():
        for u in utilisations:
            out["projections"].append({"peak": peak_name, "utilisation": u,
                                       "sfd_nfe2_a100_hours": total / (peak * u) / 3600,
                                       "sampling_50k_nfe2_a100_seconds": sampling / (peak * u)})
    return out


def print_report(results: list[dict], utilisations: list[float]) -> None:
    print("\n| config | params | GFLOP fwd / sample | GFLOP fwd+bwd / sample | CPU ms fwd | CPU ms fwd+bwd | "
          "peak MiB fwd | peak MiB fwd+bwd | process peak MiB fwd / fwd+bwd | CPU GFLOP/s fwd / fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in results:
        print(f"| {m['config']} (batch {m['batch']}, {m['threads']} threads) | {m['parameters']:,} | "
              f"{m['flops_forward_per_sample'] / 1e9:.2f} | {m['flops_forward_backward_per_sample'] / 1e9:.2f} | "
              f"{m['cpu_ms_forward']:.0f} | {m['cpu_ms_forward_backward']:.0f} | {m['peak_mib_forward']:.0f} | "
              f"{m['peak_mib_forward_backward']:.0f} | {m['process_peak_mib_forward']:.0f} / "
              f"{m['process_peak_mib_forward_backward']:.0f} | {m['achieved_cpu_gflops_forward']:.1f} / "
              f"{m['achieved_cpu_gflops_forward_backward']:.1f} |")
    for m in results:
        p = m["projection"]
        print(f"\n{m['config']}: SFD NFE 2 = {p['sfd_nfe2_total_flops'] / 1e15:.1f} PFLOP "
              f"({SFD['iterations']} iterations x {SFD['batch']} trajectories x "
              f"({p['teacher_forwards_per_trajectory']} teacher forwards + "
              f"{p['student_forward_backward_per_trajectory']} student fwd+bwd)); "
              f"50k samples at NFE 2 = {p['sampling_50k_nfe2_flops'] / 1e15:.2f} PFLOP")
        print("| A100 peak | utilisation | SFD NFE 2 (A100-hours) | paper (A100-hours) | 50k samples NFE 2 (s) |")
        print("|---|---|---|---|---|")
        for row in p["projections"]:
            paper = PAPER_SFD_NFE2_A100_HOURS.get(m["config"], "–")
            print(f"| {row['peak']} | {row['utilisation']:.0%} | {row['sfd_nfe2_a100_hours']:.3f} | {paper} | "
                  f"{row['sampling_50k_nfe2_a100_seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cifar10,imagenet64")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--utilisation", default="0.2,0.4", help="comma-separated fractions of the A100's peak")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        threads = args.threads or torch.get_num_threads()
        config, mode = args.child.split(":")
        print(json.dumps(measure(config, mode, args.batch, args.repeats, threads)))
        return
    utilisations = [float(u) for u in args.utilisation.split(",")]
    results = []
    for config in args.configs.split(","):
        m = {}
        for mode in ("forward", "forward_backward"):
            cmd = [sys.executable, __file__, "--child", f"{config}:{mode}", "--batch", str(args.batch), "--repeats",
                   str(args.repeats), "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            m.update(json.loads(done.stdout.strip().splitlines()[-1]))
        m["projection"] = sfd_projection(m, utilisations)
        results.append(m)
        print(f"measured {config}", file=sys.stderr)
    print_report(results, utilisations)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
