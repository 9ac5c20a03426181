"""Simple and Fast Distillation (SFD; Zhou et al., NeurIPS 2024, arXiv 2409.19681), first stage.

The whole network is fine-tuned so that ONE Euler step per interval of a coarse schedule
t_0 > ... > t_{N-1} lands where a strong teacher solver (DPM-Solver++(3M) with K = M + 1 steps
per student interval, on the nested fine schedule) lands. Data-free: only Gaussian noise.
The spec is ``shared/docs/sfd-spec.md`` section 4; the reference's quirks we keep are noted
where they matter (step-by-step optimiser updates, detached student trajectory, L1 summed
over pixels and averaged over samples, AFS interval untrained, LR / 10 at half of training,
NaN gradients zeroed).

The pieces shared with SFD-v (``sfd_v.py``) and the second stage (``sfd_stage2.py``) live here:
``sfd_iteration`` (one batch of trajectories, any teacher solver, optional step conditions),
``train_loop`` (seeded, checkpointed, resumable iterations with the NaN / fp16 bookkeeping),
``save_student`` / ``load_fitted`` (the distilled model file and its sampler).

Precision: the reference trains in fp16 and, after a NaN loss, falls back to fp32 for good
(spec 4.8). We train in fp32 by default (``precision="fp32"``; CPU, and the digits net is tiny);
``precision="fp16-autocast"`` runs teacher and student under ``torch.autocast(float16)`` and
implements the same fallback: at the start of an iteration, if the last loss of the previous
one was NaN, switch to fp32 permanently (recorded in ``fit.json`` and the fit info).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import CountingDenoiser, Denoiser, EDMPrecond, analytic_first_direction
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.harness.accounting import Accounting, Stopwatch, device_name
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.networks.checkpoint import atomic_write_bytes, load_weights, read_metadata, save_weights

TEACHER_SOLVERS = ("dpmpp", "heun", "dpm2", "ipndm", "euler")  # the reference's allowed teachers (spec 4.9)
LOSSES = ("l1", "l2", "lpips")
PRECISIONS = ("fp32", "fp16-autocast")
DPMPP_OPTIONS = ("max_order", "predict_x0", "lower_order_final", "thresholding")

# ---------------------------------------------------------------------------------------------
# The math (tensors in, tensors out)


def teacher_solver_options(solver: str, hp: dict) -> dict:
    """The options the teacher ``solver`` takes from SFD's hyperparameters: DPM-Solver++ its four
    (max_order, predict_x0, lower_order_final, thresholding), iPNDM its ``max_order`` (the
    reference requires one for both), Heun / DPM-Solver-2 / Euler none."""
    if solver == "dpmpp":
        return {k: hp[k] for k in DPMPP_OPTIONS}
    if solver == "ipndm":
        return {"max_order": hp["max_order"]}
    return {}


def teacher_targets(teacher: Denoiser, x_start: torch.Tensor, student_sigmas: torch.Tensor, m: int,
                    schedule: str, rho: float, teacher_options: dict, *, solver: str = "dpmpp", afs: bool = False,
                    cond: dict | None = None) -> torch.Tensor:
    """Teacher states at the student timestamps t_1..t_{N-1}: shape [N-1, *x.shape].

    The teacher (default DPM-Solver++ with ``teacher_options``, without AFS; the second stage uses
    Euler with the first-stage model's AFS and step condition ``cond``) runs on the nested
    schedule of N_T = (M+1)(N-1)+1 timestamps from the same formula, so teacher index (M+1)k is
    student index k (spec 4.3)."""
    n = len(student_sigmas)
    k = m + 1
    sigma_min, sigma_max = float(student_sigmas[-1]), float(student_sigmas[0])
    teacher_sigmas = get_schedule(schedule, k * (n - 1) + 1, sigma_min, sigma_max, rho)
    with torch.no_grad():
        traj = solvers.trajectory(solvers.SOLVERS[solver], teacher, x_start, teacher_sigmas, afs=afs, cond=cond,
                                  **teacher_options)
    return traj[k::k]


def student_euler_step(student: Denoiser, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor,
                       analytic: bool, **cond) -> torch.Tensor:
    """One Euler step x + (t_next - t_cur) d with d from the student, or AFS's analytic d."""
    d = analytic_first_direction(x, t_cur) if analytic else (x - student(x, t_cur, **cond)) / t_cur
    return x + (t_next - t_cur) * d


def l1_sum_mean(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of |prediction - target| over pixels, mean over samples (spec 4.5)."""
    return (prediction - target).abs().flatten(1).sum(1).mean()


def l2_sum_mean(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over pixels, mean over samples (the L2 variant of the loss ablation)."""
    return (prediction - target).square().flatten(1).sum(1).mean()


def lpips_term(lpips: Callable, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's LPIPS weighting (spec 6, 10.8, 11.17): the batch mean of per-sample LPIPS is
    added to every element before the sum-over-pixels / mean-over-samples reduction, so it
    counts C*H*W times relative to the per-sample L1 sum."""
    return lpips(prediction, target).mean() * prediction[0].numel()


def interval_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor, lpips: Callable | None = None):
    if kind == "l1":
        return l1_sum_mean(prediction, target)
    if kind == "l2":
        return l2_sum_mean(prediction, target)
    if kind == "lpips":
        if lpips is None:
            raise ValueError("the lpips loss needs an LPIPS function")
        return lpips_term(lpips, prediction, target)
    raise ValueError(f"unknown SFD loss {kind!r}; known: {', '.join(LOSSES)}")


def sanitize_gradients(params) -> int:
    """NaN -> 0, +inf -> 1e5, -inf -> -1e5 in place (spec 4.4.3); returns how many were bad."""
    bad = 0
    for p in params:
        if p.grad is not None:
            finite = torch.isfinite(p.grad)
            if not finite.all():
                bad += int((~finite).sum())
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


def _autocast(device: torch.device, fp16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16)


def sfd_iteration(student: Denoiser, teacher: Denoiser, optimizer: torch.optim.Optimizer,
                  latents: torch.Tensor, sigmas: torch.Tensor, m: int, schedule: str, rho: float,
                  afs: bool, teacher_options: dict, *, teacher_solver: str = "dpmpp", teacher_afs: bool = False,
                  student_cond: dict | None = None, teacher_cond: dict | None = None, loss: str = "l1",
                  lpips: Callable | None = None, last_step_lpips: bool = False, fp16: bool = False) -> dict:
    """One SFD training iteration on one batch of trajectories (spec 4.4).

    For each interval k in order: one Euler student step from the student's own (detached)
    state, the loss to the teacher state at t_{k+1}, and an immediate optimiser step. The AFS
    interval (k = 0) has no network call and is not trained. SFD-v passes ``student_cond``
    (its step condition); the second stage also ``teacher_cond``, an Euler teacher with its own
    AFS, and ``last_step_lpips`` (LPIPS added on the last interval, spec 6). ``fp16`` runs the
    networks under float16 autocast."""
    sigmas = sigmas.to(latents.dtype)
    x = latents * sigmas[0]
    with _autocast(x.device, fp16):
        targets = teacher_targets(teacher, x, sigmas, m, schedule, rho, teacher_options, solver=teacher_solver,
                                  afs=teacher_afs, cond=teacher_cond)
    losses, bad_grads = [], 0
    intervals = len(sigmas) - 1
    for k in range(intervals):
        analytic = afs and k == 0
        optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device, fp16):
            x_next = student_euler_step(student, x, sigmas[k], sigmas[k + 1], analytic, **(student_cond or {}))
        loss_k = interval_loss(loss, x_next, targets[k], lpips)
        if last_step_lpips and k == intervals - 1 and not analytic:
            loss_k = loss_k + lpips_term(lpips, x_next, targets[k])
        if not analytic:
            loss_k.backward()
            bad_grads += sanitize_gradients(p for group in optimizer.param_groups for p in group["params"])
            optimizer.step()
        losses.append(float(loss_k.detach()))
        x = x_next.detach()
    return {"losses": losses, "bad_gradients": bad_grads, "loss_nan": any(math.isnan(v) for v in losses)}


def lr_at(iteration: int, iterations: int, lr: float) -> float:
    """Reference LR rule: after the iteration whose pre-increment counter reaches half of training,
    the LR is divided by 10 for all later iterations (spec 4.6)."""
    return lr / 10 if iteration >= 1 and (iteration - 1) >= iterations / 2 else lr


@functools.cache
def lpips_loss() -> tuple[Callable | None, str]:
    """(LPIPS function, "") where LPIPS can run, else (None, why not).

    The reference uses ``piq.LPIPS(replace_pooling=True, reduction="none")`` (torchvision's
    ImageNet VGG16 + the official LPIPS linear weights, both downloaded on first use) and feeds
    it [-1, 1] images unchanged after a bilinear resize to 224x224 (spec 6, 11.16). Single-channel
    images are repeated to 3 channels. Offline without piq or its cached weights, it cannot run."""
    try:
        import piq  # noqa: F401  (optional; not a dependency of sfdbench)
    except ImportError:
        return None, ("the piq package is not installed and torchvision's VGG16 ImageNet weights cannot be "
                      "downloaded offline; the digits images are 1-channel 8x8 anyway")
    try:
        metric = piq.LPIPS(replace_pooling=True, reduction="none")
    except Exception as exc:  # a download that fails offline surfaces here, as whatever piq raises
        return None, f"piq could not load the VGG16 / LPIPS weights ({type(exc).__name__}: {exc})"

    def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def prep(x):
            x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
            return torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)

        metric.to(a.device)
        return metric(prep(a), prep(b)).reshape(-1)

    return lpips, ""


# ---------------------------------------------------------------------------------------------
# Resumable training loop, model files


def iteration_seed(fit_seed: int, iteration: int) -> int:
    return (fit_seed * 1_000_003 + iteration) % 2**32


def train_loop(workdir: Path, student: EDMPrecond, teacher: Denoiser, hp: dict, device: torch.device,
               shape: tuple[int, ...], description: str, progress,
               step: Callable[..., dict]) -> tuple[Accounting, dict]:
    """Run ``hp["iterations"]`` iterations of ``step(it, latents, optimizer, teacher, fp16) -> out``
    (``out`` as ``sfd_iteration`` returns it), resuming from ``workdir/checkpoint.pt`` and writing
    it atomically every ``hp["checkpoint_every"]`` iterations.

    Each iteration's noise and dropout masks come from a seed derived from (fit_seed, iteration),
    so a resumed fit replays exactly what an uninterrupted one would. The teacher is wrapped to
    count its evaluations; the wall time (teacher trajectories included) accumulates over resumed
    sessions. Returns the accounting and the log (NaN-loss iterations, sanitised gradient
    entries, teacher evaluations, precision and when the fp16 -> fp32 fallback fired)."""
    optimizer = torch.optim.Adam(student.parameters(), lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    ckpt_path = workdir / "checkpoint.pt"
    state = _load_checkpoint(ckpt_path, student, optimizer)
    start_it, watch, log = state["iteration"], Stopwatch(state["wall_seconds"]), state["log"]
    log.setdefault("teacher_evaluations", 0)
    log.setdefault("precision", hp.get("precision", "fp32"))
    log.setdefault("fp16_fallback_iteration", None)
    log.setdefault("last_loss_nan", False)
    iterations = hp["iterations"]
    progress = progress or _null_progress
    with progress(description, iterations) as advance:
        advance(start_it)
        for it in range(start_it, iterations):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, iterations, hp["lr"])
            if log["last_loss_nan"] and log["precision"] != "fp32":  # spec 4.8: permanent fallback to fp32
                log["precision"], log["fp16_fallback_iteration"] = "fp32", it
            counted = CountingDenoiser(teacher)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(iteration_seed(hp["fit_seed"], it))
                latents = torch.randn(shape, device=device)
                out = step(it, latents, optimizer, counted, log["precision"] != "fp32")
            log["bad_gradients"] += out["bad_gradients"]
            log["nan_loss_iterations"] += int(out["loss_nan"])
            log["last_loss_nan"] = math.isnan(out["losses"][-1])
            log["teacher_evaluations"] += counted.samples
            log["loss_last"] = out["losses"]
            trained = out["losses"][int(hp["afs"]):]
            advance(info=f"{hp.get('loss', 'l1')} {sum(trained):.3f}")
            if (it + 1) % hp["checkpoint_every"] == 0 and it + 1 < iterations:
                _save_checkpoint(ckpt_path, student, optimizer, it + 1, watch.seconds, log)
    return Accounting(watch.seconds, device_name(device), 1), log


def save_student(workdir: Path, student: EDMPrecond, hp: dict, sampling: dict, accounting: Accounting, log: dict,
                 **extra) -> None:
    """Write ``model.safetensors`` (+ its sampling settings) and then ``fit.json`` (both atomic;
    a fit counts as done only when both exist), then drop the checkpoint.

    The compute accounting is explicit: wall time of the whole loop, teacher trajectories
    included (``includes_teacher_trajectories``), their count and the teacher evaluations."""
    meta = {"kind": "sfd-student", "config": student.net.config, "sigma_data": student.sigma_data,
            "sampling": sampling, "hyperparameters": hp}
    save_weights(student.net, workdir / "model.safetensors", meta)
    fit = {"fine_tuning": accounting.to_dict(), "hyperparameters": hp, "sampling": sampling, **log,
           "teacher_trajectories": hp["iterations"] * hp["batch"], "includes_teacher_trajectories": True,
           "device": accounting.device, "devices": accounting.devices, "loss": hp.get("loss"), **extra}
    atomic_write_bytes(workdir / "fit.json", (json.dumps(fit, indent=2) + "\n").encode())
    (workdir / "checkpoint.pt").unlink(missing_ok=True)


def fit_done(workdir: Path) -> bool:
    return (workdir / "model.safetensors").is_file() and (workdir / "fit.json").is_file()


def load_student(path: Path, device) -> tuple[EDMPrecond, dict]:
    """A distilled student (eval mode, frozen) and its metadata."""
    from sfdbench.networks.digits_unet import DigitsUNet

    meta = read_metadata(path)
    if meta.get("kind") != "sfd-student" or "sampling" not in meta:
        raise BadInput(f"{path} is not an sfdbench SFD student (its metadata has no sampling settings)")
    net = load_weights(DigitsUNet(**meta["config"]), path)
    s = meta["sampling"]
    student = EDMPrecond(net, s["sigma_min"], s["sigma_max"], meta["sigma_data"]).to(device).eval()
    student.requires_grad_(False)
    return student, meta


INFO_KEYS = ("bad_gradients", "nan_loss_iterations", "includes_teacher_trajectories", "teacher_trajectories",
             "teacher_evaluations", "device", "devices", "precision", "fp16_fallback_iteration")
# written by SFD-v (the N drawn) and the second stage (its first stage and the cost split) only
OPTIONAL_INFO_KEYS = ("num_steps_drawn", "first_stage_model", "fine_tuning_first_stage", "fine_tuning_second_stage",
                      "teacher_trajectories_first_stage")


def load_fitted(path: Path, teacher: EDMPrecond, device, nfe: int | None = None) -> Fitted:
    """Load a distilled student (safetensors + its sampling settings) as a ``Fitted`` sampler:
    Euler (+ AFS when trained with it) on the stored schedule.

    A step-conditioned model trained on several step counts (SFD-v) samples at any ``nfe`` whose
    N = NFE + 1 + AFS it was trained on, with step condition N (spec 5.3); without ``nfe`` it uses
    its stored default (like the reference's stored ``num_steps``). Any other model has one NFE."""
    student, meta = load_student(path, device)
    s = dict(meta["sampling"])
    if nfe is not None and nfe != s["nfe"]:
        low_high = s.get("variable_num_steps")
        n = nfe + 1 + int(s["afs"])
        if not low_high:
            raise BadInput(f"{path} was distilled for NFE {s['nfe']} only, not NFE {nfe}")
        if not low_high[0] <= n <= low_high[1]:
            raise BadInput(f"{path} was trained for N = {low_high[0]}..{low_high[1]} timestamps "
                           f"(NFE {low_high[0] - 1 - int(s['afs'])}..{low_high[1] - 1 - int(s['afs'])}), not NFE {nfe}")
        s["num_steps"], s["nfe"] = n, nfe
    sigmas = get_schedule(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"])
    cond = {"step_condition": s["num_steps"]} if s.get("step_condition") else None
    sample = solvers.sampler(solvers.euler, sigmas, afs=s["afs"], cond=cond)

    fit_json = Path(path).parent / "fit.json"
    fit = json.loads(fit_json.read_text()) if fit_json.is_file() else {}
    info = {"sampling": s, "loss": fit.get("loss") or meta.get("hyperparameters", {}).get("loss"),
            **{k: fit.get(k) for k in INFO_KEYS}, **{k: fit[k] for k in OPTIONAL_INFO_KEYS if k in fit}}
    return Fitted(denoiser=student, sample=sample, nfe=s["nfe"], fine_tuning=fit.get("fine_tuning"), info=info)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class SFDMethod(Method):
    name: str = "sfd"
    display: str = "SFD"
    group: str = "distillation"
    description: str = "Simple and Fast Distillation, first stage: one model per NFE, Euler + AFS"

    # Defaults: the paper's CIFAR-10 settings (spec 4.9) except the training length, batch and
    # learning rate, which are the digits suite's (see ``SUITE_OVERRIDES``).
    sigma_min: float = 0.006
    schedule: str = "polynomial"
    rho: float = 7.0
    m: int = 3
    afs: bool = True
    iterations: int = 1563
    batch: int = 128
    lr: float = 5e-5
    fit_seed: int = 0
    checkpoint_every: int = 50
    # The reference's fp16 teacher silently skips thresholding (spec 10.3); we default to that.
    teacher_options: tuple = (("max_order", 3), ("predict_x0", True), ("lower_order_final", True),
                              ("thresholding", False))

    def nfe_rule(self) -> str:
        return "NFE 1-10 with AFS (N = NFE + 2 timestamps); the paper uses 2-5"

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and 1 <= nfe <= 10

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": suite.sigma_max, "schedule": self.schedule, "rho": self.rho,
              "num_steps": nfe + 1 + int(self.afs), "M": self.m, "afs": self.afs, "teacher_solver": "dpmpp",
              **dict(self.teacher_options), "iterations": self.iterations, "batch": self.batch, "lr": self.lr,
              "lr_drop": "x0.1 at half", "loss": "l1", "optimizer": "adam(0.9,0.999,1e-8)",
              "student_mode": "train (dropout on)", "fit_seed": self.fit_seed, "precision": "fp32",
              "sampler": "euler", "checkpoint_every": self.checkpoint_every}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        if "num_steps" not in suite.method_options.get(self.name, {}):
            hp["num_steps"] = nfe + 1 + int(bool(hp["afs"]))  # follows an overridden afs (ablation afs=off)
        if hp["num_steps"] != nfe + 1 + int(bool(hp["afs"])):
            raise BadInput(f"{self.name}: num_steps follows from the NFE (N = NFE + 1 + AFS); do not set it")
        check_training_hyperparameters(self.name, hp)
        return hp

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        final = ctx.workdir / "model.safetensors"
        if not fit_done(ctx.workdir):
            train_sfd(ctx, hp)
        return load_fitted(final, ctx.teacher, ctx.device)


def check_loop_settings(name: str, hp: dict, counts: tuple[str, ...]) -> None:
    """What ``train_loop`` needs of every fine-tuning method: a known precision and the ``counts``
    (iterations, batch, ...) integers >= 1."""
    if hp["precision"] not in PRECISIONS:
        raise BadInput(f"{name}: precision {hp['precision']!r} is not one of {', '.join(PRECISIONS)}")
    for key in counts:
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] < 1:
            raise BadInput(f"{name}: {key} must be an integer >= 1, got {hp[key]!r}")


def check_training_hyperparameters(name: str, hp: dict) -> None:
    """One clear line for a hyperparameter value that cannot work (exit 2 before anything runs)."""
    if hp["teacher_solver"] not in TEACHER_SOLVERS:
        raise BadInput(f"{name}: teacher_solver {hp['teacher_solver']!r} is not one of {', '.join(TEACHER_SOLVERS)}")
    if hp["loss"] not in LOSSES:
        raise BadInput(f"{name}: loss {hp['loss']!r} is not one of {', '.join(LOSSES)}")
    if hp["loss"] == "lpips" and lpips_loss()[0] is None:
        raise BadInput(f"{name}: loss 'lpips' is unavailable here: {lpips_loss()[1]}; use l1 or l2")
    if not isinstance(hp["afs"], bool):
        raise BadInput(f"{name}: afs must be true or false, got {hp['afs']!r}")
    check_loop_settings(name, hp, ("M", "iterations", "batch", "checkpoint_every"))
    if not 0 < hp["sigma_min"] < hp["sigma_max"]:
        raise BadInput(f"{name}: need 0 < sigma_min < sigma_max, got {hp['sigma_min']}, {hp['sigma_max']}")
    if hp["teacher_solver"] == "ipndm" and not 1 <= hp["max_order"] <= 4:
        raise BadInput(f"{name}: an iPNDM teacher needs max_order 1-4, got {hp['max_order']}")


def train_sfd(ctx: FitContext, hp: dict) -> None:
    """Fine-tune a copy of the teacher with SFD, checkpointing every ``checkpoint_every``
    iterations, and write ``model.safetensors`` (+ sampling settings) and ``fit.json``."""
    teacher = ctx.teacher
    if not isinstance(teacher, EDMPrecond):
        raise BadInput("SFD needs an EDM-preconditioned teacher network")
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    sigmas = get_schedule(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"]).to(ctx.device)
    teacher_options = teacher_solver_options(hp["teacher_solver"], hp)
    lpips = lpips_loss()[0] if hp["loss"] == "lpips" else None

    def step(it, latents, optimizer, counted_teacher, fp16):
        return sfd_iteration(student, counted_teacher, optimizer, latents, sigmas, hp["M"], hp["schedule"], hp["rho"],
                             hp["afs"], teacher_options, teacher_solver=hp["teacher_solver"], loss=hp["loss"],
                             lpips=lpips, fp16=fp16)

    accounting, log = train_loop(ctx.workdir, student, teacher, hp, ctx.device, (hp["batch"], *ctx.suite.image_shape),
                                 f"fit sfd NFE {ctx.nfe}", ctx.progress, step)
    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": hp["num_steps"], "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                "nfe": ctx.nfe}
    save_student(ctx.workdir, student, hp, sampling, accounting, log)


def _save_checkpoint(path: Path, student, optimizer, iteration: int, wall: float, log: dict) -> None:
    buf = io.BytesIO()
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "iteration": iteration, "wall_seconds": wall, "log": json.dumps(log)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, student, optimizer) -> dict:
    fresh = {"iteration": 0, "wall_seconds": 0.0, "log": {"bad_gradients": 0, "nan_loss_iterations": 0}}
    if not path.is_file():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code execution
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:
        raise BadInput(f"corrupt checkpoint {path} ({exc}); delete it to restart this fit") from exc
    return {"iteration": state["iteration"], "wall_seconds": state["wall_seconds"], "log": json.loads(state["log"])}


class _null_progress:
    def __init__(self, *args):
        pass

    def __enter__(self):
        return lambda *a, **k: None

    def __exit__(self, *exc):
        return False


register_method(SFDMethod())
