"""EPD-Solver: Ensemble Parallel Directions (Zhu, Wang, Zhao, Zhang & Zhang, "Distilling Parallel
Gradients for Fast ODE Solvers of Diffusion Models", ICCV 2025, arXiv 2507.14797; the journal
version with an RL stage is arXiv 2512.22796). Reference code: github.com/BeierZhu/EPD (read, not
copied): ``solvers.py`` (``epd_sampler``, ``epd_parallel_sampler``, ``ipndm_sampler``),
``training/networks.py`` (``EPD_predictor``), ``training/loss.py``.

Per step [t_n, t_{n+1}] of a fixed schedule, after the direction d_n at (x_n, t_n), EPD evaluates
K directions at K learned intermediate times -- independent of each other, so one parallel round
-- and steps with their learned convex combination (``docs/algorithms.md#epd-solver``):

    tau_k  = t_{n+1}^{r_k} t_n^{1 - r_k}                      r_k in (0, 1)      (log-sigma position)
    x_k    = x_n + (tau_k - t_n) s_n                          s_n = d_n (base euler), or iPNDM's
                                                                     Adams-Bashforth slope (base ipndm)
    d_k    = (x_k - D(x_k; a_k tau_k)) / tau_k                a_k in (1 - s_t, 1 + s_t)
    x_{n+1} = x_n + (t_{n+1} - t_n) sum_k lambda_k c_k d_k     lambda = softmax (the simplex),
                                                               c_k in (1 - s_d, 1 + s_d)

The learned parameters are 4 K numbers per step (no per-sample predictor network): logits u with
r = sigmoid(u_r), lambda = softmax(u_lambda), c = 1 + s_d tanh(u_c / 4), a = 1 + s_t tanh(u_a / 4)
(= the reference's 2 sigmoid(u/2) s + 1 - s). All logits 0 is the *identity* setting: r = 1/2,
lambda = 1/K, c = a = 1, and EPD is then exactly its base solver on the same schedule: DPM-Solver-2
(r = 1/2) for ``base="euler"``, the midpoint method on iPNDM's predictor for ``base="ipndm"``.

NFE. sfdbench counts network calls: S steps of K directions cost S (K + 1) - [AFS] calls per
sample (AFS replaces d_0). The paper counts a parallel round as one NFE: 2S - [AFS] sequential
rounds, reported as ``parallel_nfe`` (the record's ``nfe_parallel``). At counted NFE n the method
takes S = ceil(n / (K + 1)) steps and AFS on exactly when S (K + 1) = n + 1; other n are unsupported
for that K (K = 2: NFE 2, 3, 5, 6, 8, 9, ...).

Fitting distils a teacher solver on the nested fine schedule (as AMED, ``docs/algorithms.md#epd-solver``):
per interval, one student step, the per-sample sum of squared errors to the teacher state, an Adam step;
the next interval starts from the teacher state (base euler, single-step) or from the detached student
state (base ipndm, multistep). Gradients reach the parameters through the frozen teacher's
evaluations at the intermediate points (backward to its input only).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import Denoiser, analytic_first_direction
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.sfd import TEACHER_SOLVERS, SFDStepConfig, teacher_solver_options, teacher_targets
from sfdbench.methods.training import (
    LoopSettings,
    check_loop_settings,
    fit_done,
    read_fit,
    sanitize_gradients,
    train_loop,
)
from sfdbench.networks.checkpoint import load_weights, read_metadata, save_weights

BASES = ("euler", "ipndm")
INITS = ("spread", "zero", "randn")
MODEL_KIND = "sfdbench-solver-parameters"

# ---------------------------------------------------------------------------------------------
# Counting: steps, AFS and parallel rounds


def steps_for_nfe(nfe: int, directions: int) -> tuple[int, bool] | None:
    """(S steps, AFS) with S (K + 1) - AFS = ``nfe`` counted calls per sample, or None."""
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1 or directions < 1:
        return None
    steps = -(-nfe // (directions + 1))
    afs = steps * (directions + 1) - nfe
    return (steps, bool(afs)) if afs in (0, 1) else None


def parallel_nfe(steps: int, afs: bool) -> int:
    """The paper's NFE: sequential rounds of network calls, 2 per step (d_n, then the K parallel
    directions), minus the analytic first one."""
    return 2 * steps - int(afs)


# ---------------------------------------------------------------------------------------------
# The learned parameters


class EPDParameters(nn.Module):
    """The learned logits, 4 tables of shape [steps, K]. ``step(n)`` maps step n's logits to
    (r, lambda, c, a), each of shape [K]. ``forward`` is one batch of the frozen denoiser's
    evaluations at the intermediate points; calling it through this module lets the training loop
    count them (a forward hook) as evaluations that are back-propagated (to the input only)."""

    def __init__(self, steps: int, directions: int, scale_dir: float = 0.0, scale_time: float = 0.0,
                 init: str = "zero", seed: int = 0):
        super().__init__()
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        shape = (steps, directions)
        self.r_logits = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        self.weight_logits = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        self.dir_logits = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        self.time_logits = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        with torch.no_grad():
            if init == "spread":  # r_k = (k + 1/2) / K: distinct points break the symmetry of equal weights
                r = (torch.arange(directions, dtype=torch.float64) + 0.5) / directions
                self.r_logits.copy_(torch.logit(r).expand(shape))
            elif init == "randn":  # the reference's standard-normal logits
                gen = torch.Generator().manual_seed(seed)
                for p in self.parameters():
                    p.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
            elif init != "zero":
                raise ValueError(f"unknown EPD init {init!r}; known: {', '.join(INITS)}")

    @property
    def steps(self) -> int:
        return self.r_logits.shape[0]

    @property
    def directions(self) -> int:
        return self.r_logits.shape[1]

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = torch.sigmoid(self.r_logits[n])
        weights = torch.softmax(self.weight_logits[n], dim=-1)
        scale_dir = 1 + self.scale_dir * torch.tanh(self.dir_logits[n] / 4)
        scale_time = 1 + self.scale_time * torch.tanh(self.time_logits[n] / 4)
        return r, weights, scale_dir, scale_time

    def table(self) -> dict[str, list[list[float]]]:
        """The learned values per step (for records and logs)."""
        rows = [self.step(n) for n in range(self.steps)]
        return {name: [[float(v) for v in row[i].detach()] for row in rows]
                for i, name in enumerate(("r", "weights", "scale_dir", "scale_time"))}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, denoiser: Denoiser, cond: dict) -> torch.Tensor:
        return denoiser(x, sigma, **cond)


# ---------------------------------------------------------------------------------------------
# The math (tensors in, tensors out)


def repeat_cond(cond: dict, batch: int, k: int) -> dict:
    """``cond`` for a batch of ``batch * k`` points ordered sample-major: every per-sample tensor
    repeated k times along dim 0; anything else (a scalar step condition) unchanged."""
    return {key: v.repeat_interleave(k, dim=0) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch
            else v for key, v in cond.items()}


def epd_update(evaluate, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, slope: torch.Tensor,
               params: tuple, cond: dict) -> torch.Tensor:
    """One EPD step from (x, t_cur) to t_next (module docstring). ``slope`` moves x to the
    intermediate points (d_n, or iPNDM's combination); ``params`` = (r, lambda, c, a), each [K];
    ``evaluate(x, sigma, cond)`` is the denoiser, called once on all B K points (sample-major)."""
    r, weights, scale_dir, scale_time = (p.to(x.dtype) for p in params)
    b, k, view = x.shape[0], r.shape[0], (1, -1, *([1] * (x.ndim - 1)))
    tau = t_next**r * t_cur ** (1 - r)  # [K]
    x_mid = x.unsqueeze(1) + (tau - t_cur).reshape(view) * slope.unsqueeze(1)  # [B, K, ...]
    sigma_in = (scale_time * tau).repeat(b)  # [B K], sample-major
    denoised = evaluate(x_mid.reshape(b * k, *x.shape[1:]), sigma_in, repeat_cond(cond, b, k))
    d_mid = (x_mid - denoised.reshape(x_mid.shape)) / tau.reshape(view)
    return x + (t_next - t_cur) * ((weights * scale_dir).reshape(view) * d_mid).sum(1)


def base_slope(base: str, d_cur: torch.Tensor, history: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """The direction that moves x_n to the intermediate points: d_n (``euler``), or iPNDM's fixed
    Adams-Bashforth combination of d_n and the previous steps' d (``ipndm``, newest first, order
    min(max_order, len(history) + 1); as the AMED/EPD iPNDM plugin, ``docs/algorithms.md#ipndm``)."""
    if base == "euler":
        return d_cur
    terms = [d_cur, *history][:max_order]
    coefficients = solvers.IPNDM_COEFFICIENTS[len(terms)]
    out = coefficients[0] * terms[0]
    for c, t in zip(coefficients[1:], terms[1:]):
        out = out + c * t
    return out


def epd(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, params: list[tuple], afs: bool = False,
        cond: dict | None = None, base: str = "euler", max_order: int = 4):
    """EPD-Solver as a solver generator (``diffusion.solvers`` convention): ``params[n]`` =
    (r, lambda, c, a) of step n. Per step 1 call at (x_n, t_n) (none at step 0 with AFS) and one
    call on the K intermediate points together: S (K + 1) - AFS network evaluations per sample."""
    cond = cond or {}
    history: list[torch.Tensor] = []

    def evaluate(x_, sigma_, cond_):
        return denoiser(x_, sigma_, **cond_)

    for n in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[n], sigmas[n + 1]
        d = analytic_first_direction(x, t_cur) if afs and n == 0 else solvers.direction(denoiser, x, t_cur, cond)
        x = epd_update(evaluate, x, t_cur, t_next, base_slope(base, d, history, max_order), params[n], cond)
        history = [d, *history][: max_order - 1]
        yield x


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class EPDTraining:
    sigmas: torch.Tensor
    teacher_cfg: SFDStepConfig
    afs: bool
    base: str
    max_order: int
    next_input: str  # "teacher" or "student"


def epd_iteration(params: EPDParameters, teacher: Denoiser, counted_teacher: Denoiser,
                  optimizer: torch.optim.Optimizer, latents: torch.Tensor, cfg: EPDTraining, cond: dict,
                  fp16: bool = False) -> dict:
    """One batch of trajectories: the teacher's states at the student timestamps (counted, no
    grad), then per interval one EPD step, loss = per-sample sum of squared errors averaged over
    the batch, backward (through the frozen ``teacher``'s evaluations at the intermediate points,
    called through ``params`` so they are counted), NaN gradients zeroed, an Adam step."""
    sigmas = cfg.sigmas.to(latents.dtype)
    x = latents * sigmas[0]
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=fp16)
    with autocast:
        targets = teacher_targets(counted_teacher, x, sigmas, cfg.teacher_cfg, cond)

    def evaluate(x_, sigma_, cond_):
        with autocast:
            return params(x_, sigma_, teacher, cond_).to(x_.dtype)

    losses, bad, history = [], 0, []
    for n in range(len(sigmas) - 1):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast:
            d = analytic_first_direction(x, sigmas[n]) if cfg.afs and n == 0 else \
                solvers.direction(counted_teacher, x, sigmas[n], cond).to(x.dtype)
        slope = base_slope(cfg.base, d, history, cfg.max_order)
        x_next = epd_update(evaluate, x, sigmas[n], sigmas[n + 1], slope, params.step(n), cond)
        loss = (x_next - targets[n]).square().flatten(1).sum(1).mean()
        loss.backward()
        bad += sanitize_gradients(params.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
        history = [d, *history][: cfg.max_order - 1]
        x = targets[n] if cfg.next_input == "teacher" else x_next.detach()
    return {"losses": losses, "bad_gradients": bad, "loss_nan": any(math.isnan(v) for v in losses),
            "shown_loss": sum(losses)}


def input_gradient_flops(denoiser: Denoiser, latent_shape: tuple[int, ...], cond: dict, device) -> int:
    """FLOPs of one evaluation of the frozen ``denoiser`` on one sample plus the backward pass to
    its input (what each intermediate-point evaluation costs in training), counted as
    ``training.per_sample_flops`` counts (``FlopCounterMode``, multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *latent_shape, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        out = denoiser(x, torch.ones(1, device=device), **cond)
        out.float().sum().backward()  # x is a local leaf; the frozen denoiser accumulates nothing
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The method


def check_epd_hyperparameters(name: str, hp: dict) -> None:
    if not isinstance(hp["directions"], int) or isinstance(hp["directions"], bool) or hp["directions"] < 1:
        raise BadInput(f"{name}: directions (K) must be an integer >= 1, got {hp['directions']!r}")
    if hp["base"] not in BASES:
        raise BadInput(f"{name}: base {hp['base']!r} is not one of {', '.join(BASES)}")
    if hp["init"] not in INITS:
        raise BadInput(f"{name}: init {hp['init']!r} is not one of {', '.join(INITS)}")
    if not isinstance(hp["max_order"], int) or not 1 <= hp["max_order"] <= 4:
        raise BadInput(f"{name}: max_order must be 1-4, got {hp['max_order']!r}")
    for key in ("scale_dir", "scale_time"):
        if not isinstance(hp[key], (int, float)) or not 0 <= hp[key] < 1:
            raise BadInput(f"{name}: {key} must be in [0, 1), got {hp[key]!r}")
    if hp["teacher_solver"] not in TEACHER_SOLVERS:
        raise BadInput(f"{name}: teacher_solver {hp['teacher_solver']!r} is not one of {', '.join(TEACHER_SOLVERS)}")
    if hp["next_input"] not in ("teacher", "student"):
        raise BadInput(f"{name}: next_input must be 'teacher' or 'student', got {hp['next_input']!r}")
    if not isinstance(hp["lr"], (int, float)) or not hp["lr"] > 0:
        raise BadInput(f"{name}: lr must be a positive number, got {hp['lr']!r}")
    check_loop_settings(name, hp, ("M", "iterations", "batch", "checkpoint_every"))
    if not 0 < hp["sigma_min"] < hp["sigma_max"]:
        raise BadInput(f"{name}: need 0 < sigma_min < sigma_max, got {hp['sigma_min']}, {hp['sigma_max']}")


@dataclass
class EPDMethod(Method):
    """EPD-Solver with K parallel directions per step, fitted by distilling a teacher solver.

    Defaults: the reference's CIFAR-10 EPD setting (README ``launch.sh`` line: student epd, teacher
    heun, M = 1, AFS, scale_dir 0.01, scale_time 0, time_uniform rho = 1, batch 128, 10k
    trajectories = 79 iterations; K = 2, the predictor's default ``num_points``) with the
    AMED code base's Adam lr 5e-3. The reference initialises the logits from a standard normal;
    the default here is a deterministic spread of the K points (``init``)."""

    group: str = "solver"  # a learned solver: the network stays frozen (as AMED and GITS)
    directions: int = 2
    base: str = "euler"
    schedule: str = "time_uniform"
    rho: float = 1.0
    scale_dir: float = 0.01
    scale_time: float = 0.0
    teacher_solver: str = "heun"
    m: int = 1
    iterations: int = 79
    batch: int = 128
    lr: float = 5e-3

    def directions_in(self, suite) -> int:
        return suite.method_options.get(self.name, {}).get("directions", self.directions) if suite else self.directions

    def nfe_rule(self) -> str:
        k = self.directions
        reachable = sorted(n for s in (1, 2, 3) for n in (s * (k + 1) - 1, s * (k + 1)) if n >= 1)
        return (f"NFE = S(K+1) - AFS counted calls for S steps of K parallel directions (K = {k}: "
                f"{', '.join(map(str, reachable))}, ...; other NFEs with --set {self.name}.directions=K); "
                "the paper's parallel NFE is 2S - AFS")

    def supports(self, nfe: int) -> bool:
        return steps_for_nfe(nfe, self.directions) is not None

    def supports_in(self, suite, nfe: int) -> bool:
        k = self.directions_in(suite)
        return isinstance(k, int) and steps_for_nfe(nfe, k) is not None

    def display_name(self, hp: dict) -> str:
        return self.display + (" (iPNDM plugin)" if hp.get("base") == "ipndm" else "")

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        k = self.directions_in(suite)
        base = suite.method_options.get(self.name, {}).get("base", self.base)
        fit = steps_for_nfe(nfe, k) if isinstance(k, int) else None
        steps, afs = fit if fit else (None, None)
        return {"directions": k, "base": base, "max_order": 4, "num_steps": None if steps is None else steps + 1,
                "afs": afs, "schedule": self.schedule, "rho": self.rho, "sigma_min": suite.sigma_min,
                "sigma_max": suite.sigma_max, "scale_dir": self.scale_dir, "scale_time": self.scale_time,
                "init": "spread", "teacher_solver": self.teacher_solver, "M": self.m,
                "max_order_teacher": 3, "predict_x0": True, "lower_order_final": True, "thresholding": False,
                "loss": "l2 (per-sample sum, batch mean)", "next_input": "student" if base == "ipndm" else "teacher",
                "iterations": self.iterations, "batch": self.batch, "lr": self.lr,
                "optimizer": "adam(0.9,0.999,1e-8)", "fit_seed": 0, "checkpoint_every": 20, "precision": "fp32"}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        check_epd_hyperparameters(self.name, hp)
        fit = steps_for_nfe(nfe, hp["directions"])
        if fit is None or (hp["num_steps"], hp["afs"]) != (fit[0] + 1, fit[1]):
            raise BadInput(f"{self.name}: num_steps and afs follow from the NFE and K (NFE = S(K+1) - AFS, "
                           f"N = S + 1); NFE {nfe} with K = {hp['directions']} does not fit or they were set")
        return hp

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        if not fit_done(ctx.workdir):
            self.train(ctx, hp)
        return self.load(ctx.workdir / "model.safetensors", ctx.suite, ctx.teacher, ctx.device, ctx.nfe)

    def train(self, ctx: FitContext, hp: dict) -> None:
        suite = ctx.suite
        steps = hp["num_steps"] - 1
        params = EPDParameters(steps, hp["directions"], hp["scale_dir"], hp["scale_time"], hp["init"],
                               hp["fit_seed"]).to(ctx.device)
        sigmas = schedule_for(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                              suite.discrete_vp).to(ctx.device)
        options = teacher_solver_options(hp["teacher_solver"], {**hp, "max_order": hp["max_order_teacher"]})
        teacher_cfg = SFDStepConfig(m=hp["M"], schedule=hp["schedule"], rho=hp["rho"], afs=hp["afs"],
                                    teacher_solver=hp["teacher_solver"], teacher_options=tuple(options.items()),
                                    vp=suite.discrete_vp)
        cfg = EPDTraining(sigmas, teacher_cfg, hp["afs"], hp["base"], hp["max_order"], hp["next_input"])
        one = suite.training_conditioning(1, torch.Generator().manual_seed(0))
        one = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in one.items()}
        per_eval = input_gradient_flops(ctx.teacher, suite.latent_shape, one, ctx.device)

        def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
            return epd_iteration(model, ctx.teacher, counted_teacher, optimizer, latents, cfg, cond, fp16)

        accounting, log = train_loop(ctx.workdir, params, ctx.teacher, LoopSettings.from_hyperparameters(hp),
                                     lambda it: hp["lr"], ctx.device, suite.latent_shape,
                                     f"fit {self.name} NFE {ctx.nfe}", ctx.progress, step,
                                     conditioning=suite.training_conditioning, devices=ctx.devices,
                                     student_flops_per_sample=per_eval)
        sampling = {"solver": "epd", "base": hp["base"], "max_order": hp["max_order"], "directions": hp["directions"],
                    "num_steps": hp["num_steps"], "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                    "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"], "scale_dir": hp["scale_dir"],
                    "scale_time": hp["scale_time"], "nfe": ctx.nfe, "parallel_nfe": parallel_nfe(steps, hp["afs"])}
        meta = {"kind": MODEL_KIND, "method": self.name, "suite": suite.name, "sampling": sampling,
                "hyperparameters": hp}
        save_weights(params, ctx.workdir / "model.safetensors", meta)
        fit = {"fine_tuning": accounting.to_dict(), "hyperparameters": hp, "sampling": sampling, **log,
               "teacher_evaluations_with_input_gradient": log["student_evaluations"],
               "teacher_trajectories": hp["iterations"] * hp["batch"], "includes_teacher_trajectories": True,
               "device": accounting.device, "devices": accounting.devices, "loss": hp["loss"],
               "learned": params.table(), "parallel_nfe": sampling["parallel_nfe"]}
        atomic_write_bytes(ctx.workdir / "fit.json", (json.dumps(fit, indent=2, default=str) + "\n").encode())
        (ctx.workdir / "checkpoint.pt").unlink(missing_ok=True)

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        meta = read_metadata(path)
        if meta.get("kind") != MODEL_KIND or "sampling" not in meta:
            raise BadInput(f"{path} is not an sfdbench EPD parameter file (metadata kind {meta.get('kind')!r})")
        s = meta["sampling"]
        if nfe is not None and nfe != s["nfe"]:
            raise BadInput(f"{path} was fitted for NFE {s['nfe']} only, not NFE {nfe}")
        params = load_weights(EPDParameters(s["num_steps"] - 1, s["directions"], s["scale_dir"], s["scale_time"]),
                              path)
        sigmas = schedule_for(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"],
                              suite.discrete_vp)
        with torch.no_grad():
            table = [tuple(p.detach().clone() for p in params.step(n)) for n in range(params.steps)]
        sample = functools.partial(_sample, sigmas, table, s["afs"], s["base"], s["max_order"])
        fit = read_fit(Path(path).parent)
        info = {"parallel_nfe": s["parallel_nfe"], "directions": s["directions"], "steps": s["num_steps"] - 1,
                "sampling": s, "learned": params.table(),
                **{k: fit.get(k) for k in ("teacher_evaluations", "teacher_evaluations_with_input_gradient",
                                           "teacher_trajectories", "includes_teacher_trajectories", "bad_gradients",
                                           "nan_loss_iterations", "loss", "loss_last", "flops", "device", "devices",
                                           "precision")}}
        return Fitted(denoiser=teacher, sample=sample, nfe=s["nfe"], fine_tuning=fit.get("fine_tuning"), info=info)


def _sample(sigmas: torch.Tensor, table: list[tuple], afs: bool, base: str, max_order: int, denoiser: Denoiser,
            latents: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    sigmas = sigmas.to(device=latents.device, dtype=latents.dtype)
    params = [tuple(p.to(device=latents.device, dtype=latents.dtype) for p in row) for row in table]
    x = latents * sigmas[0]
    for state in epd(denoiser, x, sigmas, params=params, afs=afs, cond=cond, base=base, max_order=max_order):
        x = state
    return x


register_method(EPDMethod(
    name="epd", display="EPD-Solver",
    description="Ensemble Parallel Direction solver: K learned parallel directions per step, distilled from a "
                "teacher solver; NFE counts every call (the paper's parallel NFE is recorded beside it)"))
