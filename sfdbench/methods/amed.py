"""AMED-Solver and AMED-Plugin (Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around
5 Steps", CVPR 2024, arXiv 2312.00094): a frozen teacher sampled by a solver whose intermediate
time per interval is predicted by a tiny network (``docs/algorithms.md#amed``).

Per interval [t_c, t_n] of an N-point schedule, a predictor reads the teacher's bottleneck features
of the evaluation at (x_c, t_c) (channel mean, flattened; zeros on the AFS interval, which has no
evaluation) and the raw sigmas t_c, t_n, and outputs per sample

    r in (0, 1)                          ->  t_m = t_c^(1 - r) t_n^r   (linear in log sigma)
    c_dir  = sigmoid(u) 2 s_d + 1 - s_d   (step scale, only when scale_dir s_d > 0, else 1)
    a_time = sigmoid(u) 2 s_t + 1 - s_t   (scale of the sigma fed to the network at t_m, s_t > 0)

so all-zero heads give r = 1/2, c_dir = a_time = 1. The updates, with d(x, s) = (x - D(x; s)) / s
and d_m = (x_m - D(x_m; a_time t_m)) / t_m (the sigma input scaled, the divisor not):

* ``amed`` (AMED-Solver): x_m = x_c + (t_m - t_c) d_c, x_n = x_c + c_dir (t_n - t_c) d_m. With zero
  heads this is DPM-Solver-2 (r = 1/2) on the same N points.
* ``amed-plugin`` (AMED-Plugin on iPNDM, max_order 4; the paper's headline plugin on EDM data sets):
  an iPNDM step (fixed Adams-Bashforth weights, order from the history length) from t_c to t_m on
  [d_c, history], then one from t_m to t_n on [d_m, d_c, ...] with step c_dir (t_n - t_m). With zero
  heads this is iPNDM on the 2N - 1 points with sqrt(t_c t_n) inserted.
* ``amed-plugin-dpmpp`` (AMED-Plugin on multistep DPM-Solver++(3M), noise prediction, lower-order final
  steps: the reference's LSUN-LDM preset): two ordinary multistep updates per interval, orders counted
  on the doubled step index over 2N - 1 points; the second update's increment (everything but the
  (t/t_0) x part in data mode, the x part in noise mode) is multiplied by c_dir.

NFE = 2(N - 1) - [AFS] (the predictor is not a network evaluation): odd NFE use AFS with
N = (NFE + 3)/2, even NFE no AFS with N = NFE/2 + 1 (NFE 3/5/7/9: N = 3/4/5/6).

Fit (data-free, the paper's recipe): per iteration a batch of latents; the teacher solver (Heun for
AMED-Solver, the plugin's base solver otherwise) on the nested (M + 1)(N - 1) + 1 points without AFS
gives the targets at the student timestamps; then for each interval in order one student interval
(the evaluation at t_c without gradient, the one at t_m back-propagated through the frozen teacher
into the predictor), loss = squared error summed over pixels and averaged over samples, NaN/inf
gradients sanitised, one Adam step. The AFS interval is trained (its evaluation at t_m exists).
AMED-Solver restarts each interval from the teacher state; the multistep plugins continue from their
own detached output and history. Adam lr 5e-3, no schedule, 10 kimg (79 iterations at batch 128).

The fit runs in ``methods.training.train_loop`` with the predictor as its "student": teacher
evaluations are counted by its ``CountingDenoiser`` (trajectories, t_c and t_m evaluations), student
evaluations are predictor calls (one per interval and sample), and the FLOPs of one such call are
the predictor's forward + backward plus the backward through the teacher to its input and sigma.
``model.safetensors`` holds the predictor weights and the sampling settings; ``fit.json`` the
accounting.

Defaults are the reference's CIFAR-10 launch settings; a suite scales them through its
``method_options`` (the embedded suites' values and measurements: ``docs/algorithms.md#amed``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
from sfdbench.methods.training import (
    LoopSettings,
    check_loop_settings,
    fit_done,
    read_fit,
    sanitize_gradients,
    train_loop,
)
from sfdbench.networks.adapters import bottleneck_module
from sfdbench.networks.checkpoint import load_weights, read_metadata, save_weights
from sfdbench.networks.layers import positional_embedding

PREDICTOR_KIND = "sfdbench-amed-predictor"
STUDENTS = ("amed", "ipndm", "dpmpp")
TEACHER_SOLVERS = ("heun", "dpm2", "euler", "ipndm", "dpmpp")
SCHEDULES = ("polynomial", "logsnr", "time_uniform", "discrete")
DPMPP_KEYS = ("max_order", "predict_x0", "lower_order_final", "thresholding")


# ---------------------------------------------------------------------------------------------
# The predictor


class AMEDPredictor(nn.Module):
    """AMED's predictor (arXiv 2312.00094, Sec. 4; ``docs/algorithms.md#amed``).

    time embedding e(t) = SiLU(Linear_8x8([sin | cos](t f_k))), f_k = 10^(-4k/3), k = 0..3, of the raw
    sigmas t_c and t_n (shared layer, Xavier-uniform); bottleneck encoder Linear(D -> 128) -> SiLU ->
    Linear(128 -> 4); heads Linear(20 -> 1) on [e(t_c), e(t_n), enc] for r (sigmoid) and, when their
    scale is > 0, c_dir and a_time (sigmoid(u) 2 s + 1 - s). Other layers: weights N(0, 1/fan_in),
    zero biases. With D = 64: 8,929 parameters (r only), +21 per scale head."""

    def __init__(self, feature_dim: int, scale_dir: float = 0.0, scale_time: float = 0.0, hidden: int = 128,
                 encoded: int = 4, time_channels: int = 8):
        super().__init__()
        self.feature_dim, self.scale_dir, self.scale_time = int(feature_dim), float(scale_dir), float(scale_time)
        self.time_channels = time_channels
        self.time_layer = nn.Linear(time_channels, time_channels)
        self.encoder = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, encoded))
        width = 2 * time_channels + encoded
        self.head_r = nn.Linear(width, 1)
        self.head_dir = nn.Linear(width, 1) if scale_dir > 0 else None
        self.head_time = nn.Linear(width, 1) if scale_time > 0 else None
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                if layer is self.time_layer:
                    nn.init.xavier_uniform_(layer.weight)
                else:
                    nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        return {"feature_dim": self.feature_dim, "scale_dir": self.scale_dir, "scale_time": self.scale_time}

    def _time(self, t: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1)
        emb = torch.nn.functional.silu(self.time_layer(positional_embedding(t, self.time_channels, endpoint=True)))
        return emb.expand(batch, -1)

    def forward(self, features: torch.Tensor, t_cur, t_next) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r, c_dir, a_time), each [B, 1, 1, 1], from features [B, D] and the scalar sigmas t_c, t_n."""
        b = features.shape[0]
        h = torch.cat([self._time(t_cur, b, features), self._time(t_next, b, features), self.encoder(features)], 1)
        r = torch.sigmoid(self.head_r(h))
        ones = torch.ones_like(r)
        c_dir = bounded(self.head_dir(h), self.scale_dir) if self.head_dir is not None else ones
        a_time = bounded(self.head_time(h), self.scale_time) if self.head_time is not None else ones
        return r.reshape(b, 1, 1, 1), c_dir.reshape(b, 1, 1, 1), a_time.reshape(b, 1, 1, 1)


