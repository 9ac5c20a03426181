"""Fine-tuning infrastructure shared by every distillation method: compute accounting, the
seeded, checkpointed, resumable training loop, and the model files of a fitted student.

The loop knows nothing of a particular method: a method hands it a ``step`` (one iteration on one
batch of latents and conditioning) and a learning-rate rule. Accounting follows the project's
convention (``docs/architecture.md``, "Compute accounting"): wall time of the whole loop, teacher
work included, the device, the device count and device-hours = wall x devices, and the teacher
evaluations counted by wrapping the teacher, and the floating-point operations: torch's own
FLOP counter (``torch.utils.flop_counter.FlopCounterMode``) measures one teacher forward and one
student forward + backward per sample once per fit, and the loop multiplies them by the counted
evaluations, so costs compare across machines where wall time cannot.
"""

from __future__ import annotations

import io
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sfdbench import parallel
from sfdbench.diffusion.denoiser import CountingDenoiser, Denoiser
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.networks.adapters import is_step_conditioned
from sfdbench.networks.checkpoint import read_metadata, save_weights

PRECISIONS = ("fp32", "fp16-autocast")
STUDENT_KIND = "sfdbench-student"


# ---------------------------------------------------------------------------------------------
# Compute accounting


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass
class Accounting:
    wall_seconds: float
    device: str
    devices: int
    flops: float | None = None  # fine-tuning FLOPs (teacher trajectories included); None: not counted

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.devices / 3600.0

    def to_dict(self) -> dict:
        return {**asdict(self), "device_hours": self.device_hours}


def per_sample_flops(model: torch.nn.Module, latent_shape: tuple[int, ...], cond: dict, backward: bool,
                     device: torch.device | str = "cpu") -> int:
    """FLOPs of one call of denoiser ``model`` on one sample (``backward``: forward + the backward
    pass to every trainable parameter), counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matrix multiplications and convolutions, multiply-add = 2 FLOPs). Gradients are taken with
    ``torch.autograd.grad``, so nothing accumulates in ``.grad``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *latent_shape, device=device)
    sigma = torch.ones(1, device=device)
    params = [p for p in model.parameters() if p.requires_grad] if backward else []
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(bool(params)):
            out = model(x, sigma, **cond)
            if params:
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    return int(counter.get_total_flops())


class EvaluationCounter:
    """Counts the samples a module is called on (a forward hook; ``remove()`` detaches it)."""

    def __init__(self, module: torch.nn.Module):
        self.samples = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.samples += int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0

    def remove(self) -> None:
        self._handle.remove()


class Stopwatch:
    """Accumulates wall time over (possibly resumed) sessions of work."""

    def __init__(self, already: float = 0.0):
        self.already = already
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of a method's hyperparameters."""

    iterations: int
    batch: int
    fit_seed: int
    checkpoint_every: int
    precision: str = "fp32"
    # stop once the fine-tuning FLOPs (teacher + student, as counted) reach this (the equal-budget rows)
    budget_flops: float | None = None

    @classmethod
    def from_hyperparameters(cls, hp: dict) -> LoopSettings:
        return cls(hp["iterations"], hp["batch"], hp["fit_seed"], hp["checkpoint_every"], hp.get("precision", "fp32"),
                   hp.get("budget_flops"))


def check_loop_settings(name: str, hp: dict, counts: tuple[str, ...]) -> None:
    """What ``train_loop`` needs of every fine-tuning method: a known precision and the ``counts``
    (iterations, batch, ...) integers >= 1."""
    if hp["precision"] not in PRECISIONS:
        raise BadInput(f"{name}: precision {hp['precision']!r} is not one of {', '.join(PRECISIONS)}")
    for key in counts:
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] < 1:
            raise BadInput(f"{name}: {key} must be an integer >= 1, got {hp[key]!r}")


def iteration_seed(fit_seed: int, iteration: int) -> int:
    return (fit_seed * 1_000_003 + iteration) % 2**32


def sanitize_gradients(params) -> int:
    """NaN -> 0, +inf -> 1e5, -inf -> -1e5 in place (the SFD reference's ``nan_to_num`` before every
    optimiser step, ``docs/algorithms.md``, "SFD training loop"); returns how many were bad."""
    bad = 0
    for p in params:
        if p.grad is not None:
            finite = torch.isfinite(p.grad)
            if not finite.all():
                bad += int((~finite).sum())
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


# step(student, latents, cond, optimizer, counted_teacher, fp16, iteration) -> {"losses": [...],
# "bad_gradients": int, "loss_nan": bool, "shown_loss": float (optional)}
Step = Callable[..., dict]


