"""Progressive distillation (``pd``; Salimans & Ho, ICLR 2022, arXiv 2202.00512) and guided
distillation (``guided-pd``; Meng et al., CVPR 2023, arXiv 2210.03142), rerun on the suite's own
teacher in the EDM sigma parametrisation (``docs/algorithms.md``, "Progressive distillation and
guided distillation").

PD, one round (teacher: 2N Euler = DDIM steps, student: N steps, both on the grid
sigma(u) of the schedule family, the fine grid g_0 > g_1 > ... > g_2N = sigma_min):

    x_0 ~ data,  eps ~ N(0, I),  i ~ U{0..N-1},  t = g_2i, t' = g_2i+1, s = g_2i+2,  x_t = x_0 + t eps
    x'  = x_t + (t' - t) (x_t - D_teacher(x_t; t)) / t                          (no gradient)
    x'' = x'  + (s - t') (x' - D_teacher(x'; t')) / t'
    D~  = (x'' - (s / t) x_t) / (1 - s / t)       (one Euler step t -> s with D~ lands on x'')
    L   = mean_b [ max(1 / t^2, 1) * mean_pixels (D_student(x_t; t) - D~)^2 ]   (truncated SNR, SNR = 1/t^2)

The student starts as a copy of the round's teacher, with dropout 0 (it trains in eval mode);
Adam (0.9, 0.999, 1e-8), learning rate annealed linearly to 0 within each round, gradient norm
clipped to 1, a fresh optimiser every round. After a round the student becomes the next round's
frozen teacher and N halves, from ``start_steps`` down to the requested NFE. Sampling: N = NFE
Euler steps on the student grid from sigma_max z, so NFE = N.

Guided distillation adds a first stage: a copy of the class-conditional teacher with a
w-condition (SFD-v's step-condition branch of ``networks.adapters``, reused with the guidance
scale w as its input, projections zero-initialised so that the copy equals the teacher for every
w) regresses the classifier-free-guided teacher D^w = D_u + w (D_c - D_u) (the project's
convention: w = 1 is the conditional model) at noise levels of PD's first grid, w ~ U[w_lo, w_hi]
per example, with the same truncated-SNR weight. Then PD on that network, with the same w inside
each pair of teacher steps and in the student, and sampling at one w with one network call per
step.

Data: real training images from ``suite.training_data`` (counted as ``real_images``) where the
suite has them in its latent shape; otherwise (latent suites, suites without data) a fixed pool
of teacher samples, generated once with Heun and counted (``data = teacher-samples``, a data-free
variant that is not the paper recipe).

Every stage is one ``training.train_loop`` in its own folder ``stage-<k>-...`` (checkpointed,
resumable, seeded per stage) and writes its own student model file. Without a FLOP budget the
stages live in a folder shared by every NFE (``<method>-chain-<hash>`` beside the fit's work
folder: the chain to NFE 1 passes through NFE 2 and 4), with a budget in the fit's own folder. The
fit's ``model.safetensors`` / ``fit.json`` carry the total cost: wall seconds, teacher and
student evaluations, FLOPs and real images summed over the stages (and the teacher-sample pool).
``budget_flops`` caps the total (``budget_split``: ``even`` spreads what is left equally over the
stages still to run; ``sequential`` runs stages at full length and stops where the budget ends).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import CountingDenoiser, Denoiser
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.training import (
    Accounting,
    LoopSettings,
    Stopwatch,
    check_loop_settings,
    device_name,
    fit_done,
    load_student,
    per_sample_flops,
    read_fit,
    sanitize_gradients,
    save_snapshot,
    save_student,
    train_loop,
)
from sfdbench.networks.adapters import attach_step_condition

DATA_SOURCES = ("real", "teacher-samples")
BUDGET_SPLITS = ("even", "sequential")
POOL_CHUNK = 256  # teacher-sample pool: samples per teacher call while generating it
POOL_FILE = "teacher-pool.pt"

# ---------------------------------------------------------------------------------------------
# The math (tensors in, tensors out)


def pd_grid(kind: str, student_steps: int, sigma_min: float, sigma_max: float, rho: float, vp=None) -> torch.Tensor:
    """The round's fine grid: 2N + 1 noise levels sigma(j / 2N), j = 0..2N, of the schedule family
    (polynomial: sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho).
    The teacher steps on all of it, the student on every other point (the N + 1-point grid)."""
    return schedule_for(kind, 2 * student_steps + 1, sigma_min, sigma_max, rho, vp)


def _column(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def euler_target(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x_end: torch.Tensor) -> torch.Tensor:
    """D~ = (x_end - (s/t) x_t) / (1 - s/t): the denoiser value whose Euler step
    x_t + (s - t)(x_t - D~)/t from t to s lands exactly on ``x_end`` (PD's target in EDM's
    form; the VP form (z'' - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t) is the same)."""
    ratio = _column(s, x_t) / _column(t, x_t)
    return (x_end - ratio * x_t) / (1 - ratio)


def two_teacher_steps(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, s: torch.Tensor,
                      cond: dict) -> torch.Tensor:
    """x'' after two Euler (= DDIM) teacher steps t -> t' -> s (per-sample noise levels [B])."""
    tc, mc, sc = _column(t, x_t), _column(t_mid, x_t), _column(s, x_t)
    x_mid = x_t + (mc - tc) * (x_t - teacher(x_t, t, **cond)) / tc
    return x_mid + (sc - mc) * (x_mid - teacher(x_mid, t_mid, **cond)) / mc


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = 1 / sigma^2 (x = x_0 + sigma eps): PD's "truncated SNR" weighting,
    i.e. max(x-MSE, eps-MSE) per example."""
    return torch.clamp(sigma.float().pow(-2), min=1.0)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_b [ weight_b * mean over pixels (prediction - target)^2 ]."""
    per_example = (prediction.float() - target.float()).square().flatten(1).mean(1)
    return (weight.float() * per_example).mean()