def bounded(u: torch.Tensor, scale: float) -> torch.Tensor:
    """sigmoid(u) 2 s + 1 - s, in (1 - s, 1 + s); 1 at u = 0."""
    return torch.sigmoid(u) * 2 * scale + 1 - scale


def zero_heads(predictor: AMEDPredictor) -> AMEDPredictor:
    """Zero every head's weights and biases: r = 1/2, c_dir = a_time = 1 (the base solver)."""
    with torch.no_grad():
        for head in (predictor.head_r, predictor.head_dir, predictor.head_time):
            if head is not None:
                head.weight.zero_()
                head.bias.zero_()
    return predictor


class BottleneckCapture:
    """A forward hook on the teacher's bottleneck module (``networks.adapters.bottleneck_module``),
    active inside ``with``: ``features(batch)`` is the channel mean of its last output, flattened
    ([B, H W], detached); of a doubled classifier-free-guidance batch [u; c] the conditional half."""

    def __init__(self, denoiser):
        self.module = bottleneck_module(denoiser)
        self.output: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> BottleneckCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        self._handle, self.output = None, None
        return False

    def _hook(self, module, args, output) -> None:
        self.output = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    def features(self, batch: int) -> torch.Tensor:
        out, self.output = self.output, None
        if out is None:
            raise BadInput("the teacher's bottleneck module was not called during its evaluation; the network's "
                           "adapter names a module that its forward does not use")
        if out.shape[0] == 2 * batch:
            out = out[batch:]
        elif out.shape[0] != batch:
            raise BadInput(f"the bottleneck output has batch {out.shape[0]}, expected {batch} (or {2 * batch})")
        return out.float().mean(1).flatten(1)