def train_loop(workdir: Path, student: torch.nn.Module, teacher: Denoiser, settings: LoopSettings,
               lr: Callable[[int], float], device: torch.device, latent_shape: tuple[int, ...], description: str,
               progress, step: Step, *,
               conditioning: Callable[[int, torch.Generator], dict] | None = None,
               devices: int = 1, extra_state: dict[str, torch.nn.Module] | None = None,
               student_flops_per_sample: int | None = None,
               parameters: list[torch.nn.Parameter] | None = None,
               data_parallel: bool = False,
               snapshot: Callable[[int, Accounting, dict], None] | None = None,
               snapshot_every: int = 0) -> tuple[Accounting, dict]:
    """Run ``settings.iterations`` iterations of ``step``, resuming from ``workdir/checkpoint.pt``
    and writing it atomically every ``settings.checkpoint_every`` iterations.

    Each iteration's latents and dropout masks come from the global RNG seeded with
    ``iteration_seed(fit_seed, iteration)``, and its conditioning from ``conditioning(batch,
    generator)`` with a CPU generator seeded the same way, so a resumed fit replays exactly what an
    uninterrupted one would. Adam (0.9, 0.999, 1e-8) over all student parameters, learning rate
    ``lr(iteration)``. The teacher is wrapped to count its evaluations; the wall time (teacher
    work included) accumulates over resumed sessions. Precision: ``fp16-autocast`` falls back to
    fp32 for good after an iteration whose last loss was NaN (the SFD reference's rule). Returns
    the accounting and the log.

    Options for other methods than SFD: ``extra_state`` (modules saved in and restored from the
    checkpoint beside the student, e.g. an EMA target), ``parameters`` (what Adam optimises; default
    all of the student's), ``student_flops_per_sample`` (FLOPs of one forward + backward of
    ``student`` per sample when it is not a denoiser ``student(x, sigma, **cond)``, e.g. a small
    predictor). ``settings.budget_flops`` stops the loop after the first iteration at which the
    counted FLOPs reach the budget (``log["stopped_at_budget"]``). A step may return
    ``"real_images"`` (training images it used) and the loop adds them up.

    Several processes (``torchrun``; ``sfdbench.parallel``): with ``data_parallel`` (a step whose only
    randomness is the latents, the conditioning and dropout, e.g. SFD's), process r trains on rows
    ``parallel.shard_rows(batch)`` of the global batch drawn exactly as one process draws it, dropout
    masks are drawn for the global batch and sliced, and gradients are averaged over processes before
    every optimiser step; counts and FLOPs are summed over processes, so the fit equals the
    single-process fit up to float summation order. Only process 0 writes the checkpoint. Without
    ``data_parallel`` the loop must run in one process (the runner fits such methods on process 0).

    ``snapshot_every`` > 0: after every ``snapshot_every``-th iteration but the last, ``snapshot(iteration,
    accounting so far, log)`` (intermediate checkpoints for the FID-against-compute curves; they observe
    the fit and never change it)."""
    if parallel.world() > 1 and not data_parallel:
        raise RuntimeError(f"{description}: this fit cannot be split over processes; fit it on one process "
                           "(sfdbench.parallel.solo)")
    optimizer = torch.optim.Adam(parameters if parameters is not None else student.parameters(), lr=lr(0),
                                 betas=(0.9, 0.999), eps=1e-8)
    ckpt_path = workdir / "checkpoint.pt"
    state = _load_checkpoint(ckpt_path, student, optimizer, extra_state)
    start_it, watch, log = state["iteration"], Stopwatch(state["wall_seconds"]), state["log"]
    log.setdefault("teacher_evaluations", 0)
    log.setdefault("student_evaluations", 0)
    one = _to_device(conditioning(1, torch.Generator().manual_seed(0)), device) if conditioning else {}
    flops = {"teacher_forward_per_sample": per_sample_flops(teacher, latent_shape, one, False, device),
             "student_forward_backward_per_sample": student_flops_per_sample if student_flops_per_sample is not None
             else per_sample_flops(student, latent_shape, one, True, device),
             "counter": "torch.utils.flop_counter.FlopCounterMode (matmul + conv, multiply-add = 2)"}
    student_calls = EvaluationCounter(student)
    log.setdefault("precision", settings.precision)
    log.setdefault("fp16_fallback_iteration", None)
    log.setdefault("last_loss_nan", False)
    log.setdefault("real_images", 0)
    log["flops"] = flops
    shape = (settings.batch, *latent_shape)
    progress = progress or null_progress
    try:
        def accounting_now() -> Accounting:
            return Accounting(watch.seconds, device_name(device), max(devices, parallel.world()),
                              float(counted_flops(log)))

        _iterate(settings, lr, optimizer, student, teacher, device, shape, conditioning, step, start_it, log,
                 watch, ckpt_path, progress, description, student_calls, extra_state,
                 (snapshot, snapshot_every, accounting_now) if snapshot is not None and snapshot_every > 0 else None)
    finally:
        student_calls.remove()
    return Accounting(watch.seconds, device_name(device), max(devices, parallel.world()),
                      float(counted_flops(log))), log