def doubled_conditioning(uncond: dict, cond: dict, batch: int) -> dict:
    """[unconditional; conditional] conditioning of one doubled batch: per-sample tensors are
    concatenated, anything else is passed on as it is."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = torch.cat([uncond.get(key, value), value])
        else:
            out[key] = value
    return out


def guided_target(teacher: Denoiser, x: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor, cond: dict,
                  unconditional) -> torch.Tensor:
    """D^w = D_u + w (D_c - D_u) with a per-example w [B], both branches in one doubled batch
    (2 teacher evaluations per example); ``unconditional(cond)`` removes the class labels."""
    both = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]),
                   **doubled_conditioning(unconditional(cond), cond, x.shape[0]))
    d_uncond, d_cond = both.chunk(2)
    return d_uncond + _column(w, x) * (d_cond - d_uncond)


# ---------------------------------------------------------------------------------------------
# Training data


class TrainingImages:
    """x_0 for PD: the suite's real training images (``real``) or a fixed pool of teacher samples
    (``teacher-samples``). ``draw(batch, generator)`` -> (x_0, cond, real images used)."""

    def __init__(self, suite, device: torch.device, kind: str, pool: dict | None = None):
        self.suite, self.device, self.kind, self.pool = suite, device, kind, pool

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, dict, int]:
        if self.kind == "real":
            images, cond = self.suite.training_data(batch, generator)
            if tuple(images.shape[1:]) != tuple(self.suite.latent_shape):
                raise BadInput(f"suite {self.suite.name!r}: its training images have shape {tuple(images.shape[1:])}, "
                               f"not the latent shape {tuple(self.suite.latent_shape)}; use data=teacher-samples")
            return images.to(self.device, torch.float32), _to(cond, self.device), batch
        idx = torch.randint(len(self.pool["x0"]), (batch,), generator=generator)
        return (self.pool["x0"][idx].to(self.device),
                {k: v[idx].to(self.device) for k, v in self.pool["cond"].items()}, 0)


def _to(cond: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


def default_data(suite) -> str:
    """``real`` when the suite hands out training images in its latent shape, else ``teacher-samples``."""
    try:
        images, _ = suite.training_data(1, torch.Generator().manual_seed(0))
    except BadInput:
        return "teacher-samples"
    return "real" if tuple(images.shape[1:]) == tuple(suite.latent_shape) else "teacher-samples"


def teacher_pool(ctx: FitContext, hp: dict, folder: Path) -> dict:
    """The fixed pool of teacher samples (``data = teacher-samples``): ``pool_size`` samples of the
    suite's training conditioning, Heun on ``pool_num_steps`` timestamps of the schedule and then
    the final denoising x_0 = D(x, sigma_min) (18 timestamps: 2 x 17 + 1 = 35 NFE, EDM's sampler),
    latents from one generator seeded with ``fit_seed``. Written once to ``teacher-pool.pt`` with its cost
    (wall seconds, teacher evaluations, FLOPs) in ``folder``; every fit that uses it adds that cost
    to its own."""
    path = folder / POOL_FILE
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadInput(f"corrupt teacher-sample pool {path} ({exc}); delete it to regenerate it") from exc
    suite, device = ctx.suite, torch.device(ctx.device)
    watch = Stopwatch()
    gen = torch.Generator().manual_seed(hp["fit_seed"])
    latents = torch.randn(hp["pool_size"], *suite.latent_shape, generator=gen)
    cond = suite.training_conditioning(hp["pool_size"], gen)
    sigmas = schedule_for(hp["schedule"], hp["pool_num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                          suite.discrete_vp)
    counted = CountingDenoiser(ctx.teacher)
    chunks = []
    with torch.no_grad():
        for start in range(0, hp["pool_size"], POOL_CHUNK):
            part = {k: v[start:start + POOL_CHUNK].to(device) for k, v in cond.items()}
            x = solvers.sample(solvers.heun, counted, latents[start:start + POOL_CHUNK].to(device), sigmas, cond=part)
            chunks.append(counted(x, sigmas[-1].to(x.dtype), **part).cpu())
    one = _to(suite.training_conditioning(1, torch.Generator().manual_seed(0)), device)
    per = per_sample_flops(ctx.teacher, suite.latent_shape, one, False, device)
    pool = {"x0": torch.cat(chunks), "cond": dict(cond),
            "cost": {"wall_seconds": watch.seconds, "teacher_evaluations": counted.samples,
                     "flops": float(counted.samples * per), "solver": "heun",
                     "num_steps": hp["pool_num_steps"], "size": hp["pool_size"]}}
    buf = io.BytesIO()
    torch.save(pool, buf)
    atomic_write_bytes(path, buf.getvalue())
    return pool


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Stage:
    """One training stage: ``guide`` (guided distillation's w-conditioned stage at the first grid)
    or ``round`` (a PD round: 2N teacher steps -> N student steps)."""

    index: int
    kind: str
    student_steps: int

    @property
    def folder(self) -> str:
        if self.kind == "guide":
            return f"stage-{self.index}-guide"
        return f"stage-{self.index}-pd-{2 * self.student_steps}to{self.student_steps}"


def plan_stages(start_steps: int, nfe: int, guided: bool) -> list[Stage]:
    """The guided stage (if any), then PD rounds start_steps -> start_steps/2 -> ... -> nfe."""
    stages = [Stage(0, "guide", start_steps)] if guided else []
    n = start_steps // 2
    while n >= nfe:
        stages.append(Stage(len(stages), "round", n))
        n //= 2
    return stages


def is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# The method


FIT_INFO_KEYS = ("stages", "teacher_evaluations", "student_evaluations", "student_forward", "student_backward",
                 "aux_evaluations", "real_images", "real_images_used", "data", "teacher_pool", "stopped_at_budget",
                 "distilled_nfe", "requested_nfe_reached", "budget_note", "teacher_trajectories",
                 "includes_teacher_trajectories", "stage_folder", "bad_gradients", "nan_loss_iterations", "device",
                 "devices")


@dataclass
class PDMethod(Method):
    """Progressive distillation on the suite's teacher (``docs/algorithms.md``, "Progressive
    distillation and guided distillation").

    Defaults: start at 4096 Euler steps (the PD-in-EDM CIFAR-10 recipe), Adam lr 5e-5 annealed
    linearly to 0 per round, gradient clip 1, truncated-SNR L2, batch 128. Iterations per round:
    the suite's ``pd`` setting; without one, 3 x the suite's SFD iterations (the ratio of the
    scaled-down native PD row to SFD) and SFD's batch and checkpoint interval; a suite without SFD
    settings gets 50k (the paper's)."""

    group: str = "distillation"
    guided: bool = False
    start_steps: int = 4096
    iterations: int = 50_000
    batch: int = 128
    lr: float = 5e-5
    grad_clip: float = 1.0
    fit_seed: int = 0
    checkpoint_every: int = 50
    pool_size: int = 1500
    pool_num_steps: int = 18
    sfd_length_factor: int = 3
    guidance_range: tuple = (1.0, 5.0)  # the project's w (1 = conditional) = Meng et al.'s [0, 4]

    def nfe_rule(self) -> str:
        return "NFE 1, 2, 4, ... (a power of two below start_steps; one model per NFE, NFE = N Euler steps)"

    def supports(self, nfe: int) -> bool:
        return is_power_of_two(nfe) and nfe < self.start_steps

    def supports_in(self, suite, nfe: int) -> bool:
        start = suite.method_options.get(self.name, {}).get("start_steps", self.start_steps)
        return is_power_of_two(nfe) and is_power_of_two(start) and nfe < start

    def display_name(self, hp: dict) -> str:
        name = self.display
        if self.guided:
            name += f" (w={hp['guidance']:g})"
        if hp.get("data") == "teacher-samples":
            name += " [data=teacher-samples]"
        return name  # the harness adds the budget to the name of a budget_flops row

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        sfd = suite.method_options.get("sfd", {})
        discrete = suite.discrete_vp is not None
        hp = {"start_steps": self.start_steps, "rounds": "start_steps -> start_steps/2 -> ... -> NFE",
              "schedule": "discrete" if discrete else "polynomial", "rho": 1.0 if discrete else 7.0,
              "sigma_min": suite.sigma_min, "sigma_max": suite.sigma_max,
              "iterations": self.sfd_length_factor * sfd["iterations"] if "iterations" in sfd else self.iterations,
              "batch": sfd.get("batch", self.batch), "lr": self.lr, "lr_schedule": "linear to 0 within each stage",
              "grad_clip": self.grad_clip, "optimizer": "adam(0.9,0.999,1e-8), reset every stage",
              "loss": "truncated-snr-l2", "loss_weight": "max(1/sigma^2, 1)",
              "target": "two teacher Euler steps -> one student Euler step (D~ = (x'' - (s/t) x_t) / (1 - s/t))",
              "student_mode": "eval (dropout 0)", "fit_seed": self.fit_seed, "precision": "fp32",
              "checkpoint_every": sfd.get("checkpoint_every", self.checkpoint_every), "sampler": "euler",
              "data": default_data(suite), "pool_size": self.pool_size, "pool_num_steps": self.pool_num_steps,
              "pool_solver": "heun + final D(x, sigma_min)", "budget_flops": None, "budget_split": "even"}
        if self.guided:
            hp.update({"guidance_range": list(self.guidance_range), "guidance": float(suite.guidance),
                       "guidance_iterations": hp["iterations"],
                       "guidance_condition": "w through the step-condition branch, zero-initialised projections",
                       "guidance_formula": "D_u + w (D_c - D_u)"})
        return hp

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        name = self.name
        if self.guided and "guidance_iterations" not in suite.method_options.get(name, {}):
            hp["guidance_iterations"] = hp["iterations"]  # follows an overridden per-round length
        if not is_power_of_two(hp["start_steps"]) or hp["start_steps"] < 2:
            raise BadInput(f"{name}: start_steps must be a power of two >= 2, got {hp['start_steps']!r}")
        if is_power_of_two(nfe) and nfe >= hp["start_steps"]:
            raise BadInput(f"{name}: NFE {nfe} needs start_steps above it (got {hp['start_steps']})")
        check_loop_settings(name, hp, ("iterations", "batch", "checkpoint_every", "pool_size", "pool_num_steps")
                            + (("guidance_iterations",) if self.guided else ()))
        if hp["pool_num_steps"] < 2:
            raise BadInput(f"{name}: pool_num_steps must be >= 2, got {hp['pool_num_steps']}")
        if hp["data"] not in DATA_SOURCES:
            raise BadInput(f"{name}: data must be one of {', '.join(DATA_SOURCES)}, got {hp['data']!r}")
        if hp["budget_split"] not in BUDGET_SPLITS:
            raise BadInput(f"{name}: budget_split must be one of {', '.join(BUDGET_SPLITS)}, "
                           f"got {hp['budget_split']!r}")
        budget = hp["budget_flops"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise BadInput(f"{name}: budget_flops must be a positive number (or null), got {budget!r}")
        if not (isinstance(hp["lr"], (int, float)) and hp["lr"] > 0):
            raise BadInput(f"{name}: lr must be a positive number, got {hp['lr']!r}")
        if not 0 < hp["sigma_min"] < hp["sigma_max"]:
            raise BadInput(f"{name}: need 0 < sigma_min < sigma_max, got {hp['sigma_min']}, {hp['sigma_max']}")
        if hp["schedule"] == "discrete" and suite.discrete_vp is None:
            raise BadInput(f"{name}: the discrete schedule needs a discrete-VP teacher; use polynomial")
        if self.guided:
            low_high = hp["guidance_range"]
            if (not isinstance(low_high, list) or len(low_high) != 2
                    or not all(isinstance(v, (int, float)) for v in low_high) or not 0 <= low_high[0] <= low_high[1]):
                raise BadInput(f"{name}: guidance_range must be [low, high] with 0 <= low <= high, got {low_high!r}")
            w = hp["guidance"]
            if not isinstance(w, (int, float)) or not low_high[0] <= w <= low_high[1]:
                raise BadInput(f"{name}: guidance {w!r} is outside the trained guidance_range {low_high}")
        return hp

    def check_suite(self, suite) -> None:
        if self.guided and not suite.conditional:
            raise BadInput(f"{self.name} needs a class-conditional suite with a classifier-free-guidance teacher; "
                           f"suite {suite.name!r} is unconditional")

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> Fitted:
        self.check_suite(ctx.suite)
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        if not fit_done(ctx.workdir):
            self.train(ctx, hp)
        return self.load(ctx.workdir / "model.safetensors", ctx.suite, ctx.teacher, ctx.device)

    def train(self, ctx: FitContext, hp: dict) -> None:
        """Run (or resume) every stage, then write the final model and the total cost."""
        suite, device = ctx.suite, torch.device(ctx.device)
        root = self.stage_root(ctx, hp)
        root.mkdir(parents=True, exist_ok=True)
        pool = teacher_pool(ctx, hp, root) if hp["data"] == "teacher-samples" else None
        data = TrainingImages(suite, device, hp["data"], pool)
        spent = pool["cost"]["flops"] if pool else 0.0
        stages = plan_stages(hp["start_steps"], ctx.nfe, self.guided)
        reports: list[dict] = []
        student, previous = None, None
        for stage in stages:
            sdir = root / stage.folder
            budget_left = None if hp["budget_flops"] is None else float(hp["budget_flops"]) - spent
            if reports and budget_left is not None and budget_left <= 0 and hp["budget_split"] == "sequential":
                break  # the budget ended with the previous stage
            if fit_done(sdir):
                report = read_fit(sdir)["stage"]
                student = None
            else:
                before = None  # the cost before the last stage: its checkpoints report the whole fit's so far
                if stage is stages[-1]:
                    before = ((pool["cost"]["wall_seconds"] if pool else 0.0) + sum(r["wall_seconds"] for r in reports),
                              spent)
                student, report = self.train_stage(ctx, hp, stage, len(stages), data, previous, budget_left, sdir,
                                                   before)
            reports.append(report)
            spent += report["flops"]
            previous = sdir / "model.safetensors"
        if student is None:
            student, _ = load_student(previous, suite, ctx.teacher, device)
        self.write_final(ctx, hp, student, reports, pool, root)

    def stage_root(self, ctx: FitContext, hp: dict) -> Path:
        """Where the stages live. Without a FLOP budget the rounds do not depend on the NFE (the
        chain to NFE 1 passes through NFE 2 and 4), so they live in a sibling folder shared by every
        NFE, named by a hash of the suite, the teacher, the method and its hyperparameters (all but
        the sampling ``guidance``, so guided-pd at another w reuses the chain too): a fit for
        a smaller NFE continues the chain. With a budget the split depends on the NFE: the fit's own
        folder. Each NFE's fit reports the whole cost of the stages it used."""
        if hp["budget_flops"] is not None:
            return ctx.workdir
        trained = {k: v for k, v in hp.items() if k != "guidance"}  # the sampling w does not change training
        key = json.dumps({"suite": ctx.suite.name, "teacher": ctx.teacher_id, "method": self.name,
                          "hyperparameters": trained}, sort_keys=True, default=str)
        return ctx.workdir.parent / f"{self.name}-chain-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def stage_teacher_student(self, ctx: FitContext, hp: dict, stage: Stage, previous: Path | None):
        """(frozen teacher, trainable student) of a stage: the suite's teacher and its copy (with the
        zero-initialised w-condition for the guided stage) first, then the previous stage's student
        (from its file) and a copy of it. The student trains in eval mode: dropout 0."""
        suite, device = ctx.suite, torch.device(ctx.device)
        if previous is None:
            teacher = ctx.teacher
            student = suite.make_student(ctx.teacher)
            if stage.kind == "guide":
                student = attach_step_condition(student, hp["fit_seed"], "zero")
        else:
            teacher, _ = load_student(previous, suite, ctx.teacher, device)
            student = suite.make_student(teacher)
        return teacher, student.to(device).requires_grad_(True).eval()

    def stage_length(self, ctx, hp, stage, stages_total, teacher, student, budget_left) -> tuple[int, float | None]:
        """(iterations, the loop's FLOP budget) of a stage. Even split: what is left of the budget
        divided by the stages still to run, in whole iterations (at least one) of
        batch x (2 teacher forwards + 1 student forward/backward) FLOPs; sequential: full length,
        stopped by the loop where the budget ends."""
        planned = hp["guidance_iterations"] if stage.kind == "guide" else hp["iterations"]
        if budget_left is None or hp["budget_split"] == "sequential":
            return planned, budget_left
        device = torch.device(ctx.device)
        one = _to(ctx.suite.training_conditioning(1, torch.Generator().manual_seed(0)), device)
        per_iteration = hp["batch"] * (2 * per_sample_flops(teacher, ctx.suite.latent_shape, one, False, device)
                                       + per_sample_flops(student, ctx.suite.latent_shape, one, True, device))
        share = budget_left / (stages_total - stage.index)
        return max(1, min(planned, int(share // per_iteration))), None

    def train_stage(self, ctx: FitContext, hp: dict, stage: Stage, stages_total: int, data: TrainingImages,
                    previous: Path | None, budget_left: float | None, sdir: Path,
                    before: tuple | None = None) -> tuple[torch.nn.Module, dict]:
        """One stage; ``before`` (last stage only): (wall seconds, FLOPs) spent by the earlier stages,
        so that intermediate checkpoints (``ctx.snapshot_every``) report the fit's cost up to them."""
        suite, device = ctx.suite, torch.device(ctx.device)
        setup = Stopwatch()  # building the stage's networks and sizing it count as the stage's wall time
        teacher, student = self.stage_teacher_student(ctx, hp, stage, previous)
        iterations, loop_budget = self.stage_length(ctx, hp, stage, stages_total, teacher, student, budget_left)
        n = stage.student_steps
        grid = pd_grid(hp["schedule"], n, hp["sigma_min"], hp["sigma_max"], hp["rho"], suite.discrete_vp)
        grid = grid.to(device, torch.float32)
        low, high = hp["guidance_range"] if self.guided else (1.0, 1.0)
        guide_stage = stage.kind == "guide"

        def step(model, latents, _cond, optimizer, counted_teacher, fp16, it):
            batch = latents.shape[0]
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
            x0, cond, real = data.draw(batch, generator)
            eps = latents
            w = low + (high - low) * torch.rand(batch, device=device) if self.guided else None
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16):
                if guide_stage:  # noise levels: the first PD round's teacher grid g_0 .. g_{2N-1}
                    sigma = grid[torch.randint(2 * n, (batch,), device=device)]
                    x = x0 + _column(sigma, eps) * eps
                    with torch.no_grad():
                        target = guided_target(counted_teacher, x, sigma, w, cond, suite.unconditional)
                    student_cond = {**cond, "step_condition": w}
                else:
                    i = torch.randint(n, (batch,), device=device)
                    sigma, t_mid, s = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
                    x = x0 + _column(sigma, eps) * eps
                    student_cond = {**cond, "step_condition": w} if self.guided else cond
                    with torch.no_grad():
                        x_end = two_teacher_steps(counted_teacher, x, sigma, t_mid, s, student_cond)
                        target = euler_target(x, sigma, s, x_end)
                optimizer.zero_grad(set_to_none=True)
                prediction = model(x, sigma, **student_cond)
            loss = weighted_mse(prediction, target, truncated_snr_weight(sigma))
            loss.backward()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            bad = sanitize_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
            optimizer.step()
            value = float(loss.detach())
            return {"losses": [value], "bad_gradients": bad, "loss_nan": math.isnan(value), "real_images": real}

        def lr(it: int) -> float:
            return hp["lr"] * (1 - it / iterations)

        setup_seconds = setup.seconds
        settings = LoopSettings(iterations, hp["batch"], hp["fit_seed"] * 1000 + stage.index, hp["checkpoint_every"],
                                hp["precision"], loop_budget)
        what = "w-conditioned stage" if guide_stage else f"round {2 * n} -> {n} steps"
        def snapshot(iteration, accounting, log):  # the final stage's student samples at the fit's NFE
            so_far = Accounting(before[0] + setup_seconds + accounting.wall_seconds, accounting.device,
                                accounting.devices, before[1] + accounting.flops)
            save_snapshot(ctx.workdir, iteration, student, self.name, suite.name, hp, self.sampling(hp, ctx.nfe),
                          so_far, log, stage=stage.index)

        accounting, log = train_loop(sdir, student, teacher, settings, lr, device, suite.latent_shape,
                                     f"fit {self.name} NFE {ctx.nfe}: {what} ({stage.index + 1}/{stages_total})",
                                     ctx.progress, step, conditioning=suite.training_conditioning,
                                     devices=ctx.devices, snapshot=snapshot if before is not None else None,
                                     snapshot_every=ctx.snapshot_every)
        accounting.wall_seconds += setup_seconds
        run = (log.get("stopped_at_budget") or {}).get("iteration", iterations)
        planned = hp["guidance_iterations"] if guide_stage else hp["iterations"]
        report = {"stage": stage.index, "kind": stage.kind, "teacher_steps": 2 * n if not guide_stage else None,
                  "student_steps": n, "iterations_planned": planned, "iterations": run,
                  "wall_seconds": accounting.wall_seconds, "flops": accounting.flops,
                  "teacher_evaluations": log["teacher_evaluations"], "student_evaluations": log["student_evaluations"],
                  "real_images": log["real_images"], "loss_last": log.get("loss_last"),
                  "bad_gradients": log.get("bad_gradients", 0),
                  "nan_loss_iterations": log.get("nan_loss_iterations", 0),
                  "flops_per_sample": log["flops"],
                  "stopped_at_budget": {"split": hp["budget_split"], "iterations": run, "iterations_planned": planned,
                                        "flops": accounting.flops} if run < planned else None}
        save_student(sdir, student, self.name, suite.name, hp, self.sampling(hp, n), accounting, log, stage=report,
                     teacher_trajectories=run * hp["batch"])
        return student, report

    def sampling(self, hp: dict, n: int) -> dict:
        s = {"solver": "euler", "afs": False, "schedule": hp["schedule"], "rho": hp["rho"], "num_steps": n + 1,
             "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"], "nfe": n}
        if self.guided:
            s.update({"guidance_condition": True, "guidance": float(hp["guidance"])})
        return s

    def write_final(self, ctx: FitContext, hp: dict, student, reports: list[dict], pool: dict | None,
                    root: Path) -> None:
        pool_cost = pool["cost"] if pool else None
        extra = pool_cost or {"wall_seconds": 0.0, "teacher_evaluations": 0, "flops": 0.0}
        total_wall = extra["wall_seconds"] + sum(r["wall_seconds"] for r in reports)
        total_flops = extra["flops"] + sum(r["flops"] for r in reports)
        accounting = Accounting(total_wall, device_name(ctx.device), ctx.devices, float(total_flops))
        student_evals = sum(r["student_evaluations"] for r in reports)
        real = sum(r["real_images"] for r in reports)
        # the last PD round that ran to its end (a sequential budget may cut the last one short)
        complete = [r for r in reports if r["kind"] == "round"
                    and not (r["stopped_at_budget"] and hp["budget_split"] == "sequential")]
        distilled = complete[-1]["student_steps"] if complete else hp["start_steps"]
        reached = distilled == ctx.nfe
        stopped = [r for r in reports if r["stopped_at_budget"]]
        log = {"teacher_evaluations": extra["teacher_evaluations"] + sum(r["teacher_evaluations"] for r in reports),
               "student_evaluations": student_evals, "student_forward": student_evals,
               "student_backward": student_evals, "aux_evaluations": 0, "real_images": real,
               "real_images_used": real, "bad_gradients": sum(r["bad_gradients"] for r in reports),
               "nan_loss_iterations": sum(r["nan_loss_iterations"] for r in reports)}
        budget = None
        if hp["budget_flops"] is not None:
            budget = {"budget_flops": float(hp["budget_flops"]), "flops": total_flops, "split": hp["budget_split"],
                      "stages_cut": [r["stage"] for r in stopped], "stages_run": len(reports),
                      "stages_planned": len(plan_stages(hp["start_steps"], ctx.nfe, self.guided)),
                      "reached_nfe": distilled} if stopped else None
        note = None if reached else (f"the FLOP budget ended before NFE {ctx.nfe} was reached: the last complete "
                                     f"round distilled to {distilled} steps; the model (stage {reports[-1]['stage']}, "
                                     f"{reports[-1]['iterations']} of {reports[-1]['iterations_planned']} iterations) "
                                     f"is sampled with {ctx.nfe}")
        sampling = self.sampling(hp, ctx.nfe)
        data = hp["data"] if hp["data"] == "real" else "teacher-samples (not the paper recipe)"
        save_student(ctx.workdir, student, self.name, ctx.suite.name, hp, sampling, accounting, log, stages=reports,
                     data=data, stage_folder=str(root),
                     teacher_pool=pool_cost, stopped_at_budget=budget, distilled_nfe=distilled,
                     requested_nfe_reached=reached, budget_note=note,
                     teacher_trajectories=sum(r["iterations"] for r in reports) * hp["batch"])

    # ------------------------------------------------------------------ load

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        """The sampler of a PD / guided-PD model file: N = NFE Euler steps on the stored grid, the
        guided student called with its stored w (one network call per step)."""
        student, meta = load_student(path, suite, teacher, device)
        s = meta["sampling"]
        if nfe is not None and nfe != s["nfe"]:
            raise BadInput(f"{path} was distilled for NFE {s['nfe']} only, not NFE {nfe} (the intermediate rounds' "
                           "models are in the stage-* folders beside it)")
        sigmas = schedule_for(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"],
                              suite.discrete_vp)
        add = {"step_condition": float(s["guidance"])} if s.get("guidance_condition") else None
        fit = read_fit(Path(path).parent)
        info = {"sampling": s, **{k: fit[k] for k in FIT_INFO_KEYS if k in fit}}
        if "stage" in fit:
            info["stage"] = fit["stage"]
        return Fitted(denoiser=student, sample=solvers.sampler(solvers.euler, sigmas, add_cond=add), nfe=s["nfe"],
                      fine_tuning=fit.get("fine_tuning"), info=info)


register_method(PDMethod(name="pd", display="PD",
                         description="progressive distillation: halving rounds of 2 teacher Euler steps -> 1 student "
                                     "step, from start_steps down to NFE (1, 2, 4, ...)"))
register_method(PDMethod(name="guided-pd", display="Guided PD", guided=True,
                         description="guided distillation: a w-conditioned copy of the guided teacher, then PD; "
                                     "samples at one guidance w with 1 network call per step"))
