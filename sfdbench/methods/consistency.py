"""Consistency models distilled from, or tuned from, the suite's teacher: consistency distillation
``cd`` (Song et al., "Consistency Models", ICML 2023, arXiv 2303.01469) and Easy Consistency Tuning
``ect`` (Geng et al., "Consistency Models Made Easy", ICLR 2025, arXiv 2406.14548).
``docs/algorithms.md``, "Consistency distillation and ECT", has the formulas and our choices.

**Parametrisation, shared by both.** The student is the suite's student (``suite.make_student``: a
trainable copy of the teacher denoiser D_theta, weights included). The consistency function wraps
its output, whatever the teacher's architecture or preconditioning:

    f_theta(x, sigma) = c_skip^eps(sigma) x + (sigma - eps) / sigma * (D_theta(x, sigma) - c_skip(sigma) x)

with c_skip = sd^2 / (sigma^2 + sd^2) (EDM), c_skip^eps = sd^2 / ((sigma - eps)^2 + sd^2) (the CM
paper's), sd = sigma_data = 0.5, eps = sigma_min. For an EDM-preconditioned D = c_skip x + c_out F,
(sigma - eps) / sigma * c_out = sd (sigma - eps) / sqrt(sigma^2 + sd^2) = c_out^eps, so f is exactly
the CM parametrisation c_skip^eps x + c_out^eps F(c_in x, c_noise) around the teacher's own network F;
for any other denoiser it is the same formula with F := (D - c_skip x) / c_out. f(x, eps) = x
(boundary condition), and with eps = 0, f = D.

**Sampling** (CM paper, Algorithm 1): tau_0 = sigma_max > tau_1 > ... > tau_{n-1}; x = f(tau_0 z,
tau_0), then x = f(x + sqrt(tau_k^2 - eps^2) z_k, tau_k). NFE = n, one student call per step. The
fixed rule tau_k = sigma_max (tau_mid / sigma_max)^(2k/n) gives (sigma_max,) at NFE 1, (sigma_max,
0.821) at NFE 2 (iCT / ECT's 2-step point, used for CD too) and (80, 8.10, 0.821, 0.083) at NFE 4
on sigma_max = 80. The fresh noise z_k of a sample comes from a generator seeded by a hash of that
sample's latent and k, so it is fixed by the run seed and sample index, never by the batch.

**CD** (CM paper, Algorithm 2; Sec. 0 and C.3 of the project's baseline spec): N-point Karras grid
on [eps, sigma_max] (rho = 7), i ~ U{0..N-2}, x_t = x_0 + sigma_i z from a real image x_0, one Heun
step of the frozen teacher from sigma_i to sigma_{i+1} (2 counted teacher evaluations), loss
d(f_theta(x_t, sigma_i), sg f_theta-(x_hat, sigma_{i+1})), uniform weight, the target theta- an EMA
(mu) of theta (mu = 0: theta- = theta after every step, the CIFAR-10 setting), the same dropout RNG
state for both calls. d: LPIPS where it runs, else L2 (mean squared error over pixels), L1 or
pseudo-Huber, recorded in the hyperparameters.

**ECT** (ECT paper, Sec. 3; reference ``locuslab/ect``): no teacher, no ODE solver; the student is
tuned from the teacher's weights. t = exp(P_mean + P_std n), r = max(0, t (1 - (1 + k sigmoid(-b t))
/ q^(a+1))) at stage a (a grows by one every iterations / stages), loss (sqrt(||f(x_t, t) - sg
f(x_r, r)||^2 + c^2) - c) / (t - r), the target replaced by the clean image where r = 0, the same
network (no EMA target) under stop-gradient and the same dropout RNG state. As in the reference,
training uses plain D (``train_sigma_min`` = 0, so f = D); sampling uses the boundary form.

**Data**: real training images (``suite.training_data``, no flips; counted as ``real_images_used``),
or ``data=teacher-samples``: a fixed pool generated once per session with the teacher's Heun
sampler (35 NFE), its teacher evaluations counted (the spec's data-free variant, labelled in the
display name). A latent suite whose training images are not latents needs the latter.

**Compute**: wall time, device-hours, counted teacher evaluations and student forward + backward
passes, one target forward per trained sample (an EMA or synchronised copy of the student, so it is
not counted as a student pass; its FLOPs are added per sample), FLOPs (``methods.training``), real
images. ``budget_flops`` stops the fit at a FLOP budget (``stopped_at_budget``). One model serves
every NFE; it lives in a sibling folder of the per-NFE fit folders, like SFD-v's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sfdbench.diffusion.denoiser import Denoiser, batch_sigma
from sfdbench.diffusion.schedules import polynomial
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.sfd import lpips_loss
from sfdbench.methods.training import (
    LoopSettings,
    check_loop_settings,
    fit_done,
    load_student,
    per_sample_flops,
    read_fit,
    sanitize_gradients,
    save_snapshot,
    save_student,
    train_loop,
)

DISTANCES = ("l2", "l1", "pseudo-huber", "lpips")
DATA_SOURCES = ("real", "teacher-samples")
DROPOUT = ("on", "off")
TAU_MID = 0.821  # iCT / ECT's 2-step point (ECT reference ``--mid_t``); CD's CIFAR-10 value was not published
# the teacher-samples pool: EDM's CIFAR-10 sampler, Heun between 18 Karras points then an Euler step to 0 = 35 NFE
POOL_STEPS = 18
# hyperparameters that only change sampling: the one model is shared by every NFE
SAMPLING_ONLY = ("sampling_sigmas", "tau_mid")


# ---------------------------------------------------------------------------------------------
# The consistency parametrisation


def _column(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (losses of half-precision outputs are reduced in float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def consistency_function(denoiser: Denoiser, x: torch.Tensor, sigma, eps: float, sigma_data: float = 0.5,
                         **cond) -> torch.Tensor:
    """f(x, sigma) = c_skip^eps x + (sigma - eps) / sigma (D(x, sigma) - c_skip x), with
    c_skip = sd^2 / (sigma^2 + sd^2) and c_skip^eps = sd^2 / ((sigma - eps)^2 + sd^2): the CM
    parametrisation (c_skip^eps, c_out^eps = sd (sigma - eps) / sqrt(sigma^2 + sd^2)) around the
    network inside an EDM-preconditioned D. One denoiser call. f = x where sigma <= eps (the
    boundary condition); eps = 0 gives f = D."""
    sigma = batch_sigma(sigma, x)
    d = denoiser(x, sigma, **cond)
    if eps == 0:
        return d
    s = _column(sigma, x).to(x.dtype)
    sd2 = sigma_data**2
    c_skip = sd2 / (s**2 + sd2)
    c_skip_eps = sd2 / ((s - eps) ** 2 + sd2)
    f = c_skip_eps * x + (s - eps) / s * (d - c_skip * x)
    return torch.where(s <= eps, x, f)


def sampling_sigmas(nfe: int, sigma_max: float, tau_mid: float = TAU_MID) -> list[float]:
    """tau_k = sigma_max (tau_mid / sigma_max)^(2k / nfe), k = 0..nfe-1: sigma_max alone at NFE 1,
    (sigma_max, tau_mid) at NFE 2, geometric through tau_mid otherwise (a fixed rule, not tuned)."""
    return [sigma_max * (tau_mid / sigma_max) ** (2 * k / nfe) for k in range(nfe)]


def step_noise(latents: torch.Tensor, step: int) -> torch.Tensor:
    """Fresh unit Gaussian noise for multistep step ``step``, per sample from a CPU generator seeded
    by sha256(the sample's latent, step): fixed by the sample, independent of the batch."""
    flat = latents.detach().float().cpu().contiguous()
    out = torch.empty_like(flat)
    for b in range(flat.shape[0]):
        digest = hashlib.sha256(flat[b].numpy().tobytes() + int(step).to_bytes(4, "little")).digest()
        out[b] = torch.randn(flat.shape[1:], generator=torch.Generator().manual_seed(
            int.from_bytes(digest[:8], "little") >> 1))
    return out.to(device=latents.device, dtype=latents.dtype)


def consistency_sample(denoiser: Denoiser, latents: torch.Tensor, cond: dict | None = None, *,
                       sigmas: tuple[float, ...], eps: float, sigma_data: float = 0.5) -> torch.Tensor:
    """Multistep consistency sampling (CM paper, Algorithm 1): x = f(tau_0 z, tau_0), then
    x = f(x + sqrt(tau_k^2 - eps^2) z_k, tau_k). NFE = len(sigmas)."""
    cond = cond or {}
    x = consistency_function(denoiser, latents * sigmas[0], sigmas[0], eps, sigma_data, **cond)
    for k, tau in enumerate(sigmas[1:], start=1):
        x = x + math.sqrt(max(tau**2 - eps**2, 0.0)) * step_noise(latents, k)
        x = consistency_function(denoiser, x, tau, eps, sigma_data, **cond)
    return x


# ---------------------------------------------------------------------------------------------
# Losses (tensors in, tensors out)


def heun_teacher_step(teacher: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      cond: dict) -> torch.Tensor:
    """One Heun step of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma from t to t_next (per
    sample): Euler predictor, trapezoidal corrector (Karras et al. 2022, Algorithm 1). 2 calls."""
    tc, nc = _column(t, x), _column(t_next, x)
    d = (x - teacher(x, t, **cond)) / tc
    x_pred = x + (nc - tc) * d
    d_next = (x_pred - teacher(x_pred, t_next, **cond)) / nc
    return x + (nc - tc) * 0.5 * (d + d_next)


def distance(kind: str, a: torch.Tensor, b: torch.Tensor, *, huber_c: float = 0.0, lpips=None,
             decode=None) -> torch.Tensor:
    """Per-sample distance: ``l2`` mean of squared differences over pixels (CM's L2), ``l1`` mean
    absolute difference, ``pseudo-huber`` sqrt(||a - b||^2 + c^2) - c (norm over all pixels),
    ``lpips`` LPIPS of the decoded images."""
    diff = _wide(a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo-huber":
        return (diff.square().sum(1) + huber_c**2).sqrt() - huber_c
    if kind == "lpips":
        if lpips is None:
            raise ValueError("the lpips distance needs an LPIPS function")
        dec = decode or (lambda v: v)
        return lpips(dec(a), dec(b))
    raise ValueError(f"unknown distance {kind!r}; known: {', '.join(DISTANCES)}")


class _SharedRNG:
    """The RNG state of the online call, replayed for the target call (same dropout masks)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def save(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def load(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)


def cd_loss(online: Denoiser, target: Denoiser, teacher: Denoiser, x0: torch.Tensor, noise: torch.Tensor,
            t: torch.Tensor, t_next: torch.Tensor, *, eps: float, sigma_data: float = 0.5, kind: str = "l2",
            cond: dict | None = None, teacher_step=heun_teacher_step, huber_c: float = 0.0, lpips=None,
            decode=None) -> torch.Tensor:
    """Per-sample CD loss d(f_theta(x_t, t), sg f_theta-(x_hat, t_next)), x_t = x0 + t noise,
    x_hat = ``teacher_step`` (one Heun step of the teacher, no gradient) from (x_t, t) to t_next;
    the target call replays the online call's RNG state (shared dropout)."""
    cond = cond or {}
    x_t = x0 + _column(t, x0) * noise
    with torch.no_grad():
        x_hat = teacher_step(teacher, x_t, t, t_next, cond)
    rng = _SharedRNG(x0.device)
    before = rng.save()
    pred = consistency_function(online, x_t, t, eps, sigma_data, **cond)
    after = rng.save()
    with torch.no_grad():
        rng.load(before)
        tgt = consistency_function(target, x_hat, t_next, eps, sigma_data, **cond)
        rng.load(after)
    return distance(kind, pred, tgt.detach(), huber_c=huber_c, lpips=lpips, decode=decode)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's mapping r(t) at stage a: r = max(0, t (1 - (1 + k sigmoid(-b t)) / q^(a+1))), so
    (t - r) / t = (1 + k sigmoid(-b t)) / q^(a+1) wherever r > 0."""
    return (t * (1 - (1 + k * torch.sigmoid(-b * t)) / q ** (stage + 1))).clamp(min=0)


def ect_loss(online: Denoiser, target: Denoiser, y: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, *, huber_c: float = 0.0, eps: float = 0.0, sigma_data: float = 0.5,
             cond: dict | None = None) -> torch.Tensor:
    """Per-sample ECT loss (sqrt(||f(x_t, t) - sg f-(x_r, r)||^2 + c^2) - c) / (t - r), x_t = y + t
    noise, x_r = y + r noise (one shared noise); the target is y where r = 0. The target call (on
    the whole batch, r = 0 rows evaluated at t and then replaced) replays the online call's RNG
    state (shared dropout). c = 0: the L2 norm over (t - r)."""
    cond = cond or {}
    x_t, x_r = y + _column(t, y) * noise, y + _column(r, y) * noise
    rng = _SharedRNG(y.device)
    before = rng.save()
    pred = consistency_function(online, x_t, t, eps, sigma_data, **cond)
    after = rng.save()
    with torch.no_grad():
        rng.load(before)
        zero = r <= 0
        tgt = consistency_function(target, x_r, torch.where(zero, t, r), eps, sigma_data, **cond)
        tgt = torch.where(_column(zero, y), y, tgt)
        rng.load(after)
    diff = _wide(pred - tgt.detach()).flatten(1)
    return ((diff.square().sum(1) + huber_c**2).sqrt() - huber_c) / _wide(t - r)


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """average <- beta average + (1 - beta) model (beta = 0: an exact copy)."""
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        if beta == 0:
            a.copy_(p)
        else:
            a.lerp_(p, 1.0 - beta)
    for a, p in zip(average.buffers(), model.buffers(), strict=True):
        a.copy_(p)


def halflife_beta(fraction: float, iterations: int) -> float:
    """Per-iteration EMA decay whose half-life is ``fraction`` of the run: 0.5^(1 / (fraction I))."""
    return 0.5 ** (1.0 / max(fraction * iterations, 1e-12)) if fraction > 0 else 0.0


def warmup_lr(lr: float, fraction: float, iterations: int):
    """Linear warm-up over the first ``fraction`` of the iterations, then constant."""
    warm = max(int(round(fraction * iterations)), 1) if fraction > 0 else 0
    return lambda it: lr * min(1.0, (it + 1) / warm) if warm else lr


# ---------------------------------------------------------------------------------------------
# Data


class TrainingData:
    """A batch of clean samples and their conditioning per iteration: the suite's real images, or
    a fixed pool of teacher samples (EDM's Heun sampler: Heun between ``POOL_STEPS`` Karras points on
    the suite's sigma range, then x = D(x, sigma_min), 35 NFE; generated the first time it is needed
    in a session, with the counted teacher, so its cost is in the fit's)."""

    def __init__(self, suite, hp: dict, device: torch.device):
        self.suite, self.hp, self.device = suite, hp, device
        self.pool: tuple[torch.Tensor, dict] | None = None

    def batch(self, batch: int, counted_teacher: Denoiser) -> tuple[torch.Tensor, dict, int]:
        """(x0, cond, real images used); draws its indices from the (seeded) global RNG."""
        seed = int(torch.randint(2**62, ()))
        gen = torch.Generator().manual_seed(seed)
        if self.hp["data"] == "real":
            x0, cond = self.suite.training_data(batch, gen)
            return x0.to(self.device), _to(cond, self.device), batch
        if self.pool is None:
            self.pool = self._make_pool(counted_teacher)
        x_pool, c_pool = self.pool
        idx = torch.randint(len(x_pool), (batch,), generator=gen)
        return x_pool[idx].to(self.device), {k: v[idx].to(self.device) for k, v in c_pool.items()}, 0

    @torch.no_grad()
    def _make_pool(self, teacher: Denoiser) -> tuple[torch.Tensor, dict]:
        n, suite = self.hp["teacher_pool"], self.suite
        gen = torch.Generator().manual_seed(self.hp["fit_seed"] + 7919)
        latents = torch.randn(n, *suite.latent_shape, generator=gen)
        cond = suite.training_conditioning(n, gen)
        grid = polynomial(POOL_STEPS, suite.sigma_min, suite.sigma_max).tolist()
        out = []
        for lo in range(0, n, 256):
            c = {k: v[lo:lo + 256].to(self.device) for k, v in cond.items()}
            x = latents[lo:lo + 256].to(self.device) * grid[0]
            for i in range(len(grid) - 1):
                t = torch.full((x.shape[0],), grid[i], device=self.device)
                x = heun_teacher_step(teacher, x, t, torch.full_like(t, grid[i + 1]), c)
            out.append(teacher(x, torch.full((x.shape[0],), grid[-1], device=self.device), **c).cpu())
        return torch.cat(out), {k: v.cpu() for k, v in cond.items()}


def _to(cond: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------
# The methods


@dataclass
class ConsistencyMethod(Method):
    """What CD and ECT share: hyperparameters common to both, one model for every NFE (a sibling
    folder of the per-NFE fit folders), the training harness around a method's loss, model files and
    the multistep consistency sampler."""

    group: str = "distillation"
    max_nfe: int = 8

    def nfe_rule(self) -> str:
        return f"NFE 1-{self.max_nfe} from ONE model (multistep consistency sampling; the papers report 1 and 2)"

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and not isinstance(nfe, bool) and 1 <= nfe <= self.max_nfe

    def display_name(self, hp: dict) -> str:
        return self.display + (" [data=teacher-samples]" if hp.get("data") == "teacher-samples" else "")

    def common_hyperparameters(self, suite, nfe: int) -> dict:
        return {"sigma_min": suite.sigma_min, "sigma_max": suite.sigma_max, "sigma_data": 0.5,
                "tau_mid": TAU_MID, "sampling_sigmas": sampling_sigmas(nfe, suite.sigma_max, TAU_MID),
                "sampler": "multistep consistency, tau_k = sigma_max (tau_mid / sigma_max)^(2k / NFE)",
                "data": "real", "flips": False, "teacher_pool": 1500, "dropout": "on",
                "optimizer": "adam(0.9,0.999,1e-8) + linear warm-up (the papers: RAdam)",
                "fit_seed": 0, "checkpoint_every": 50, "precision": "fp32", "budget_flops": None}

    def hyperparameters(self, suite, nfe: int) -> dict:
        if "sampling_sigmas" in suite.method_options.get(self.name, {}):
            raise BadInput(f"{self.name}: sampling_sigmas follow from the NFE and tau_mid; set tau_mid instead")
        hp = super().hyperparameters(suite, nfe)
        hp["sampling_sigmas"] = sampling_sigmas(nfe, hp["sigma_max"], hp["tau_mid"])
        self.check(hp, suite)
        return hp

    def check(self, hp: dict, suite) -> None:
        name = self.name
        check_loop_settings(name, hp, ("iterations", "batch", "checkpoint_every", "teacher_pool"))
        if not 0 < hp["sigma_min"] < hp["tau_mid"] < hp["sigma_max"]:
            raise BadInput(f"{name}: need 0 < sigma_min < tau_mid < sigma_max, got {hp['sigma_min']}, "
                           f"{hp['tau_mid']}, {hp['sigma_max']}")
        if hp["data"] not in DATA_SOURCES:
            raise BadInput(f"{name}: data must be one of {', '.join(DATA_SOURCES)}, got {hp['data']!r}")
        if hp["flips"] is not False:
            raise BadInput(f"{name}: flips are not supported (not every data set is flip-symmetric)")
        if hp["dropout"] not in DROPOUT:
            raise BadInput(f"{name}: dropout must be 'on' (the teacher's rate) or 'off', got {hp['dropout']!r}")
        budget = hp["budget_flops"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
            raise BadInput(f"{name}: budget_flops must be a positive number or null, got {budget!r}")
        for key in ("lr", "sigma_data"):
            if not (isinstance(hp[key], int | float) and hp[key] > 0):
                raise BadInput(f"{name}: {key} must be > 0, got {hp[key]!r}")
        for key in ("warmup_fraction", "ema_halflife_fraction"):
            if not (isinstance(hp[key], int | float) and 0 <= hp[key] <= 1):
                raise BadInput(f"{name}: {key} must be in [0, 1], got {hp[key]!r}")
        if hp["data"] == "real":
            x0, _ = suite.training_data(1, torch.Generator().manual_seed(0))  # BadInput where the suite has none
            if tuple(x0.shape[1:]) != tuple(suite.latent_shape):
                raise BadInput(f"{name}: the suite's training images {tuple(x0.shape[1:])} are not latents "
                               f"{tuple(suite.latent_shape)}; use data=teacher-samples")

    # -------------------------------------------------------------------- one model, all NFEs

    def shared_hyperparameters(self, suite) -> dict:
        return {k: v for k, v in self.hyperparameters(suite, 1).items() if k not in SAMPLING_ONLY}

    def shared_workdir(self, suite, teacher_id: str, parent: Path) -> Path:
        key = json.dumps({"suite": suite.name, "teacher": teacher_id, "method": self.name,
                          "hyperparameters": self.shared_hyperparameters(suite)}, sort_keys=True, default=str)
        return Path(parent) / f"{self.name}-shared-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def ensure_model(self, ctx: FitContext) -> Path:
        workdir = self.shared_workdir(ctx.suite, ctx.teacher_id, ctx.workdir.parent)
        if not fit_done(workdir):
            self.train(workdir, ctx, self.shared_hyperparameters(ctx.suite))
        return workdir / "model.safetensors"

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)  # bad input fails before any training
        model = self.ensure_model(ctx)
        fitted = self.load(model, ctx.suite, ctx.teacher, ctx.device, nfe=ctx.nfe, tau_mid=hp["tau_mid"])
        fitted.info.update({"shared_model": str(model), "one_model_all_nfes": True})
        atomic_write_bytes(ctx.workdir / "shared.json",
                           (json.dumps({"shared_model": str(model), "nfe": ctx.nfe}, indent=2) + "\n").encode())
        return fitted

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None,
             tau_mid: float | None = None) -> Fitted:
        student, meta = load_student(path, suite, teacher, device)
        s = dict(meta["sampling"])
        nfe = s["nfe"] if nfe is None else nfe
        if not self.supports(nfe):
            raise BadInput(f"{self.name} samples at {self.nfe_rule()}, not NFE {nfe}")
        s["tau_mid"] = s["tau_mid"] if tau_mid is None else tau_mid
        s["nfe"], s["sigmas"] = nfe, sampling_sigmas(nfe, s["sigma_max"], s["tau_mid"])

        def sample(denoiser, latents, cond=None):
            return consistency_sample(denoiser, latents, cond, sigmas=tuple(s["sigmas"]), eps=s["sigma_min"],
                                      sigma_data=s["sigma_data"])

        fit = read_fit(Path(path).parent)
        keys = ("distance", "data_source", "real_images_used", "teacher_evaluations", "student_evaluations",
                "target_forward_evaluations", "stopped_at_budget", "iterations_done", "flops_parts",
                "bad_gradients", "nan_loss_iterations", "device", "devices", "precision", "loss_last")
        return Fitted(denoiser=student, sample=sample, nfe=nfe, fine_tuning=fit.get("fine_tuning"),
                      info={"sampling": s, **{k: fit.get(k) for k in keys}})

    # -------------------------------------------------------------------- training

    def loss(self, model, target, teacher, x0, noise, cond, it: int, hp: dict, ctx) -> torch.Tensor:
        """Per-sample loss of one iteration (the method's own part)."""
        raise NotImplementedError

    def target_decay(self, hp: dict) -> float:
        raise NotImplementedError

    # teacher forwards per training sample (CD: one Heun step = 2; ECT: none)
    teacher_calls_per_sample = 0

    def iterations_within_budget(self, hp: dict, ctx: FitContext, one: dict, student_flops: int) -> dict:
        """With ``budget_flops``: the iteration count that fits the budget, set *before* training, so
        that warm-up, EMA half-life and ECT's stages scale with it (the equal-budget protocol picks
        the count, it does not cut a long schedule short); the loop's budget stop stays as a guard."""
        if hp["budget_flops"] is None:
            return hp
        teacher = (per_sample_flops(ctx.teacher, ctx.suite.latent_shape, one, False, torch.device(ctx.device))
                   if self.teacher_calls_per_sample else 0)
        per_iteration = hp["batch"] * (student_flops + self.teacher_calls_per_sample * teacher)
        fitting = max(1, int(hp["budget_flops"] // per_iteration))
        return {**hp, "iterations": min(hp["iterations"], fitting), "iterations_recipe": hp["iterations"]}

    def train(self, workdir: Path, ctx: FitContext, hp: dict) -> None:
        """Fine-tune the suite's student, checkpointed and resumable; write the evaluation-EMA
        weights as ``model.safetensors`` and ``fit.json``."""
        suite, device = ctx.suite, torch.device(ctx.device)
        student = suite.make_student(ctx.teacher).to(device).requires_grad_(True)
        student.train(hp["dropout"] == "on")
        # made before train_loop hooks the student, so their calls are not counted as student passes
        target = suite.make_student(ctx.teacher).to(device).requires_grad_(False)
        target.load_state_dict(student.state_dict())
        target.train(hp["dropout"] == "on")
        ema = suite.make_student(ctx.teacher).to(device).requires_grad_(False).eval()
        ema.load_state_dict(student.state_dict())
        one = _to(suite.training_conditioning(1, torch.Generator().manual_seed(0)), device)
        fwd_bwd = per_sample_flops(student, suite.latent_shape, one, True, device)
        fwd = per_sample_flops(student, suite.latent_shape, one, False, device)
        hp = self.iterations_within_budget(hp, ctx, one, fwd_bwd + fwd)
        mu, beta = self.target_decay(hp), halflife_beta(hp["ema_halflife_fraction"], hp["iterations"])
        data = TrainingData(suite, hp, device)

        def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
            x0, dcond, real = data.batch(latents.shape[0], counted_teacher)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16):
                per = self.loss(model, target, counted_teacher, x0, latents.to(x0.dtype), dcond, it, hp, ctx)
            loss = per.float().mean()
            loss.backward()
            bad = sanitize_gradients(model.parameters())
            optimizer.step()
            ema_update(target, model, mu)
            ema_update(ema, model, beta)
            return {"losses": [float(loss.detach())], "bad_gradients": bad, "loss_nan": bool(torch.isnan(loss)),
                    "real_images": real}

        lr = warmup_lr(hp["lr"], hp["warmup_fraction"], hp["iterations"])
        sampling = {"sampler": "consistency", "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                    "sigma_data": hp["sigma_data"], "tau_mid": TAU_MID, "nfe": 1,
                    "tau_rule": "tau_k = sigma_max (tau_mid / sigma_max)^(2k / NFE)"}

        def snapshot(iteration, accounting, log):  # the evaluation EMA, as the finished fit saves it
            save_snapshot(workdir, iteration, ema, self.name, suite.name, hp, sampling, accounting, log,
                          weights="evaluation EMA", real_images_used=log["real_images"])

        accounting, log = train_loop(workdir, student, ctx.teacher, LoopSettings.from_hyperparameters(hp), lr, device,
                                     suite.latent_shape, f"fit {self.name} (all NFEs)", ctx.progress, step,
                                     conditioning=suite.training_conditioning, devices=ctx.devices,
                                     extra_state={"target": target, "ema": ema},
                                     student_flops_per_sample=fwd_bwd + fwd, snapshot=snapshot,
                                     snapshot_every=ctx.snapshot_every)
        done = (log.get("stopped_at_budget") or {}).get("iteration", hp["iterations"])
        save_student(workdir, ema, self.name, suite.name, hp, sampling, accounting, log,
                     loss=self.loss_description(hp), distance=self.loss_description(hp),
                     data_source=hp["data"], real_images_used=log["real_images"],
                     teacher_trajectories=hp["teacher_pool"] if hp["data"] == "teacher-samples" else 0,
                     target_forward_evaluations=log["student_evaluations"], iterations_done=done,
                     stopped_at_budget=log.get("stopped_at_budget"), weights="evaluation EMA",
                     flops_parts={"online_forward_backward_per_sample": fwd_bwd, "target_forward_per_sample": fwd,
                                  "note": "student_forward_backward_per_sample = online forward + backward + one "
                                          "target forward; LPIPS not counted"})

    def loss_description(self, hp: dict) -> str:
        raise NotImplementedError


@dataclass
class CDMethod(ConsistencyMethod):
    """Consistency distillation (CM paper, Algorithm 2). Defaults: the CIFAR-10 recipe (openai
    ``consistency_models_cifar10``): N = 18, mu = 0, LPIPS (L2 where LPIPS cannot run), lr 4e-4
    with warm-up over 10M of 409.6M images, batch 512, 800k iterations, evaluation EMA 0.9999
    (half-life 0.87 % of the run). Suites scale length, batch and lr (``method_options``)."""

    teacher_calls_per_sample = 2

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        lpips, why = lpips_loss()
        dims = math.prod(suite.latent_shape)
        return {**self.common_hyperparameters(suite, nfe), "N": 18, "rho": 7.0, "teacher_step": "heun",
                "target_ema": 0.0, "distance": "lpips" if lpips is not None else "l2",
                "distance_fallback": "" if lpips is not None else f"l2: lpips unavailable ({why})",
                "pseudo_huber_c": 0.00054 * math.sqrt(dims), "loss_weight": "uniform",
                "lr": 4e-4, "warmup_fraction": 10 / 409.6, "batch": 512, "iterations": 800_000,
                "ema_halflife_fraction": math.log(0.5) / math.log(0.9999) / 800_000}

    def check(self, hp: dict, suite) -> None:
        super().check(hp, suite)
        if not isinstance(hp["N"], int) or hp["N"] < 2:
            raise BadInput(f"cd: N must be an integer >= 2, got {hp['N']!r}")
        if hp["distance"] not in DISTANCES:
            raise BadInput(f"cd: distance must be one of {', '.join(DISTANCES)}, got {hp['distance']!r}")
        if hp["distance"] == "lpips" and lpips_loss()[0] is None:
            raise BadInput(f"cd: distance 'lpips' is unavailable here: {lpips_loss()[1]}; use l2")
        if not (isinstance(hp["target_ema"], int | float) and 0 <= hp["target_ema"] < 1):
            raise BadInput(f"cd: target_ema must be in [0, 1), got {hp['target_ema']!r}")
        if hp["teacher_step"] != "heun":
            raise BadInput("cd: teacher_step must be 'heun'")

    def display_name(self, hp: dict) -> str:
        name = f"CD ({hp.get('distance', 'l2').upper()})"
        return name + (" [data=teacher-samples]" if hp.get("data") == "teacher-samples" else "")

    def unavailable(self, hp: dict) -> str | None:
        return lpips_loss()[1] if hp.get("distance") == "lpips" and lpips_loss()[0] is None else None

    def loss_description(self, hp: dict) -> str:
        extra = f" (c = {hp['pseudo_huber_c']:.4g})" if hp["distance"] == "pseudo-huber" else ""
        return f"{hp['distance']}{extra}, uniform weight" + (f"; {hp['distance_fallback']}"
                                                              if hp["distance_fallback"] else "")

    def target_decay(self, hp: dict) -> float:
        return float(hp["target_ema"])

    def loss(self, model, target, teacher, x0, noise, cond, it, hp, ctx):
        grid = polynomial(hp["N"], hp["sigma_min"], hp["sigma_max"], hp["rho"]).to(x0.device, x0.dtype)
        i = torch.randint(hp["N"] - 1, (x0.shape[0],), device=x0.device)
        lpips = lpips_loss()[0] if hp["distance"] == "lpips" else None
        return cd_loss(model, target, teacher, x0, noise, grid[i], grid[i + 1], eps=hp["sigma_min"],
                       sigma_data=hp["sigma_data"], kind=hp["distance"], cond=cond, huber_c=hp["pseudo_huber_c"],
                       lpips=lpips, decode=ctx.suite.decode)


@dataclass
class ECTMethod(ConsistencyMethod):
    """Easy Consistency Tuning (ECT paper; reference ``locuslab/ect``, ``run_ecm.sh``). Defaults:
    the CIFAR-10 run: P_mean -1.1, P_std 2, q 2, k 8, b 1, c 0 (L2 norm / (t - r)), 8 stages, lr 1e-4,
    batch 128, 200k iterations, evaluation EMA 0.9999 (half-life 3.5 % of the run), the teacher's
    dropout. Suites scale length, batch and lr (``method_options``)."""

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        return {**self.common_hyperparameters(suite, nfe), "p_mean": -1.1, "p_std": 2.0, "q": 2.0, "k": 8.0,
                "b": 1.0, "stages": 8, "huber_c": 0.0, "train_sigma_min": 0.0,
                "t_range": [suite.sigma_min, suite.sigma_max], "target": "same network, stop-gradient",
                "lr": 1e-4, "warmup_fraction": 10 / 409.6, "batch": 128, "iterations": 200_000,
                "ema_halflife_fraction": math.log(0.5) / math.log(0.9999) / 200_000}

    def check(self, hp: dict, suite) -> None:
        super().check(hp, suite)
        if not isinstance(hp["stages"], int) or hp["stages"] < 1:
            raise BadInput(f"ect: stages must be an integer >= 1, got {hp['stages']!r}")
        if not hp["q"] > 1 or hp["huber_c"] < 0 or not hp["p_std"] > 0:
            raise BadInput("ect: need q > 1, huber_c >= 0 and p_std > 0")
        low_high = hp["t_range"]
        if not (isinstance(low_high, list) and len(low_high) == 2 and 0 < low_high[0] < low_high[1]):
            raise BadInput(f"ect: t_range must be [low, high] with 0 < low < high, got {low_high!r}")
        if not 0 <= hp["train_sigma_min"] < low_high[0]:
            raise BadInput("ect: train_sigma_min must be in [0, t_range[0])")

    def loss_description(self, hp: dict) -> str:
        norm = "L2 norm" if hp["huber_c"] == 0 else f"pseudo-Huber (c = {hp['huber_c']:g})"
        return f"{norm} / (t - r)"

    def target_decay(self, hp: dict) -> float:
        return 0.0  # the target is the online network itself (stop-gradient)

    def stage(self, it: int, hp: dict) -> int:
        """Stage a = floor(it / ceil(iterations / stages)), so a runs over 0..stages-1."""
        return min(it // math.ceil(hp["iterations"] / hp["stages"]), hp["stages"] - 1)

    def loss(self, model, target, teacher, x0, noise, cond, it, hp, ctx):
        n = torch.randn(x0.shape[0], device=x0.device, dtype=x0.dtype)
        low, high = hp["t_range"]
        t = (hp["p_mean"] + hp["p_std"] * n).exp().clamp(low, high)
        r = ect_r(t, self.stage(it, hp), hp["q"], hp["k"], hp["b"])
        return ect_loss(model, target, x0, noise, t, r, huber_c=hp["huber_c"], eps=hp["train_sigma_min"],
                        sigma_data=hp["sigma_data"], cond=cond)


register_method(CDMethod(name="cd", display="CD",
                         description="Consistency distillation (Song et al. 2023): Heun teacher steps on real "
                                     "data, one model for NFE 1-8"))
register_method(ECTMethod(name="ect", display="ECT",
                          description="Easy Consistency Tuning (Geng et al. 2025): consistency tuning from the "
                                      "teacher's weights, one model for NFE 1-8"))