def counted_flops(log: dict) -> float:
    """Fine-tuning FLOPs so far: counted evaluations x the measured per-sample FLOPs."""
    per = log["flops"]
    return float(log["teacher_evaluations"] * per["teacher_forward_per_sample"]
                 + log["student_evaluations"] * per["student_forward_backward_per_sample"])


def _iterate(settings, lr, optimizer, student, teacher, device, shape, conditioning, step, start_it, log, watch,
             ckpt_path, progress, description, student_calls, extra_state, snapshots=None) -> None:
    shared_optimizer = parallel.GradientAveraging(optimizer) if parallel.world() > 1 else optimizer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with progress(description, settings.iterations) as advance:
        advance(start_it)
        for it in range(start_it, settings.iterations):
            for group in optimizer.param_groups:
                group["lr"] = lr(it)
            if log["last_loss_nan"] and log["precision"] != "fp32":
                log["precision"], log["fp16_fallback_iteration"] = "fp32", it
            counted = CountingDenoiser(teacher)
            seed = iteration_seed(settings.fit_seed, it)
            rows = parallel.shard_rows(settings.batch)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                latents = torch.randn(shape, device=device)[rows]
                cond = _slice_rows(_to_device(conditioning(settings.batch, torch.Generator().manual_seed(seed)),
                                              device), rows, settings.batch) if conditioning else {}
                with _sharded(rows, settings.batch):
                    out = step(student, latents, cond, shared_optimizer, counted, log["precision"] != "fp32", it)
            teacher_n, student_n, real, bad = parallel.sum_over_processes(
                [counted.samples, student_calls.samples, int(out.get("real_images", 0)), out["bad_gradients"]])
            log["bad_gradients"] += int(bad)
            any_nan, last_nan = parallel.max_over_processes([float(out["loss_nan"]),
                                                             float(math.isnan(out["losses"][-1]))])
            log["nan_loss_iterations"] += int(any_nan > 0)
            log["last_loss_nan"] = last_nan > 0  # every process falls back to fp32 together
            log["teacher_evaluations"] += int(teacher_n)
            log["student_evaluations"] += int(student_n)
            student_calls.samples = 0
            log["real_images"] += int(real)
            log["loss_last"] = out["losses"]
            log["peak_memory"] = {**peak_memory(device), "batch_per_process": rows.stop - rows.start}
            advance(info=f"loss {out.get('shown_loss', sum(out['losses'])):.3f}")
            if settings.budget_flops is not None and counted_flops(log) >= settings.budget_flops:
                log["stopped_at_budget"] = {"iteration": it + 1, "flops": counted_flops(log),
                                            "budget_flops": settings.budget_flops}
                break
            if (it + 1) % settings.checkpoint_every == 0 and it + 1 < settings.iterations:
                _save_checkpoint(ckpt_path, student, optimizer, it + 1, watch.seconds, log, extra_state)
            if snapshots is not None and (it + 1) % snapshots[1] == 0 and it + 1 < settings.iterations:
                snapshots[0](it + 1, snapshots[2](), log)


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's peak allocated bytes on ``device`` (since the last
    ``torch.cuda.reset_peak_memory_stats``), else the process's peak resident set size (Linux
    ``ru_maxrss``, since it started)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "what": "torch.cuda.max_memory_allocated"}
    try:
        import resource

        return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                "what": "host peak RSS of the process (ru_maxrss)"}
    except (ImportError, OSError):
        return {"bytes": None, "what": "unavailable"}


def _sharded(rows: slice, total: int):
    """Dropout masks drawn for the global batch when this process holds only ``rows`` of it."""
    import contextlib

    return parallel.GlobalBatchDropout(rows, total) if parallel.world() > 1 else contextlib.nullcontext()


def _slice_rows(cond: dict, rows: slice, total: int) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total else v
            for k, v in cond.items()}


