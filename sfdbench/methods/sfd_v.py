"""SFD-v: one SFD model for every NFE, conditioned on the number of timestamps N (SFD paper,
Zhou et al. 2024, Sec. 4.2; ``docs/algorithms.md``, "SFD-v").

Training is first-stage SFD (``sfd.py``) with, per iteration, N drawn from 4..7 by Python's
``random.Random(42)`` (the reference seeds Python's ``random`` with the constant 42), M = 3
(2 if N = 3), the teacher still DPM-Solver++(3M) without AFS, and the student called with step
condition N through the step-condition branch that ``networks.adapters`` attaches to the suite's
student (whatever its architecture, if an adapter is registered for it). Sampling: Euler + AFS
with N = NFE + 2, step condition N.

One model, all NFEs. The harness fits every (method, NFE) into its own work folder, so SFD-v
trains into a SIBLING folder shared by all NFEs: ``<workdir>.parent / "sfd-v-shared-<key>"``,
where ``key`` hashes the suite, the teacher's content id and every training hyperparameter (all
of them but the sampling ``num_steps``). The first NFE trains it (resumably), the others load it,
and every NFE reports that one model's fine-tuning cost (the paper: "one model, all NFEs"). Two
processes fitting the same SFD-v model at once are not coordinated; run them after one another.
Other methods (the second stage) obtain the model through ``SFDVMethod.ensure_model``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench import parallel
from sfdbench.diffusion.denoiser import Denoiser
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted
from sfdbench.methods.sfd import SFDMethod, learning_rate, load_fitted, lpips_loss, sfd_iteration, step_config
from sfdbench.methods.training import LoopSettings, fit_done, read_fit, save_student, train_loop
from sfdbench.networks.adapters import STEP_INITS, attach_step_condition

SAMPLING_ONLY = ("num_steps",)  # the only hyperparameter that differs between the NFEs of one model


def step_counts(iterations: int, low: int = 4, high: int = 7, seed: int = 42) -> list[int]:
    """N for every iteration: ``random.Random(seed).randint(low, high)`` drawn once per iteration, in
    order (the reference's stream: it seeds Python's ``random`` with 42). Materialised from the
    start, so a resumed fit draws the same."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(iterations)]


def m_for(n: int, m: int) -> int:
    """The reference's rule: M = 2 when N = 3, else the configured M (3)."""
    return 2 if n == 3 else m


def step_conditioned_student(suite, teacher: Denoiser, step_init: str, seed: int) -> torch.nn.Module:
    """The suite's student with SFD-v's step-condition branch attached (``networks.adapters``):
    ``random`` = the architecture's ordinary init under ``seed`` (the paper's: not zero), ``zero``
    additionally zeroes the per-block projections (the model then starts exactly as the teacher)."""
    return attach_step_condition(suite.make_student(teacher), seed, step_init).train().requires_grad_(True)


@dataclass
class TrainedModel:
    """A shared SFD-v model: its file and its ``fit.json``."""

    path: Path
    fit: dict


