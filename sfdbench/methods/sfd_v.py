"""SFD-v: one SFD model for every NFE, conditioned on the number of timestamps N
(``shared/docs/sfd-spec.md`` section 5).

Training is first-stage SFD (``sfd.py``) with, per iteration, N drawn from 4..7 by Python's
``random.Random(42)`` (the reference seeds Python's ``random`` with the constant 42, spec 5.1 and
10.15), M = 3 (2 if N = 3), the teacher still DPM-Solver++(3M) without AFS, and the student
called with step condition N through the network's step-condition branch (spec 5.2; in
``DigitsUNet(step_condition=True)``). Sampling: Euler + AFS with N = NFE + 2, step condition N.

One model, all NFEs. The harness fits every (method, NFE) into its own work folder, so SFD-v
trains into a SIBLING folder shared by all NFEs: ``<workdir>.parent / "sfd-v-shared-<key>"``,
where ``key`` hashes the suite, the teacher's weights and every training hyperparameter (all of
them but the sampling ``num_steps``). The first NFE trains it (resumably), the others load it,
and every NFE reports that one model's fine-tuning cost (the paper: "4.26 h, one model, all
NFEs"). Two processes fitting the same SFD-v model at once are not coordinated; run them after
one another.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.diffusion.schedules import get_schedule
from sfdbench.errors import BadInput
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted
from sfdbench.methods.sfd import (
    SFDMethod,
    fit_done,
    load_fitted,
    lpips_loss,
    save_student,
    sfd_iteration,
    teacher_solver_options,
    train_loop,
)
from sfdbench.networks.checkpoint import atomic_write_bytes
from sfdbench.networks.digits_unet import DigitsUNet, is_step_condition_key

STEP_INITS = ("random", "zero")
SAMPLING_ONLY = ("num_steps",)  # the only hyperparameter that differs between the NFEs of one model


def step_counts(iterations: int, low: int = 4, high: int = 7, seed: int = 42) -> list[int]:
    """N for every iteration: ``random.Random(seed).randint(low, high)`` drawn once per iteration, in
    order (the reference's stream). Materialised from the start, so a resumed fit draws the same."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(iterations)]


def m_for(n: int, m: int) -> int:
    """The reference's rule (spec 5.1): M = 2 when N = 3, else the configured M (3)."""
    return 2 if n == 3 else m


def teacher_fingerprint(teacher: EDMPrecond) -> str:
    """A content hash of the teacher's weights (which teacher a shared model was distilled from)."""
    h = hashlib.sha256()
    for key, value in teacher.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_without_step_modules(net: DigitsUNet, state: dict) -> None:
    """Load a network trained without the step-condition branch (the teacher) into ``net``.

    Non-strict for exactly the step-condition keys: the teacher's checkpoint cannot hold weights
    for modules it never had, so those keep their fresh initialisation (the reference does the
    same: it copies the pretrained EDM weights into an SFD network with non-strict loading, spec
    4.2 step 1). Any other missing or unexpected key is a real architecture mismatch -> BadInput."""
    result = net.load_state_dict(state, strict=False)
    other = [k for k in result.missing_keys if not is_step_condition_key(k)] + list(result.unexpected_keys)
    if other:
        raise BadInput(f"the teacher's weights do not match the SFD-v network (first mismatch: {other[0]})")


def step_conditioned_copy(teacher: EDMPrecond, step_init: str, seed: int) -> EDMPrecond:
    """The teacher's network with SFD-v's step-condition modules added: ``random`` = the network's
    ordinary init (spec 5.2), seeded with ``seed`` so it is reproducible; ``zero`` additionally
    zeroes the per-block projections (the model then starts exactly as the teacher)."""
    config = getattr(teacher.net, "config", None)
    if not isinstance(teacher.net, DigitsUNet) or config is None:
        raise BadInput("SFD-v needs a DigitsUNet teacher (the step-condition branch exists for it only)")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsUNet(**{**config, "step_condition": True})
    load_without_step_modules(net, teacher.net.state_dict())
    if step_init == "zero":
        with torch.no_grad():
            for name, p in net.named_parameters():
                if ".step_emb." in name:
                    p.zero_()
    param = next(teacher.parameters())
    return EDMPrecond(net, teacher.sigma_min, teacher.sigma_max, teacher.sigma_data).to(param.device)


@dataclass
class SFDVMethod(SFDMethod):
    name: str = "sfd-v"
    display: str = "SFD-v"
    description: str = "SFD-v: one step-conditioned SFD model for NFE 2-5 (N = NFE + 2, step condition N)"

    iterations: int = 6250  # 800 kimg at batch 128 (spec 4.9)
    steps_low: int = 4
    steps_high: int = 7
    step_seed: int = 42
    step_init: str = "random"
    # SFD-v trains 4x as long as SFD (800 vs 200 kimg, spec 4.9): without its own setting it takes the
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

    def shared_workdir(self, suite, teacher: EDMPrecond, parent: Path) -> Path:
        key = json.dumps({"suite": suite.name, "teacher": teacher_fingerprint(teacher),
                          "hyperparameters": self.shared_hyperparameters(suite)}, sort_keys=True, default=str)
        return Path(parent) / f"sfd-v-shared-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def ensure_model(self, suite, teacher: EDMPrecond, parent: Path, device, progress=None) -> Path:
        """Train the shared SFD-v model under ``parent`` unless it exists (resuming a partial fit)."""
        workdir = self.shared_workdir(suite, teacher, parent)
        if not fit_done(workdir):
            train_sfd_v(workdir, suite, teacher, self.shared_hyperparameters(suite), device, progress)
        return workdir / "model.safetensors"

    def fit(self, ctx: FitContext) -> Fitted:
        self.hyperparameters(ctx.suite, ctx.nfe)  # bad input fails before any training
        model = self.ensure_model(ctx.suite, ctx.teacher, ctx.workdir.parent, ctx.device, ctx.progress)
        fitted = load_fitted(model, ctx.teacher, ctx.device, nfe=ctx.nfe)
        fitted.info.update({"shared_model": str(model), "one_model_all_nfes": True})
        # a pointer in this NFE's own folder, so every fits/ entry says where its model is
        atomic_write_bytes(ctx.workdir / "shared.json",
                           (json.dumps({"shared_model": str(model), "nfe": ctx.nfe}, indent=2) + "\n").encode())
        return fitted


def train_sfd_v(workdir: Path, suite, teacher: EDMPrecond, hp: dict, device, progress=None) -> None:
    """Fine-tune a step-conditioned copy of the teacher on N ~ U{low..high} per iteration."""
    if not isinstance(teacher, EDMPrecond):
        raise BadInput("SFD-v needs an EDM-preconditioned teacher network")
    device = torch.device(device)
    student = step_conditioned_copy(teacher, hp["step_init"], hp["fit_seed"]).train().requires_grad_(True)
    low, high = hp["train_num_steps"]
    sequence = step_counts(hp["iterations"], low, high, hp["step_seed"])
    schedules = {n: get_schedule(hp["schedule"], n, hp["sigma_min"], hp["sigma_max"], hp["rho"]).to(device)
                 for n in sorted(set(sequence))}
    teacher_options = teacher_solver_options(hp["teacher_solver"], hp)
    lpips = lpips_loss()[0] if hp["loss"] == "lpips" else None

    def step(it, latents, optimizer, counted_teacher, fp16):
        n = sequence[it]
        return sfd_iteration(student, counted_teacher, optimizer, latents, schedules[n], m_for(n, hp["M"]),
                             hp["schedule"], hp["rho"], hp["afs"], teacher_options, teacher_solver=hp["teacher_solver"],
                             student_cond={"step_condition": n}, loss=hp["loss"], lpips=lpips, fp16=fp16)

    accounting, log = train_loop(workdir, student, teacher, hp, device, (hp["batch"], *suite.image_shape),
                                 f"fit sfd-v (N {low}..{high}, all NFEs)", progress, step)
    afs = int(hp["afs"])
    sampling = {"solver": "euler", "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                "num_steps": low, "nfe": low - 1 - afs, "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                "step_condition": True, "variable_num_steps": [low, high]}
    drawn = Counter(sequence)
    save_student(workdir, student, hp, sampling, accounting, log,
                 num_steps_drawn={str(n): drawn[n] for n in sorted(drawn)})


register_method(SFDVMethod())