# ---------------------------------------------------------------------------------------------
# The student solvers (tensors in, tensors out)


@dataclass(frozen=True)
class StudentConfig:
    """Which update runs per interval and its options (``docs/algorithms.md#amed``)."""

    kind: str = "amed"
    afs: bool = True
    max_order: int = 4
    predict_x0: bool = False
    lower_order_final: bool = True
    thresholding: bool = True


def dpmpp_update(x: torch.Tensor, models: list, times: list, t: torch.Tensor, order: int,
                 predict_x0: bool) -> torch.Tensor:
    """``diffusion.solvers.dpmpp_update`` (multistep DPM-Solver++, Lu et al. 2022, VE form) with
    tensor times, so that an inserted time may differ per sample ([B, 1, 1, 1])."""
    m0, t0 = models[-1], times[-1]
    h = torch.log(t0) - torch.log(t)
    if order >= 2:
        r0 = (torch.log(times[-2]) - torch.log(t0)) / h
        d1_0 = (m0 - models[-2]) / r0
    if order >= 3:
        r1 = (torch.log(times[-3]) - torch.log(times[-2])) / h
        d1_1 = (models[-2] - models[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if predict_x0:
        phi1 = torch.expm1(-h)
        base = (t / t0) * x - phi1 * m0
        if order == 1:
            return base
        if order == 2:
            return base - 0.5 * phi1 * d1_0
        phi2 = phi1 / h + 1
        return base + phi2 * d1 - (phi2 / h - 0.5) * d2
    phi1 = torch.expm1(h)
    base = x - t * phi1 * m0
    if order == 1:
        return base
    if order == 2:
        return base - 0.5 * t * phi1 * d1_0
    phi2 = phi1 / h - 1
    return base - t * phi2 * d1 - t * (phi2 / h - 0.5) * d2


class AMEDTrajectory:
    """One batch of trajectories of an AMED student on ``sigmas``: ``interval(k, x, ...)`` takes
    interval k from x, keeping the multistep history across calls (``detach()`` cuts its graph)."""

    def __init__(self, cfg: StudentConfig, sigmas: torch.Tensor):
        if cfg.kind not in STUDENTS:
            raise ValueError(f"unknown AMED student {cfg.kind!r}; known: {', '.join(STUDENTS)}")
        self.cfg, self.sigmas = cfg, sigmas
        self.history: list[torch.Tensor] = []  # iPNDM: directions, newest first
        self.models: list[torch.Tensor] = []  # DPM-Solver++: model values and their times, newest last
        self.times: list[torch.Tensor] = []

    def detach(self) -> None:
        self.history = [h.detach() for h in self.history]
        self.models = [m.detach() for m in self.models]
        self.times = [t.detach() for t in self.times]

    def _model_value(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if not self.cfg.predict_x0:
            return d
        x0 = x - t * d
        return solvers.dynamic_threshold(x0) if self.cfg.thresholding else x0

    def interval(self, k: int, x: torch.Tensor, denoiser: Denoiser, predictor: AMEDPredictor,
                 capture: BottleneckCapture, cond: dict) -> torch.Tensor:
        """x at t_{k+1} from x at t_k: 2 evaluations (1 on the AFS interval). The evaluation at t_k
        carries no gradient; the predictor and the evaluation at t_m do when grad mode is on."""
        cfg = self.cfg
        t_c, t_n = self.sigmas[k], self.sigmas[k + 1]
        batch = x.shape[0]
        with torch.no_grad():
            if cfg.afs and k == 0:
                d_c = analytic_first_direction(x, t_c)
                features = x.new_zeros(batch, predictor.feature_dim)
            else:
                capture.output = None
                d_c = (x - denoiser(x, t_c, **cond)) / t_c
                features = capture.features(batch)
        if features.shape[1] != predictor.feature_dim:
            raise BadInput(f"the teacher's bottleneck gives {features.shape[1]} features but the AMED predictor "
                           f"was fitted on {predictor.feature_dim}: sample with the teacher it was fitted on")
        param = next(predictor.parameters())
        r, c_dir, a_time = (v.to(x.dtype) for v in predictor(features.to(param.dtype), t_c, t_n))
        t_m = t_c ** (1 - r) * t_n**r
        if cfg.kind == "amed":
            x_m = x + (t_m - t_c) * d_c
            d_m = (x_m - denoiser(x_m, (a_time * t_m).reshape(-1), **cond)) / t_m
            return x + c_dir * (t_n - t_c) * d_m
        if cfg.kind == "ipndm":
            self.history = [d_c, *self.history][: cfg.max_order]
            x_m = x + (t_m - t_c) * _combine(solvers.IPNDM_COEFFICIENTS[len(self.history)], self.history)
            d_m = (x_m - denoiser(x_m, (a_time * t_m).reshape(-1), **cond)) / t_m
            self.history = [d_m, *self.history][: cfg.max_order]
            return x_m + c_dir * (t_n - t_m) * _combine(solvers.IPNDM_COEFFICIENTS[len(self.history)], self.history)
        points = 2 * len(self.sigmas) - 1
        self._push(self._model_value(x, t_c, d_c), t_c)
        order = solvers.dpmpp_order(2 * k, points, cfg.max_order, cfg.lower_order_final)
        x_m = dpmpp_update(x, self.models, self.times, t_m, order, cfg.predict_x0)
        d_m = (x_m - denoiser(x_m, (a_time * t_m).reshape(-1), **cond)) / t_m
        self._push(self._model_value(x_m, t_m, d_m), t_m)
        order = solvers.dpmpp_order(2 * k + 1, points, cfg.max_order, cfg.lower_order_final)
        full = dpmpp_update(x_m, self.models, self.times, t_n, order, cfg.predict_x0)
        linear = (t_n / t_m) * x_m if cfg.predict_x0 else x_m
        return linear + c_dir * (full - linear)

    def _push(self, m: torch.Tensor, t: torch.Tensor) -> None:
        t = torch.as_tensor(t, dtype=m.dtype, device=m.device)
        self.models, self.times = (self.models + [m])[-3:], (self.times + [t])[-3:]


def _combine(coefficients, tensors: list[torch.Tensor]) -> torch.Tensor:
    out = coefficients[0] * tensors[0]
    for c, t in zip(coefficients[1:], tensors[1:]):
        out = out + c * t
    return out


def amed_sample(teacher: Denoiser, predictor: AMEDPredictor, cfg: StudentConfig, sigmas: torch.Tensor,
                denoiser: Denoiser, latents: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """The final state from unit-Gaussian latents (x = z sigma_0), calling only ``denoiser`` (a
    wrapper of ``teacher``, whose bottleneck the predictor reads)."""
    sigmas = sigmas.to(device=latents.device, dtype=latents.dtype)
    x = latents * sigmas[0]
    run = AMEDTrajectory(cfg, sigmas)
    with BottleneckCapture(teacher) as capture, torch.no_grad():
        for k in range(len(sigmas) - 1):
            x = run.interval(k, x, denoiser, predictor, capture, cond or {})
    return x


class AMEDSampler:
    """``Fitted.sample``: ``sampler(denoiser, latents, cond=None)``."""

    def __init__(self, teacher: Denoiser, predictor: AMEDPredictor, cfg: StudentConfig, sigmas: torch.Tensor):
        self.teacher, self.predictor, self.cfg, self.sigmas = teacher, predictor, cfg, sigmas

    def __call__(self, denoiser: Denoiser, latents: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return amed_sample(self.teacher, self.predictor, self.cfg, self.sigmas, denoiser, latents, cond)


# ---------------------------------------------------------------------------------------------
# Fitting


def teacher_options(hp: dict) -> dict:
    """The options of the teacher solver from the hyperparameters."""
    if hp["teacher_solver"] == "dpmpp":
        return {k: hp[k] for k in DPMPP_KEYS}
    if hp["teacher_solver"] == "ipndm":
        return {"max_order": hp["max_order"]}
    return {}


def student_config(hp: dict) -> StudentConfig:
    extra = {k: hp[k] for k in DPMPP_KEYS if k in hp}
    return StudentConfig(kind=hp["student"], afs=hp["afs"], **extra)


def amed_iteration(predictor: AMEDPredictor, teacher: Denoiser, optimizer: torch.optim.Optimizer,
                   latents: torch.Tensor, sigmas: torch.Tensor, teacher_sigmas: torch.Tensor, cfg: StudentConfig,
                   teacher_solver: str, teacher_opts: dict, capture: BottleneckCapture,
                   cond: dict | None = None) -> dict:
    """One AMED training iteration on one batch of trajectories (``docs/algorithms.md#amed``)."""
    cond = cond or {}
    sigmas = sigmas.to(latents.dtype)
    k_teacher = (len(teacher_sigmas) - 1) // (len(sigmas) - 1)
    x = latents * sigmas[0]
    with torch.no_grad():
        traj = solvers.trajectory(solvers.SOLVERS[teacher_solver], teacher, x, teacher_sigmas, afs=False, cond=cond,
                                  **teacher_opts)
    targets = traj[k_teacher::k_teacher]
    run = AMEDTrajectory(cfg, sigmas)
    losses, bad = [], 0
    for k in range(len(sigmas) - 1):
        optimizer.zero_grad(set_to_none=True)
        x_next = run.interval(k, x, teacher, predictor, capture, cond)
        loss = (x_next - targets[k]).square().flatten(1).sum(1).mean()
        loss.backward()
        bad += sanitize_gradients(predictor.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
        run.detach()
        x = targets[k] if cfg.kind == "amed" else x_next.detach()
    return {"losses": losses, "bad_gradients": bad, "loss_nan": any(math.isnan(v) for v in losses)}


def predictor_call_flops(predictor: AMEDPredictor, teacher: Denoiser, latent_shape: tuple[int, ...], cond: dict,
                         device) -> dict:
    """FLOPs per sample of one training interval beyond the teacher forwards (which the loop counts):
    the predictor's forward + backward, and the backward through the frozen teacher to its input x
    and its sigma input (the gradient path from t_m), both by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    features = torch.zeros(1, predictor.feature_dim, device=device)
    params = [p for p in predictor.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        r, c_dir, a_time = predictor(features, 1.0, 0.5)
        torch.autograd.grad((r + c_dir + a_time).sum(), params, allow_unused=True)
    predictor_flops = int(counter.get_total_flops())
    x = torch.randn(1, *latent_shape, device=device, requires_grad=True)
    sigma = torch.ones(1, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            teacher(x.detach(), sigma.detach(), **cond)
    with FlopCounterMode(display=False) as both, torch.enable_grad():
        teacher(x, sigma, **cond).float().sum().backward(inputs=[x, sigma])  # only these get .grad
    teacher_backward = int(both.get_total_flops()) - int(forward.get_total_flops())
    return {"predictor_forward_backward_per_sample": predictor_flops,
            "teacher_backward_to_input_per_sample": teacher_backward,
            "per_predictor_call": predictor_flops + teacher_backward}


# ---------------------------------------------------------------------------------------------
# The methods


@dataclass
class AMEDMethod(Method):
    """AMED with one student solver (``student``) and its teacher; one predictor per NFE.

    Defaults: the reference's CIFAR-10 launch settings (arXiv 2312.00094; zju-pi/diff-sampler,
    ``amed-solver-main/launch.sh``), sigma range of the suite's solver baselines."""

    group: str = "solver"
    student: str = "amed"
    teacher_solver: str = "heun"
    schedule: str = "time_uniform"
    rho: float = 1.0
    m: int = 1
    scale_dir: float = 0.01
    scale_time: float = 0.0
    options: dict = field(default_factory=dict)
    iterations: int = 79  # ceil(10 kimg / batch 128)
    batch: int = 128
    lr: float = 5e-3
    checkpoint_every: int = 20

    def nfe_rule(self) -> str:
        return ("any NFE >= 1: NFE = 2(N-1) - AFS; odd NFE with AFS (N = (NFE+3)/2), even NFE without "
                "(N = NFE/2 + 1)")

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1

    @staticmethod
    def steps_for_nfe(nfe: int) -> tuple[int, bool]:
        """(N, AFS) with 2(N - 1) - AFS = NFE."""
        afs = nfe % 2 == 1
        return (nfe + 3) // 2 if afs else nfe // 2 + 1, afs

    def default_schedule(self, suite) -> tuple[str, float]:
        return self.schedule, self.rho

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        n, afs = self.steps_for_nfe(nfe)
        schedule, rho = self.default_schedule(suite)
        return {"student": self.student, "teacher_solver": self.teacher_solver, **self.options,
                "schedule": schedule, "rho": rho, "num_steps": n, "afs": afs, "M": self.m,
                "sigma_min": suite.sigma_min, "sigma_max": suite.sigma_max,
                "scale_dir": self.scale_dir, "scale_time": self.scale_time,
                "iterations": self.iterations, "batch": self.batch, "lr": self.lr, "fit_seed": 0,
                "checkpoint_every": self.checkpoint_every, "precision": "fp32",
                "loss": "l2 (squared error summed over pixels, mean over samples)",
                "optimizer": "adam(0.9,0.999,1e-8), constant lr",
                "next_input": "teacher state" if self.student == "amed" else "own detached output",
                "predictor": "bottleneck channel mean -> 128 -> 4; sin/cos(8) of t_c, t_n -> 8; heads on 20"}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        n, afs = self.steps_for_nfe(nfe)
        name = self.name
        if hp["student"] != self.student:
            raise BadInput(f"{name}: the student solver is fixed by the method ({self.student})")
        if hp["num_steps"] != n or hp["afs"] is not afs:
            raise BadInput(f"{name}: num_steps and afs follow from the NFE (NFE {nfe}: N = {n}, AFS {afs}); "
                           "do not set them")
        if hp["teacher_solver"] not in TEACHER_SOLVERS:
            raise BadInput(f"{name}: teacher_solver {hp['teacher_solver']!r} is not one of "
                           f"{', '.join(TEACHER_SOLVERS)}")
        needs = {"dpmpp": DPMPP_KEYS, "ipndm": ("max_order",)}.get(hp["teacher_solver"], ())
        missing = [k for k in needs if k not in hp]
        if missing:
            raise BadInput(f"{name}: a {hp['teacher_solver']} teacher needs {', '.join(missing)}, which this method "
                           "does not have; use its own base solver or heun")
        if "max_order" in hp:
            top = 3 if "dpmpp" in (hp["student"], hp["teacher_solver"]) else 4
            if not isinstance(hp["max_order"], int) or not 1 <= hp["max_order"] <= top:
                raise BadInput(f"{name}: max_order must be an integer 1-{top}, got {hp['max_order']!r}")
        for key in ("scale_dir", "scale_time"):
            if not isinstance(hp[key], (int, float)) or not 0 <= hp[key] < 1:
                raise BadInput(f"{name}: {key} must be in [0, 1), got {hp[key]!r}")
        if hp["schedule"] not in SCHEDULES:
            raise BadInput(f"{name}: schedule {hp['schedule']!r} is not one of {', '.join(SCHEDULES)}")
        if hp["schedule"] == "discrete" and (suite.discrete_vp is None or hp["rho"] != 1):
            raise BadInput(f"{name}: the discrete schedule needs a suite with a discrete-VP teacher and rho = 1")
        if hp["precision"] != "fp32":
            raise BadInput(f"{name}: precision must be fp32 (AMED trains in the teacher's own precision)")
        check_loop_settings(name, hp, ("M", "iterations", "batch", "checkpoint_every"))
        if not 0 < hp["sigma_min"] < hp["sigma_max"]:
            raise BadInput(f"{name}: need 0 < sigma_min < sigma_max, got {hp['sigma_min']}, {hp['sigma_max']}")
        if not isinstance(hp["lr"], (int, float)) or not hp["lr"] > 0:
            raise BadInput(f"{name}: lr must be > 0, got {hp['lr']!r}")
        return hp

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        if not fit_done(ctx.workdir):
            self.train(ctx, hp)
        return self.load(ctx.workdir / "model.safetensors", ctx.suite, ctx.teacher, ctx.device)

    def schedules(self, hp: dict, suite, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's N points and the teacher's nested (M + 1)(N - 1) + 1 points."""
        n, k = hp["num_steps"], hp["M"] + 1
        args = (hp["sigma_min"], hp["sigma_max"], hp["rho"], suite.discrete_vp)
        student = schedule_for(hp["schedule"], n, *args)
        teacher = schedule_for(hp["schedule"], k * (n - 1) + 1, *args)
        if not torch.allclose(teacher[::k], student, rtol=1e-9, atol=0):
            raise BadInput(f"{self.name}: the {hp['schedule']} schedule with {len(teacher)} points does not contain "
                           f"the {n}-point one")
        return student.to(device), teacher.to(device)

    def train(self, ctx: FitContext, hp: dict) -> None:
        suite, teacher, device = ctx.suite, ctx.teacher, torch.device(ctx.device)
        sigmas, teacher_sigmas = self.schedules(hp, suite, device)
        one = suite.training_conditioning(1, torch.Generator().manual_seed(0))
        one = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in one.items()}
        with BottleneckCapture(teacher) as probe, torch.no_grad():  # the feature size (one uncounted sample)
            teacher(torch.zeros(1, *suite.latent_shape, device=device), sigmas[0], **one)
            feature_dim = probe.features(1).shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp["fit_seed"])
            predictor = AMEDPredictor(feature_dim, hp["scale_dir"], hp["scale_time"])
        predictor.to(device).train()
        flops = predictor_call_flops(predictor, teacher, suite.latent_shape, one, device)
        cfg = student_config(hp)
        opts = teacher_options(hp)

        with BottleneckCapture(teacher) as capture:
            def step(model, latents, cond, optimizer, counted_teacher, fp16, it):
                return amed_iteration(model, counted_teacher, optimizer, latents, sigmas, teacher_sigmas, cfg,
                                      hp["teacher_solver"], opts, capture, cond)

            accounting, log = train_loop(ctx.workdir, predictor, teacher, LoopSettings.from_hyperparameters(hp),
                                         lambda it: hp["lr"], device, suite.latent_shape,
                                         f"fit {self.name} NFE {ctx.nfe}", ctx.progress, step,
                                         conditioning=suite.training_conditioning, devices=ctx.devices,
                                         student_flops_per_sample=flops["per_predictor_call"])
        log["flops"] = {**log["flops"], **flops}
        sampling = {"student": hp["student"], "afs": hp["afs"], "schedule": hp["schedule"], "rho": hp["rho"],
                    "num_steps": hp["num_steps"], "sigma_min": hp["sigma_min"], "sigma_max": hp["sigma_max"],
                    "nfe": ctx.nfe, **{k: hp[k] for k in DPMPP_KEYS if k in hp}}
        meta = {"kind": PREDICTOR_KIND, "method": self.name, "suite": suite.name, "sampling": sampling,
                "hyperparameters": hp, "predictor": predictor.config()}
        save_weights(predictor, ctx.workdir / "model.safetensors", meta)
        fit = {"fine_tuning": accounting.to_dict(), "hyperparameters": hp, "sampling": sampling, **log,
               "teacher_trajectories": hp["iterations"] * hp["batch"], "includes_teacher_trajectories": True,
               "student_evaluations_are": "predictor calls (one per interval and sample)",
               "predictor_parameters": sum(p.numel() for p in predictor.parameters()),
               "bottleneck_features": feature_dim, "device": accounting.device, "devices": accounting.devices,
               "loss": "l2"}
        atomic_write_bytes(ctx.workdir / "fit.json", (json.dumps(fit, indent=2) + "\n").encode())
        (ctx.workdir / "checkpoint.pt").unlink(missing_ok=True)

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        path = Path(path)
        meta = read_metadata(path)
        if meta.get("kind") != PREDICTOR_KIND or "sampling" not in meta or "predictor" not in meta:
            raise BadInput(f"{path} is not an sfdbench AMED predictor (its metadata kind is {meta.get('kind')!r})")
        s = meta["sampling"]
        if nfe is not None and nfe != s["nfe"]:
            raise BadInput(f"{path} was fitted for NFE {s['nfe']} only, not NFE {nfe}")
        predictor = load_weights(AMEDPredictor(**meta["predictor"]), path).to(device).eval()
        predictor.requires_grad_(False)
        bottleneck_module(teacher)  # an architecture without an adapter fails here, before sampling
        sigmas = schedule_for(s["schedule"], s["num_steps"], s["sigma_min"], s["sigma_max"], s["rho"],
                              suite.discrete_vp)
        cfg = StudentConfig(kind=s["student"], afs=s["afs"], **{k: s[k] for k in DPMPP_KEYS if k in s})
        fit = read_fit(path.parent)
        info = {"sampling": s, "predictor_parameters": sum(p.numel() for p in predictor.parameters()),
                **{k: fit.get(k) for k in ("teacher_evaluations", "teacher_trajectories", "student_evaluations",
                                           "bad_gradients", "nan_loss_iterations", "loss_last", "flops",
                                           "includes_teacher_trajectories", "device", "devices")}}
        return Fitted(denoiser=teacher, sample=AMEDSampler(teacher, predictor, cfg, sigmas), nfe=s["nfe"],
                      fine_tuning=fit.get("fine_tuning"), info=info)


@dataclass
class AMEDPluginDPMpp(AMEDMethod):
    """The DPM-Solver++ plugin: the discrete schedule (rho = 1) on a discrete-VP teacher, as the
    reference's LDM preset; the logSNR schedule (DPM-Solver++'s preset on EDM data sets) otherwise."""

    def default_schedule(self, suite) -> tuple[str, float]:
        return ("discrete", 1.0) if suite.discrete_vp is not None else ("logsnr", 1.0)


register_method(AMEDMethod(
    name="amed", display="AMED-Solver", student="amed", teacher_solver="heun", schedule="time_uniform", rho=1.0,
    m=1, scale_dir=0.01, scale_time=0.0,
    description="AMED-Solver: learned mean-value intermediate time per step (frozen teacher, ~9k-parameter "
                "predictor); time-uniform schedule"))
register_method(AMEDMethod(
    name="amed-plugin", display="AMED-Plugin (iPNDM)", student="ipndm", teacher_solver="ipndm",
    schedule="polynomial", rho=7.0, m=2, scale_dir=0.01, scale_time=0.2, options={"max_order": 4},
    description="AMED-Plugin on iPNDM (order 4): a learned intermediate step per interval; polynomial schedule "
                "rho=7"))
register_method(AMEDPluginDPMpp(
    name="amed-plugin-dpmpp", display="AMED-Plugin (DPM-Solver++)", student="dpmpp", teacher_solver="dpmpp",
    m=2, scale_dir=0.01, scale_time=0.0,
    options={"max_order": 3, "predict_x0": False, "lower_order_final": True, "thresholding": True},
    description="AMED-Plugin on DPM-Solver++(3M), noise prediction: a learned intermediate step per interval; "
                "logSNR (or discrete) schedule"))