@dataclass
class SFDVMethod(SFDMethod):
    iterations: int = 6250  # 800 kimg at batch 128 (the paper's CIFAR-10 length)
    steps_low: int = 4
    steps_high: int = 7
    step_seed: int = 42
    step_init: str = "random"
    # SFD-v trains 4x as long as SFD (800 vs 200 kimg): without its own setting it takes the
    # suite's SFD length x 4, and SFD's batch, lr and checkpoint interval.
    sfd_length_factor: int = 4

    def nfe_rule(self) -> str:
        return (f"NFE {self.steps_low - 2}-{self.steps_high - 2} from ONE model "
                f"(N = NFE + 2 timestamps, trained on N = {self.steps_low}..{self.steps_high})")

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and self.steps_low - 2 <= nfe <= self.steps_high - 2

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().default_hyperparameters(suite, nfe)
        sfd = suite.method_options.get("sfd", {})
        hp.update({k: sfd[k] for k in ("batch", "lr", "checkpoint_every") if k in sfd})
        hp["iterations"] = self.sfd_length_factor * sfd["iterations"] if "iterations" in sfd else self.iterations
        hp.update({"train_num_steps": [self.steps_low, self.steps_high],
                   "step_sampling": f"python random.Random({self.step_seed}).randint per iteration",
                   "step_seed": self.step_seed, "M_rule": "2 if N = 3 else M", "step_condition": "N (timestamps)",
                   "step_init": self.step_init})
        return hp

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        low_high = hp["train_num_steps"]
        if (not isinstance(low_high, list) or len(low_high) != 2 or not all(isinstance(v, int) for v in low_high)
                or not 3 <= low_high[0] <= low_high[1]):
            raise BadInput(f"sfd-v: train_num_steps must be [low, high] with 3 <= low <= high, got {low_high!r}")
        if not low_high[0] <= hp["num_steps"] <= low_high[1]:
            raise BadInput(f"sfd-v: NFE {nfe} needs N = {hp['num_steps']} timestamps, outside the trained "
                           f"range {low_high[0]}..{low_high[1]}")
        if hp["step_init"] not in STEP_INITS:
            raise BadInput(f"sfd-v: step_init must be one of {', '.join(STEP_INITS)}, got {hp['step_init']!r}")
        return hp

    def shared_hyperparameters(self, suite) -> dict:
        """The hyperparameters of the one trained model (every NFE's, minus the sampling N)."""
        opts = suite.method_options.get(self.name, {})
        low = opts.get("train_num_steps", [self.steps_low])
        low = low[0] if isinstance(low, list) and low and isinstance(low[0], int) else self.steps_low
        hp = self.hyperparameters(suite, low - 1 - int(bool(opts.get("afs", self.afs))))
        return {k: v for k, v in hp.items() if k not in SAMPLING_ONLY}

    def shared_workdir(self, suite, teacher_id: str, parent: Path) -> Path:
        key = json.dumps({"suite": suite.name, "teacher": teacher_id,
                          "hyperparameters": self.shared_hyperparameters(suite)}, sort_keys=True, default=str)
        return Path(parent) / f"sfd-v-shared-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def ensure_model(self, ctx: FitContext, parent: Path) -> TrainedModel:
        """The shared SFD-v model under ``parent``, trained first unless it exists (a partial fit resumes)."""
        workdir = self.shared_workdir(ctx.suite, ctx.teacher_id, parent)
        if not fit_done(workdir):
            train_sfd_v(workdir, ctx, self.shared_hyperparameters(ctx.suite), self.name)
        return TrainedModel(workdir / "model.safetensors", read_fit(workdir))

    def fit(self, ctx: FitContext) -> Fitted:
        self.hyperparameters(ctx.suite, ctx.nfe)  # bad input fails before any training
        model = self.ensure_model(ctx, ctx.workdir.parent).path
        fitted = load_fitted(model, ctx.suite, ctx.teacher, ctx.device, nfe=ctx.nfe)
        fitted.info.update({"shared_model": str(model), "one_model_all_nfes": True})
        # a pointer in this NFE's own folder, so every fits/ entry says where its model is
        if parallel.is_main():
            atomic_write_bytes(ctx.workdir / "shared.json",
                               (json.dumps({"shared_model": str(model), "nfe": ctx.nfe}, indent=2) + "\n").encode())
        return fitted


def train_sfd_v(workdir: Path, ctx: FitContext, hp: dict, method: str = "sfd-v") -> None:
    """Fine-tune a step-conditioned copy of the teacher on N ~ U{low..high} per iteration."""
    suite, device = ctx.suite, torch.device(ctx.device)
    student = step_conditioned_student(suite, ctx.teacher, hp["step_init"], hp["fit_seed"])
    low, high = hp["train_num_steps"]
    sequence = step_counts(hp["iterations"], low, high, hp["step_seed"])
    schedules = {n: schedule_for(hp["schedule"], n, hp["sigma_min"], hp["sigma_max"], hp["rho"], suite.discrete_vp
                             ).to(device) for n in sorted(set(sequence))}
    configs = {n: step_config(hp, suite.discrete_vp, m_for(n, hp["M"])) for n in schedules}
    lpips = lpips_loss()[0] if hp["loss"] == "lpips" else None

    def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
        n = sequence[it]
        return sfd_iteration(model, counted_teacher, optimizer, latents, schedules[n], configs[n],
                             student_cond={**cond, "step_condition": n}, teacher_cond=cond, lpips=lpips, fp16=fp16)

    accounting, log = train_loop(workdir, student, ctx.teacher, LoopSettings.from_hyperparameters(hp),
                                 learning_rate(hp), device, suite.latent_shape,
                                 f"fit {method} (N {low}..{high}, all NFEs)", ctx.progress, step,
                                 conditioning=suite.training_conditioning, devices=ctx.devices,
                                 data_parallel=True)
    afs = int(hp["afs"])
    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": low, "nfe": low - 1 - afs, "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                "step_condition": True, "variable_num_steps": [low, high]}
    drawn = Counter(sequence)
    save_student(workdir, student, method, suite.name, hp, sampling, accounting, log,
                 num_steps_drawn={str(n): drawn[n] for n in sorted(drawn)})


register_method(SFDVMethod(name="sfd-v", display="SFD-v",
                           description="SFD-v: one step-conditioned SFD model for NFE 2-5 (N = NFE + 2, "
                                       "step condition N)"))
