"""Second-stage SFD: one NFE (SFD paper, Zhou et al. 2024, Sec. 4.3; ``docs/algorithms.md``,
"Second-stage SFD").

The first-stage model is the SFD-v model, obtained through SFD-v's API
(``sfd_v.SFDVMethod.ensure_model``: trained, or reused from its shared folder). It is both the
teacher (a frozen copy in eval mode) and the student's initialisation. Teacher: Euler with the
first-stage model's own AFS on N_T = (M+1)(N-1)+1 = 7 timestamps and step condition 7; student:
Euler with N = 3 and AFS, so interval 0 is analytic (untrained) and interval 1 is the one trained
step -> 1 NFE, step condition 3. The schedule (type, rho, sigma range) is the first stage's, for
teacher and student alike.

Loss: L1 on every interval plus, on the last one, the batch-mean LPIPS weighted by C*H*W (the
reference's implicit weight) where LPIPS can run. Offline it cannot (``sfd.lpips_loss`` says
why: no piq / VGG16 weights): then the loss is L1 alone
and the fit info says ``"l1 (lpips unavailable: <reason>)"``.

Compute accounting: ``fine_tuning`` is the whole cost of the 1-NFE model, first stage included
(``fine_tuning_first_stage`` and ``fine_tuning_second_stage`` in the fit info give the split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sfdbench.diffusion.denoiser import Denoiser
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.sfd import SFDStepConfig, learning_rate, load_fitted, lpips_loss, sfd_iteration
from sfdbench.methods.sfd_v import SFDVMethod, TrainedModel
from sfdbench.methods.training import (
    Accounting,
    LoopSettings,
    check_loop_settings,
    fit_done,
    load_student,
    save_student,
    train_loop,
)

LOSSES = ("l1+lpips", "l1")
# Fixed by the method or by its first stage (set those on sfd-v instead)
FIXED = ("first_stage", "num_steps", "M", "teacher_solver", "teacher_num_steps", "teacher_afs",
         "teacher_step_condition", "step_condition", "afs", "schedule", "rho", "sigma_min", "sigma_max", "sampler")


@dataclass
class SFDStage2Method(Method):
    group: str = "distillation"
    data_parallel: bool = True  # the batch splits over torchrun processes (methods/training.py)
    num_steps: int = 3
    m: int = 2
    iterations: int = 15625  # 2000 kimg at batch 128 (the paper's CIFAR-10 length)
    batch: int = 128
    lr: float = 5e-4  # the paper's stage-2 lr (10x its first stage)
    fit_seed: int = 0
    checkpoint_every: int = 50
    loss: str = "l1+lpips"
    # Stage 2 trains 10x as long as SFD (2000 vs 200 kimg): without its own setting it takes the
    # suite's SFD length x 10, and SFD's batch and checkpoint interval.
    sfd_length_factor: int = 10

    def nfe_rule(self) -> str:
        return "NFE 1 only (Euler, N = 3 with AFS)"

    def supports(self, nfe: int) -> bool:
        return nfe == 1

    def first_stage(self) -> SFDVMethod:
        from sfdbench.methods import get_method

        return get_method("sfd-v")

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        first = self.first_stage().shared_hyperparameters(suite)
        sfd = suite.method_options.get("sfd", {})
        n_teacher = (self.m + 1) * (self.num_steps - 1) + 1
        return {"first_stage": {"method": "sfd-v", **first}, "num_steps": self.num_steps, "M": self.m,
                "teacher_solver": "euler", "teacher_num_steps": n_teacher, "teacher_afs": first["afs"],
                "teacher_step_condition": n_teacher, "step_condition": self.num_steps, "afs": True,
                "schedule": first["schedule"], "rho": first["rho"], "sigma_min": first["sigma_min"],
                "sigma_max": first["sigma_max"], "loss": self.loss,
                "lpips_weight": "batch-mean LPIPS x C*H*W on the last interval",
                "iterations": self.sfd_length_factor * sfd["iterations"] if "iterations" in sfd else self.iterations,
                "batch": sfd.get("batch", self.batch), "lr": self.lr, "lr_drop": "x0.1 at half",
                "optimizer": "adam(0.9,0.999,1e-8)", "student_mode": "train (dropout on)", "fit_seed": self.fit_seed,
                "precision": "fp32", "sampler": "euler",
                "checkpoint_every": sfd.get("checkpoint_every", self.checkpoint_every)}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        overrides = suite.method_options.get(self.name, {})
        fixed = [k for k in FIXED if k in overrides]
        if fixed:
            raise BadInput(f"{self.name}: {fixed[0]} is fixed by the method or its first stage; set the first "
                           "stage's settings on sfd-v (e.g. --set sfd-v.rho=5)")
        if hp["loss"] not in LOSSES:
            raise BadInput(f"{self.name}: loss must be one of {', '.join(LOSSES)}, got {hp['loss']!r}")
        check_loop_settings(self.name, hp, ("iterations", "batch", "checkpoint_every"))
        return hp

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        if not fit_done(ctx.workdir):
            first = self.first_stage().ensure_model(ctx, ctx.workdir.parent)
            train_stage2(ctx, hp, first, self.name)
        return load_fitted(ctx.workdir / "model.safetensors", ctx.suite, ctx.teacher, ctx.device)

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        return load_fitted(path, suite, teacher, device, nfe=nfe)


def resolve_loss(kind: str):
    """(LPIPS function or None, the loss as recorded): LPIPS is used where it can run."""
    if kind == "l1":
        return None, "l1"
    lpips, reason = lpips_loss()
    if lpips is None:
        return None, f"l1 (lpips unavailable: {reason})"
    return lpips, "l1 + lpips (last interval, weight C*H*W)"


def train_stage2(ctx: FitContext, hp: dict, first: TrainedModel, method: str = "sfd-stage2") -> None:
    suite = ctx.suite
    teacher, meta = load_student(first.path, suite, ctx.teacher, ctx.device)  # frozen, eval mode (dropout off)
    s = meta["sampling"]
    for key in ("schedule", "rho", "sigma_min", "sigma_max"):
        if s[key] != hp[key]:
            raise BadInput(f"{first.path}: first-stage {key} {s[key]!r} differs from the second stage's "
                           f"{hp[key]!r}; delete that fit folder")
    conditioned = bool(s.get("step_condition"))
    if conditioned and not s["variable_num_steps"][0] <= hp["teacher_num_steps"] <= s["variable_num_steps"][1]:
        raise BadInput(f"{first.path} was trained on N = {s['variable_num_steps']}, not the teacher's "
                       f"N = {hp['teacher_num_steps']}")
    student = suite.make_student(teacher)
    sigmas = schedule_for(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                      suite.discrete_vp).to(ctx.device)
    lpips, loss_text = resolve_loss(hp["loss"])
    cfg = SFDStepConfig(m=hp["M"], schedule=hp["schedule"], rho=hp["rho"], afs=hp["afs"],
                        teacher_solver=hp["teacher_solver"], teacher_afs=hp["teacher_afs"], loss="l1",
                        last_step_lpips=lpips is not None, vp=suite.discrete_vp)
    student_step = {"step_condition": hp["step_condition"]} if conditioned else {}
    teacher_step = {"step_condition": hp["teacher_step_condition"]} if conditioned else {}

    def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
        return sfd_iteration(model, counted_teacher, optimizer, latents, sigmas, cfg,
                             student_cond={**cond, **student_step}, teacher_cond={**cond, **teacher_step},
                             lpips=lpips, fp16=fp16)

    second, log = train_loop(ctx.workdir, student, teacher, LoopSettings.from_hyperparameters(hp), learning_rate(hp),
                             ctx.device, suite.latent_shape, f"fit {method} NFE {ctx.nfe}", ctx.progress, step,
                             conditioning=suite.training_conditioning, devices=ctx.devices,
                                 data_parallel=True)
    first_cost = first.fit["fine_tuning"]
    first_flops = first_cost.get("flops")
    total = Accounting(first_cost["wall_seconds"] + second.wall_seconds, second.device, second.devices,
                       None if first_flops is None or second.flops is None else first_flops + second.flops)
    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": hp["num_steps"], "nfe": ctx.nfe, "sigma_min": hp["sigma_min"],
                "sigma_max": hp["sigma_max"], "step_condition": conditioned}
    save_student(ctx.workdir, student, method, suite.name, hp, sampling, total, log, loss=loss_text,
                 first_stage_model=str(first.path), fine_tuning_first_stage=first_cost,
                 fine_tuning_second_stage=second.to_dict(),
                 teacher_trajectories_first_stage=first.fit["teacher_trajectories"])


register_method(SFDStage2Method(name="sfd-stage2", display="SFD (2nd stage)",
                                description="second-stage SFD: the SFD-v model distilled to 1 NFE (Euler N=3 + AFS; "
                                            "teacher itself, N=7)"))
