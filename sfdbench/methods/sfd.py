"""Simple and Fast Distillation (SFD; Zhou et al., NeurIPS 2024, arXiv 2409.19681), first stage.

The whole network is fine-tuned so that ONE Euler step per interval of a coarse schedule
t_0 > ... > t_{N-1} lands where a strong teacher solver (DPM-Solver++(3M) with K = M + 1 steps
per student interval, on the nested fine schedule) lands. Data-free: only Gaussian noise (and,
on conditional suites, the suite's training conditioning). The algorithm and the reference's
quirks we keep (step-by-step optimiser updates, detached student trajectory, L1 summed over
pixels and averaged over samples, AFS interval untrained, LR / 10 at half of training, NaN
gradients zeroed) are in ``docs/algorithms.md``, "SFD training loop".

The pieces shared with SFD-v (``sfd_v.py``) and the second stage (``sfd_stage2.py``) live here:
``sfd_iteration`` (one batch of trajectories, any teacher solver, optional step conditions) and
``load_fitted`` (a student's sampler); the training loop and model files are ``methods.training``.

Precision: the reference trains in fp16 and, after a NaN loss, falls back to fp32 for good. We
train in fp32 by default; ``precision="fp16-autocast"`` runs teacher and student under
``torch.autocast(float16)`` with the same fallback (``methods.training.train_loop``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import Denoiser, analytic_first_direction
from sfdbench.diffusion.schedules import DiscreteVP, schedule_for
from sfdbench.errors import BadInput
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.training import (
    LoopSettings,
    check_loop_settings,
    fit_done,
    load_student,
    read_fit,
    sanitize_gradients,
    save_snapshot,
    save_student,
    train_loop,
)

TEACHER_SOLVERS = ("dpmpp", "heun", "dpm2", "ipndm", "euler")  # the SFD reference's allowed teacher solvers
LOSSES = ("l1", "l2", "lpips")
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


@dataclass(frozen=True)
class SFDStepConfig:
    """The settings of one SFD iteration (``sfd_iteration``): M teacher steps inserted per student
    interval, the schedule family (and the discrete-VP table for ``discrete``), AFS on the student's
    first interval, the teacher solver with its options and its own AFS, the loss, and whether the
    last interval adds LPIPS (the second stage)."""

    m: int = 3
    schedule: str = "polynomial"
    rho: float = 7.0
    afs: bool = True
    teacher_solver: str = "dpmpp"
    teacher_options: tuple = ()
    teacher_afs: bool = False
    loss: str = "l1"
    last_step_lpips: bool = False
    vp: DiscreteVP | None = field(default=None, compare=False)
    # trajectories per forward/backward round: the batch is processed in rounds whose gradients are accumulated
    # before each interval's optimiser step (the SFD reference's Stable Diffusion setting: 128 trajectories per
    # iteration in rounds of the per-GPU batch); None = the whole batch at once
    micro_batch: int | None = None


def teacher_targets(teacher: Denoiser, x_start: torch.Tensor, student_sigmas: torch.Tensor, cfg: SFDStepConfig,
                    cond: dict | None = None) -> torch.Tensor:
    """Teacher states at the student timestamps t_1..t_{N-1}: shape [N-1, *x.shape].

    The teacher (``cfg.teacher_solver`` with its options and AFS) runs on the nested schedule of
    N_T = (M+1)(N-1)+1 timestamps from the same formula, so teacher index (M+1)k is student index k
    (SFD paper, Sec. 3.2; ``docs/algorithms.md``, "SFD training loop")."""
    n = len(student_sigmas)
    k = cfg.m + 1
    sigma_min, sigma_max = float(student_sigmas[-1]), float(student_sigmas[0])
    teacher_sigmas = schedule_for(cfg.schedule, k * (n - 1) + 1, sigma_min, sigma_max, cfg.rho, cfg.vp)
    with torch.no_grad():
        traj = solvers.trajectory(solvers.SOLVERS[cfg.teacher_solver], teacher, x_start, teacher_sigmas,
                                  afs=cfg.teacher_afs, cond=cond, **dict(cfg.teacher_options))
    return traj[k::k]


def student_euler_step(student: Denoiser, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor,
                       analytic: bool, **cond) -> torch.Tensor:
    """One Euler step x + (t_next - t_cur) d with d from the student, or AFS's analytic d."""
    d = analytic_first_direction(x, t_cur) if analytic else (x - student(x, t_cur, **cond)) / t_cur
    return x + (t_next - t_cur) * d


