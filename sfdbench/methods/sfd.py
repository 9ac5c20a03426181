"""Simple and Fast Distillation (SFD; Zhou et al., NeurIPS 2024, arXiv 2409.19681), first stage.

The whole network is fine-tuned so that ONE Euler step per interval of a coarse schedule
t_0 > ... > t_{N-1} lands where a strong teacher solver (DPM-Solver++(3M) with K = M + 1 steps
per student interval, on the nested fine schedule) lands. Data-free: only Gaussian noise.
The spec is ``shared/docs/sfd-spec.md`` section 4; the reference's quirks we keep are noted
where they matter (step-by-step optimiser updates, detached student trajectory, L1 summed
over pixels and averaged over samples, AFS interval untrained, LR / 10 at half of training,
NaN gradients zeroed).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import Denoiser, EDMPrecond, analytic_first_direction
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.harness.accounting import Accounting, Stopwatch, device_name
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.networks.checkpoint import atomic_write_bytes, load_weights, read_metadata, save_weights

# ---------------------------------------------------------------------------------------------
# The math (tensors in, tensors out)


def teacher_targets(teacher: Denoiser, x_start: torch.Tensor, student_sigmas: torch.Tensor, m: int,
                    schedule: str, rho: float, teacher_options: dict) -> torch.Tensor:
    """Teacher states at the student timestamps t_1..t_{N-1}: shape [N-1, *x.shape].

    The teacher runs DPM-Solver++ (``teacher_options``) without AFS on the nested schedule of
    N_T = (M+1)(N-1)+1 timestamps from the same formula, so teacher index (M+1)k is student
    index k (spec 4.3)."""
    n = len(student_sigmas)
    k = m + 1
    sigma_min, sigma_max = float(student_sigmas[-1]), float(student_sigmas[0])
    teacher_sigmas = get_schedule(schedule, k * (n - 1) + 1, sigma_min, sigma_max, rho)
    with torch.no_grad():
        traj = solvers.trajectory(solvers.dpmpp_multistep, teacher, x_start, teacher_sigmas, afs=False,
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


def sfd_iteration(student: Denoiser, teacher: Denoiser, optimizer: torch.optim.Optimizer,
                  latents: torch.Tensor, sigmas: torch.Tensor, m: int, schedule: str, rho: float,
                  afs: bool, teacher_options: dict) -> dict:
    """One SFD training iteration on one batch of trajectories (spec 4.4).

    For each interval k in order: one Euler student step from the student's own (detached)
    state, L1 to the teacher state at t_{k+1}, and an immediate optimiser step. The AFS
    interval (k = 0) has no network call and is not trained."""
    sigmas = sigmas.to(latents.dtype)
    x = latents * sigmas[0]
    targets = teacher_targets(teacher, x, sigmas, m, schedule, rho, teacher_options)
    losses, bad_grads = [], 0
    for k in range(len(sigmas) - 1):
        analytic = afs and k == 0
        optimizer.zero_grad(set_to_none=True)
        x_next = student_euler_step(student, x, sigmas[k], sigmas[k + 1], analytic)
        loss = l1_sum_mean(x_next, targets[k])
        if not analytic:
            loss.backward()
            bad_grads += sanitize_gradients(p for group in optimizer.param_groups for p in group["params"])
            optimizer.step()
        losses.append(float(loss.detach()))
        x = x_next.detach()
    return {"losses": losses, "bad_gradients": bad_grads, "loss_nan": any(math.isnan(v) for v in losses)}


def lr_at(iteration: int, iterations: int, lr: float) -> float:
    """Reference LR rule: after the iteration whose pre-increment counter reaches half of training,
    the LR is divided by 10 for all later iterations (spec 4.6)."""
    return lr / 10 if iteration >= 1 and (iteration - 1) >= iterations / 2 else lr


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
        if hp["num_steps"] != nfe + 1 + int(hp["afs"]):
            raise BadInput("sfd: num_steps follows from the NFE (N = NFE + 1 + AFS); do not set it")
        return hp

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        final = ctx.workdir / "model.safetensors"
        if not (final.is_file() and (ctx.workdir / "fit.json").is_file()):
            train_sfd(ctx, hp)
        return load_fitted(final, ctx.teacher, ctx.device)


def train_sfd(ctx: FitContext, hp: dict) -> None:
    """Fine-tune a copy of the teacher with SFD, checkpointing every ``checkpoint_every``
    iterations, and write ``model.safetensors`` (+ sampling settings) and ``fit.json``."""
    teacher = ctx.teacher
    if not isinstance(teacher, EDMPrecond):
        raise BadInput("SFD needs an EDM-preconditioned teacher network")
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    sigmas = get_schedule(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"]).to(ctx.device)
    teacher_options = {k: hp[k] for k in ("max_order", "predict_x0", "lower_order_final", "thresholding")}
    ckpt_path = ctx.workdir / "checkpoint.pt"
    state = _load_checkpoint(ckpt_path, student, optimizer)
    start_it, watch, log = state["iteration"], Stopwatch(state["wall_seconds"]), state["log"]
    shape = (hp["batch"], *ctx.suite.image_shape)
    iterations = hp["iterations"]
    progress = ctx.progress or _null_progress
    with progress(f"fit sfd NFE {ctx.nfe}", iterations) as advance:
        advance(start_it)
        for it in range(start_it, iterations):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, iterations, hp["lr"])
            # Each iteration's noise and dropout masks come from a seed derived from (fit_seed,
            # iteration), so a resumed fit replays exactly what an uninterrupted one would.
            with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
                torch.manual_seed(iteration_seed(hp["fit_seed"], it))
                latents = torch.randn(shape, device=ctx.device)
                out = sfd_iteration(student, teacher, optimizer, latents, sigmas, hp["M"], hp["schedule"],
                                    hp["rho"], hp["afs"], teacher_options)
            log["bad_gradients"] += out["bad_gradients"]
            log["nan_loss_iterations"] += int(out["loss_nan"])
            log["loss_last"] = out["losses"]
            advance(info=f"L1 {sum(out['losses'][int(hp['afs']):]):.3f}")
            if (it + 1) % hp["checkpoint_every"] == 0 and it + 1 < iterations:
                _save_checkpoint(ckpt_path, student, optimizer, it + 1, watch.seconds, log)
    accounting = Accounting(watch.seconds, device_name(ctx.device), 1)
    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": hp["num_steps"], "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                "nfe": ctx.nfe}
    meta = {"kind": "sfd-student", "config": student.net.config, "sigma_data": student.sigma_data,
            "sampling": sampling, "hyperparameters": hp}
    save_weights(student.net, ctx.workdir / "model.safetensors", meta)
    fit = {"fine_tuning": accounting.to_dict(), "hyperparameters": hp, "sampling": sampling, **log,
           "teacher_trajectories": iterations * hp["batch"], "includes_teacher_trajectories": True}
    atomic_write_bytes(ctx.workdir / "fit.json", (json.dumps(fit, indent=2) + "\n").encode())
    ckpt_path.unlink(missing_ok=True)


def load_fitted(path: Path, teacher: EDMPrecond, device) -> Fitted:
    """Load a distilled student (safetensors + its sampling settings) as a ``Fitted`` sampler."""
    from sfdbench.networks.digits_unet import DigitsUNet

    meta = read_metadata(path)
    if meta.get("kind") != "sfd-student" or "sampling" not in meta:
        raise BadInput(f"{path} is not an sfdbench SFD student (its metadata has no sampling settings)")
    net = load_weights(DigitsUNet(**meta["config"]), path)
    s = meta["sampling"]
    student = EDMPrecond(net, s["sigma_min"], s["sigma_max"], meta["sigma_data"]).to(device).eval()
    student.requires_grad_(False)
    sigmas = get_schedule(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"])

    def sample(denoiser, latents):
        return solvers.sample(solvers.euler, denoiser, latents, sigmas, afs=s["afs"])

    fit_json = Path(path).parent / "fit.json"
    fit = json.loads(fit_json.read_text()) if fit_json.is_file() else {}
    info = {"sampling": s, "loss": meta.get("hyperparameters", {}).get("loss"),
            "bad_gradients": fit.get("bad_gradients"), "nan_loss_iterations": fit.get("nan_loss_iterations")}
    return Fitted(denoiser=student, sample=sample, nfe=s["nfe"], fine_tuning=fit.get("fine_tuning"), info=info)


def iteration_seed(fit_seed: int, iteration: int) -> int:
    return (fit_seed * 1_000_003 + iteration) % 2**32


def _save_checkpoint(path: Path, student, optimizer, iteration: int, wall: float, log: dict) -> None:
    import io

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