def _to_device(cond: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


def _save_checkpoint(path: Path, student, optimizer, iteration: int, wall: float, log: dict,
                     extra_state: dict | None = None) -> None:
    if not parallel.is_main():
        return
    buf = io.BytesIO()
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "extra": {k: m.state_dict() for k, m in (extra_state or {}).items()},
                "iteration": iteration, "wall_seconds": wall, "log": json.dumps(log)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, student, optimizer, extra_state: dict | None = None) -> dict:
    fresh = {"iteration": 0, "wall_seconds": 0.0, "log": {"bad_gradients": 0, "nan_loss_iterations": 0}}
    if not path.is_file():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code execution
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        for key, module in (extra_state or {}).items():
            module.load_state_dict(state["extra"][key])
    except Exception as exc:
        raise BadInput(f"corrupt checkpoint {path} ({exc}); delete it to restart this fit") from exc
    return {"iteration": state["iteration"], "wall_seconds": state["wall_seconds"], "log": json.loads(state["log"])}


class null_progress:
    """A progress bar that shows nothing (``progress=None``)."""

    def __init__(self, *args):
        pass

    def __enter__(self):
        return lambda *a, **k: None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Model files


def save_student(workdir: Path, student: torch.nn.Module, method: str, suite: str, hp: dict, sampling: dict,
                 accounting: Accounting, log: dict, **extra) -> None:
    """Write ``model.safetensors`` (the student denoiser's weights + its sampling settings) and then
    ``fit.json`` (both atomic; a fit counts as done only when both exist), then drop the checkpoint.

    The metadata names the method that wrote the file (``sfdbench sample`` loads it through that
    method) and the adapters attached to the teacher's architecture; the weights load into a copy
    of the teacher with those adapters (``Suite.load_student``). The compute accounting is
    explicit: wall time of the whole loop, teacher trajectories included."""
    if parallel.is_main():
        _write_student(workdir, student, method, suite, hp, sampling, accounting, log, **extra)
    parallel.barrier()  # every process reads the model files only once they exist


def _write_student(workdir: Path, student: torch.nn.Module, method: str, suite: str, hp: dict, sampling: dict,
                   accounting: Accounting, log: dict, **extra) -> None:
    meta = {"kind": STUDENT_KIND, "method": method, "suite": suite, "sampling": sampling, "hyperparameters": hp,
            "adapters": {"step_condition": is_step_conditioned(student)}}
    save_weights(student, workdir / "model.safetensors", meta)
    fit = {"fine_tuning": accounting.to_dict(), "hyperparameters": hp, "sampling": sampling, **log,
           "teacher_trajectories": hp["iterations"] * hp["batch"], "includes_teacher_trajectories": True,
           "device": accounting.device, "devices": accounting.devices, "loss": hp.get("loss"), **extra}
    atomic_write_bytes(workdir / "fit.json", (json.dumps(fit, indent=2) + "\n").encode())
    (workdir / "checkpoint.pt").unlink(missing_ok=True)


SNAPSHOTS = "snapshots"  # intermediate checkpoints: <model folder>/snapshots/it<iteration>/model.safetensors


def save_snapshot(workdir: Path, iteration: int, student: torch.nn.Module, method: str, suite: str, hp: dict,
                  sampling: dict, accounting: Accounting, log: dict, **extra) -> None:
    """An intermediate checkpoint of a fit: the same files as a finished fit (``save_student``), in
    ``workdir/snapshots/it<iteration>/``, with the accounting up to that iteration."""
    save_student(Path(workdir) / SNAPSHOTS / f"it{iteration:06d}", student, method, suite, hp, sampling, accounting,
                 json.loads(json.dumps(log)), snapshot_iteration=iteration,
                 **{"teacher_trajectories": iteration * hp["batch"], **extra})


def snapshot_models(model: Path) -> list[tuple[int, Path]]:
    """(iteration, model file) of every intermediate checkpoint beside ``model``, in order."""
    folder = Path(model).parent / SNAPSHOTS
    found = [(int(d.name[2:]), d / "model.safetensors") for d in folder.glob("it*") if fit_done(d)]
    return sorted(found)


def fit_done(workdir: Path) -> bool:
    return (workdir / "model.safetensors").is_file() and (workdir / "fit.json").is_file()


def read_fit(workdir: Path) -> dict:
    """The ``fit.json`` beside a model file (empty when there is none)."""
    path = Path(workdir) / "fit.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_student(path: Path, suite, teacher: Denoiser, device) -> tuple[torch.nn.Module, dict]:
    """A fitted student (eval mode, frozen) and its metadata, rebuilt by the suite from a copy of
    the teacher's architecture (never from a network class named in the file)."""
    meta = read_metadata(path)
    if meta.get("kind") != STUDENT_KIND or "sampling" not in meta:
        raise BadInput(f"{path} is not an sfdbench student model (its metadata has no sampling settings)")
    student = suite.load_student(path, teacher, meta).to(device).eval()
    student.requires_grad_(False)
    return student, meta