def l1_sum_mean(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of |prediction - target| over pixels, mean over samples (the SFD reference's L1;
    ``docs/algorithms.md#sfd-training-loop``)."""
    return (prediction - target).abs().flatten(1).sum(1).mean()


def l2_sum_mean(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over pixels, mean over samples (the L2 variant of the loss ablation)."""
    return (prediction - target).square().flatten(1).sum(1).mean()


def lpips_term(lpips: Callable, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SFD reference's LPIPS weighting (``docs/algorithms.md#second-stage-sfd``): the batch mean
    of per-sample LPIPS is added to every element before the sum-over-pixels / mean-over-samples
    reduction, so it counts C*H*W times relative to the per-sample L1 sum."""
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


def _autocast(device: torch.device, fp16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16)


def sfd_iteration(student: Denoiser, teacher: Denoiser, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
                  sigmas: torch.Tensor, cfg: SFDStepConfig, *, student_cond: dict | None = None,
                  teacher_cond: dict | None = None, lpips: Callable | None = None, fp16: bool = False) -> dict:
    """One SFD training iteration on one batch of trajectories (SFD paper, Algorithm 1).

    For each interval k in order: one Euler student step from the student's own (detached)
    state, the loss to the teacher state at t_{k+1}, and an immediate optimiser step. The AFS
    interval (k = 0) has no network call and is not trained. ``student_cond`` / ``teacher_cond``
    carry the suite's conditioning (plus SFD-v's step condition); the second stage also uses an
    Euler teacher with its own AFS and ``cfg.last_step_lpips``. ``fp16`` runs the networks under
    float16 autocast. ``cfg.micro_batch`` splits the batch into rounds (``sfd_iteration_rounds``)."""
    if cfg.micro_batch is not None and cfg.micro_batch < latents.shape[0]:
        return sfd_iteration_rounds(student, teacher, optimizer, latents, sigmas, cfg, student_cond=student_cond,
                                    teacher_cond=teacher_cond, lpips=lpips, fp16=fp16)
    sigmas = sigmas.to(latents.dtype)
    x = latents * sigmas[0]
    with _autocast(x.device, fp16):
        targets = teacher_targets(teacher, x, sigmas, cfg, teacher_cond)
    losses, bad_grads = [], 0
    intervals = len(sigmas) - 1
    for k in range(intervals):
        analytic = cfg.afs and k == 0
        optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device, fp16):
            x_next = student_euler_step(student, x, sigmas[k], sigmas[k + 1], analytic, **(student_cond or {}))
        loss_k = interval_loss(cfg.loss, x_next, targets[k], lpips)
        if cfg.last_step_lpips and k == intervals - 1 and not analytic:
            loss_k = loss_k + lpips_term(lpips, x_next, targets[k])
        if not analytic:
            loss_k.backward()
            bad_grads += sanitize_gradients(p for group in optimizer.param_groups for p in group["params"])
            optimizer.step()
        losses.append(float(loss_k.detach()))
        x = x_next.detach()
    trained = losses[int(cfg.afs):]
    return {"losses": losses, "bad_gradients": bad_grads, "loss_nan": any(math.isnan(v) for v in losses),
            "shown_loss": sum(trained)}


def _split_cond(cond: dict | None, batch: int, sizes: list[int]) -> list[dict]:
    """Per-round conditioning: per-sample tensors (first dim = batch) split, anything else (a scalar step
    condition) shared."""
    parts = [{} for _ in sizes]
    for key, value in (cond or {}).items():
        chunks = (value.split(sizes) if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
                  else [value] * len(sizes))
        for part, chunk in zip(parts, chunks):
            part[key] = chunk
    return parts


def sfd_iteration_rounds(student: Denoiser, teacher: Denoiser, optimizer: torch.optim.Optimizer,
                         latents: torch.Tensor, sigmas: torch.Tensor, cfg: SFDStepConfig, *,
                         student_cond: dict | None = None, teacher_cond: dict | None = None,
                         lpips: Callable | None = None, fp16: bool = False) -> dict:
    """``sfd_iteration`` with the batch of B trajectories processed in rounds of ``cfg.micro_batch`` (the SFD
    reference's accumulation, ``docs/algorithms.md#sfd-training-loop``): teacher targets per round; for each
    interval the gradients of every round's loss x (round size / B) are accumulated, then one optimiser step.
    The accumulated loss is the full batch's sum-over-pixels, mean-over-samples loss, so the update equals the
    one-round update (up to float summation order and the student's dropout draws); memory is that of one
    round."""
    sigmas = sigmas.to(latents.dtype)
    batch = latents.shape[0]
    sizes = [min(cfg.micro_batch, batch - s) for s in range(0, batch, cfg.micro_batch)]
    xs = list((latents * sigmas[0]).split(sizes))
    s_conds, t_conds = _split_cond(student_cond, batch, sizes), _split_cond(teacher_cond, batch, sizes)
    with _autocast(latents.device, fp16):
        targets = [teacher_targets(teacher, x, sigmas, cfg, c) for x, c in zip(xs, t_conds)]
    losses, bad_grads = [], 0
    intervals = len(sigmas) - 1
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for k in range(intervals):
        analytic = cfg.afs and k == 0
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for r, (x, cond, target) in enumerate(zip(xs, s_conds, targets)):
            with _autocast(x.device, fp16):
                x_next = student_euler_step(student, x, sigmas[k], sigmas[k + 1], analytic, **cond)
            loss_r = interval_loss(cfg.loss, x_next, target[k], lpips)
            if cfg.last_step_lpips and k == intervals - 1 and not analytic:
                loss_r = loss_r + lpips_term(lpips, x_next, target[k])
            loss_r = loss_r * (sizes[r] / batch)
            if not analytic:
                loss_r.backward()
            total += float(loss_r.detach())
            xs[r] = x_next.detach()
        if not analytic:
            bad_grads += sanitize_gradients(params)
            optimizer.step()
        losses.append(total)
    trained = losses[int(cfg.afs):]
    return {"losses": losses, "bad_gradients": bad_grads, "loss_nan": any(math.isnan(v) for v in losses),
            "shown_loss": sum(trained), "rounds": len(sizes)}


def lr_at(iteration: int, iterations: int, lr: float) -> float:
    """The reference's LR rule: after the iteration whose pre-increment counter reaches half of
    training, the LR is divided by 10 for all later iterations (``docs/algorithms.md``, "SFD
    training loop")."""
    return lr / 10 if iteration >= 1 and (iteration - 1) >= iterations / 2 else lr


@functools.cache
def lpips_loss() -> tuple[Callable | None, str]:
    """(LPIPS function, "") where LPIPS can run, else (None, why not).

    The reference uses ``piq.LPIPS(replace_pooling=True, reduction="none")`` (torchvision's
    ImageNet VGG16 + the official LPIPS linear weights, both downloaded on first use) and feeds
    it [-1, 1] images unchanged after a bilinear resize to 224x224 (the SFD reference's loss). Single-channel
    images are repeated to 3 channels. Offline without piq or its cached weights, it cannot run."""
    try:
        import piq  # noqa: F401  (optional; not a dependency of sfdbench)
    except ImportError:
        return None, ("the piq package is not installed and torchvision's VGG16 ImageNet weights cannot be "
                      "downloaded offline")
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
# A student's sampler


INFO_KEYS = ("bad_gradients", "nan_loss_iterations", "includes_teacher_trajectories", "teacher_trajectories",
             "teacher_evaluations", "device", "devices", "precision", "fp16_fallback_iteration")
# written by SFD-v (the N drawn) and the second stage (its first stage and the cost split) only
OPTIONAL_INFO_KEYS = ("num_steps_drawn", "first_stage_model", "fine_tuning_first_stage", "fine_tuning_second_stage",
                      "teacher_trajectories_first_stage", "student_evaluations", "real_images", "stopped_at_budget")


def sampling_at(s: dict, nfe: int | None, path: Path) -> dict:
    """A model's stored sampling settings at ``nfe``: a step-conditioned model trained on several
    step counts (SFD-v) samples at any NFE whose N = NFE + 1 + AFS it was trained on; any other
    model has one NFE."""
    s = dict(s)
    if nfe is None or nfe == s["nfe"]:
        return s
    low_high = s.get("variable_num_steps")
    n = nfe + 1 + int(s["afs"])
    if not low_high:
        raise BadInput(f"{path} was distilled for NFE {s['nfe']} only, not NFE {nfe}")
    if not low_high[0] <= n <= low_high[1]:
        raise BadInput(f"{path} was trained for N = {low_high[0]}..{low_high[1]} timestamps "
                       f"(NFE {low_high[0] - 1 - int(s['afs'])}..{low_high[1] - 1 - int(s['afs'])}), not NFE {nfe}")
    s["num_steps"], s["nfe"] = n, nfe
    return s


def load_fitted(path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
    """A distilled student (safetensors + its sampling settings) as a ``Fitted`` sampler: Euler (+ AFS
    when trained with it) on the stored schedule, adding the step condition N to the suite's
    conditioning when the model is step-conditioned (SFD paper, Sec. 4.2). Without ``nfe`` it uses
    its stored default (like the reference's stored ``num_steps``)."""
    student, meta = load_student(path, suite, teacher, device)
    s = sampling_at(meta["sampling"], nfe, path)
    sigmas = schedule_for(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"], suite.discrete_vp)
    add = {"step_condition": s["num_steps"]} if s.get("step_condition") else None
    sample = solvers.sampler(solvers.euler, sigmas, afs=s["afs"], add_cond=add)
    fit = read_fit(Path(path).parent)
    info = {"sampling": s, "loss": fit.get("loss") or meta.get("hyperparameters", {}).get("loss"),
            **{k: fit.get(k) for k in INFO_KEYS}, **{k: fit[k] for k in OPTIONAL_INFO_KEYS if k in fit}}
    return Fitted(denoiser=student, sample=sample, nfe=s["nfe"], fine_tuning=fit.get("fine_tuning"), info=info)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class SFDMethod(Method):
    """First-stage SFD: one model per NFE, Euler + AFS.

    Defaults: the paper's CIFAR-10 settings (SFD paper, Appendix, training details) except the
    training length, batch and learning rate, which suites set in ``method_options``."""

    group: str = "distillation"
    sigma_min: float = 0.006
    data_parallel: bool = True  # the batch splits over torchrun processes (methods/training.py)
    schedule: str = "polynomial"
    rho: float = 7.0
    m: int = 3
    afs: bool = True
    iterations: int = 1563
    batch: int = 128
    lr: float = 5e-5
    fit_seed: int = 0
    checkpoint_every: int = 50
    # The reference's fp16 teacher silently skips thresholding; we default to that.
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
                "sampler": "euler", "checkpoint_every": self.checkpoint_every,
                # only where a suite sets it (the latent suites), so other suites' config hashes are unchanged
                **({"micro_batch": None} if "micro_batch" in suite.method_options.get(self.name, {}) else {})}

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
        if not fit_done(ctx.workdir):
            train_sfd(ctx, hp, self.name)
        return load_fitted(ctx.workdir / "model.safetensors", ctx.suite, ctx.teacher, ctx.device)

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        return load_fitted(path, suite, teacher, device, nfe=nfe)

    def unavailable(self, hp: dict) -> str | None:
        """Why a run with ``hp`` cannot happen here (e.g. LPIPS offline), or None."""
        if hp.get("loss") == "lpips" and lpips_loss()[0] is None:
            return lpips_loss()[1]
        return None


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
    micro = hp.get("micro_batch")
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise BadInput(f"{name}: micro_batch must be an integer >= 1 (or null), got {micro!r}")


def step_config(hp: dict, vp: DiscreteVP | None, m: int | None = None) -> SFDStepConfig:
    """The iteration settings of first-stage SFD / SFD-v hyperparameters ``hp``."""
    options = teacher_solver_options(hp["teacher_solver"], hp)
    return SFDStepConfig(m=hp["M"] if m is None else m, schedule=hp["schedule"], rho=hp["rho"], afs=hp["afs"],
                         teacher_solver=hp["teacher_solver"], teacher_options=tuple(options.items()),
                         loss=hp["loss"], vp=vp, micro_batch=hp.get("micro_batch"))


def learning_rate(hp: dict) -> Callable[[int], float]:
    return functools.partial(lr_at, iterations=hp["iterations"], lr=hp["lr"])


def train_sfd(ctx: FitContext, hp: dict, method: str = "sfd") -> None:
    """Fine-tune the suite's student (a copy of the teacher) with SFD, checkpointing every
    ``checkpoint_every`` iterations, and write ``model.safetensors`` (+ sampling settings) and ``fit.json``."""
    suite = ctx.suite
    student = suite.make_student(ctx.teacher)
    sigmas = schedule_for(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                      suite.discrete_vp).to(ctx.device)
    cfg = step_config(hp, suite.discrete_vp)
    lpips = lpips_loss()[0] if hp["loss"] == "lpips" else None

    def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
        return sfd_iteration(model, counted_teacher, optimizer, latents, sigmas, cfg, student_cond=cond,
                             teacher_cond=cond, lpips=lpips, fp16=fp16)

    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": hp["num_steps"], "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                "nfe": ctx.nfe}

    def snapshot(iteration, accounting, log):
        save_snapshot(ctx.workdir, iteration, student, method, suite.name, hp, sampling, accounting, log)

    accounting, log = train_loop(ctx.workdir, student, ctx.teacher, LoopSettings.from_hyperparameters(hp),
                                 learning_rate(hp), ctx.device, suite.latent_shape, f"fit {method} NFE {ctx.nfe}",
                                 ctx.progress, step, conditioning=suite.training_conditioning, devices=ctx.devices,
                                 data_parallel=True, snapshot=snapshot, snapshot_every=ctx.snapshot_every)
    save_student(ctx.workdir, student, method, suite.name, hp, sampling, accounting, log)


register_method(SFDMethod(name="sfd", display="SFD",
                          description="Simple and Fast Distillation, first stage: one model per NFE, Euler + AFS"))
