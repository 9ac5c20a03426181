"""GITS: a time schedule searched by dynamic programming on a fine grid (Chen et al., "On the
Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024, arXiv 2405.11326; the authors'
code is zju-pi/diff-sampler, ``gits-main/gits_utils.py``). See ``docs/algorithms.md#gits``.

1. **Fine grid.** ``grid_steps`` = T noise levels of the suite's schedule family (the paper: T = 61,
   polynomial rho = 7 on [0.002, 80]).
2. **Warm-up.** ``num_warmup`` teacher trajectories (iPNDM order 4 by default) on the whole grid,
   keeping every state X_j and the raw model direction d_j = (X_j - D(X_j; t_j)) / t_j at every
   grid point but the last. Their teacher evaluations are counted.
3. **Cost matrix.** For i < j one Euler jump x_ij = X_i + (t_j - t_i) d_i, and
   C_ij = mean over trajectories of
   * ``l1`` / ``l2``: ||x_ij - X_j||_1 / ||x_ij - X_j||_2;
   * ``dev`` (the default): dev(x_ij) - dev(X_j), where dev(p) is the distance of p from the
     straight line through the trajectory's ends X_0 and X_{T-1}, i.e. the norm of the part of
     X_{T-1} - p orthogonal to X_{T-1} - X_0, and dev(X_{T-1}) = 0. These costs are signed.
4. **DP.** With K = N - 1 segments, V_j^(1) = C_{j,T-1} and
   V_j^(k) = min_{j<i<T-1} (C_ji + gamma V_i^(k-1)) for k = 2..K. The path from j = 0 that takes the
   smallest minimising i at every step minimises sum_m gamma^m C_{i_m, i_{m+1}} over
   0 = i_0 < i_1 < ... < i_K = T - 1, and is the lexicographically smallest optimal path
   (gamma = ``coeff``, 1.15: segments near the data weigh more).
5. **Sampling.** The student solver (iPNDM order 4, or Euler = DDIM) on the N selected noise
   levels: NFE = N - 1. With ``afs``, one extra grid index k in [1, i_1 - 1] is inserted after
   index 0 (the k whose student sample lands closest in L2 to the teacher's final state on the
   last warm-up batch) and the first step is analytic, so NFE stays N - 1 with N + 1 levels.

The search is this method's fit: its wall time, device-hours, counted teacher evaluations and
FLOPs are recorded like any fine-tuning, and the found schedule goes into ``fit.json`` in the fit's
work folder (a complete ``fit.json`` is reused) and into the record's ``fit_info``. The warm-up
does not depend on the NFE, the student solver or gamma, so it is computed once into a SIBLING
folder ``<workdir>.parent / "gits-warmup-<key>"`` (``key`` hashes the suite, the teacher's content
id and the warm-up's settings, ``WARMUP_KEYS``) and reused by the other fits; every fit still
reports the whole warm-up's cost as part of its own (the reference searches at every launch), with
the split in ``fit_info["search_parts"]``.

Departures from the reference, on purpose:
* the warm-up latents (and conditioning) are drawn once for all ``num_warmup`` trajectories from a
  CPU generator seeded with ``warmup_seed``, and the costs are averaged over trajectories, so the
  schedule does not depend on the batch split (the reference draws ``floor(num_warmup / (batch + 1))
  + 1`` rounds of ``batch`` from the global RNG and averages the rounds' batch means: the same
  numbers when ``batch`` divides ``num_warmup``);
* with AFS the DP requires i_1 >= 2, so that an index can be inserted and the declared NFE holds
  (the reference would then sample N levels with AFS, one NFE fewer);
* when the DP has a single feasible path (N = 2 or N = T, without AFS) the warm-up is skipped.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.denoiser import (
    ClassifierFreeGuidance,
    CountingDenoiser,
    Denoiser,
    DenoiserWrapper,
    analytic_first_direction,
)
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method
from sfdbench.methods.training import Accounting, Stopwatch, device_name, null_progress, per_sample_flops

COST_METRICS = ("dev", "l1", "l2")
STUDENT_SOLVERS = ("ipndm", "euler")
# teachers that evaluate the model once per step, at the step's own state (so d_j is the direction at X_j)
TEACHER_SOLVERS = ("ipndm", "euler", "ipndm_v", "dpmpp")
FIT_FILE = "fit.json"

# ---------------------------------------------------------------------------------------------
# The math (tensors in, tensors out)


def deviation(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Distance of each point from the line through ``start`` and ``end`` (per trajectory):
    dev(p) = || (e - p) - <e - p, u> u ||_2 with u = (e - s) / ||e - s||_2 (GITS paper's trajectory
    deviation; the reference's ``cal_deviation``).

    ``points`` [..., B, D], ``start`` and ``end`` [B, D] (flattened samples); returns [..., B]."""
    unit = end - start
    unit = unit / unit.norm(dim=-1, keepdim=True)
    to_end = end - points
    along = (to_end * unit).sum(-1, keepdim=True)
    return (to_end - along * unit).norm(dim=-1)


class _DirectionRecorder(DenoiserWrapper):
    """Passes calls through and keeps d = (x - D(x; sigma)) / sigma of each call, computed exactly
    as ``diffusion.solvers.direction`` computes it (so an Euler jump from the record reproduces the
    solver's own step bit for bit)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__(denoiser)
        self.directions: list[torch.Tensor] = []
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        out = self.denoiser(x, sigma, **cond)
        self.directions.append((x - out) / sigma)
        self.sigmas.append(float(sigma))
        return out


def teacher_run(teacher: Denoiser, latents: torch.Tensor, grid: torch.Tensor, solver: str = "ipndm",
                options: dict | None = None, afs: bool = False,
                cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm-up teacher on the whole fine grid: states [T, B, ...] (X_0 = t_0 z, ..., X_{T-1})
    and the raw model directions [T - 1, B, ...] at X_0 .. X_{T-2} (for iPNDM the direction at the
    state, not the Adams-Bashforth combination; with ``afs`` d_0 = X_0 / sqrt(1 + t_0^2)).
    ``solver`` must evaluate the model once per step at its current state (``TEACHER_SOLVERS``)."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"GITS teacher solver must be one of {', '.join(TEACHER_SOLVERS)}, got {solver!r}")
    grid = grid.to(device=latents.device, dtype=latents.dtype)
    recorder = _DirectionRecorder(teacher)
    with torch.no_grad():
        states = solvers.trajectory(solvers.SOLVERS[solver], recorder, latents * grid[0], grid, afs=afs, cond=cond,
                                    **(options or {}))
    directions = recorder.directions
    if afs:
        directions = [analytic_first_direction(states[0], grid[0]), *directions]
    expected = [float(t) for t in grid[int(afs):-1]]
    if len(directions) != len(grid) - 1 or recorder.sigmas != expected:
        raise RuntimeError(f"teacher solver {solver!r} did not evaluate the model once per grid point")
    return states, torch.stack(directions)


def cost_sums(states: torch.Tensor, directions: torch.Tensor, grid: torch.Tensor, metric: str = "dev") -> torch.Tensor:
    """Sum over the batch of the per-trajectory GITS costs, float64 [T, T] (0 on and below the
    diagonal): for i < j the Euler jump x_ij = X_i + (t_j - t_i) d_i, and ``l1`` ||x_ij - X_j||_1,
    ``l2`` ||x_ij - X_j||_2, or ``dev`` dev(x_ij) - dev(X_j) with dev of ``deviation`` relative to the
    line X_0 -> X_{T-1} and dev(X_{T-1}) = 0 (``docs/algorithms.md#gits``). Divide by the number of
    trajectories for the cost matrix."""
    if metric not in COST_METRICS:
        raise ValueError(f"unknown GITS cost metric {metric!r}; known: {', '.join(COST_METRICS)}")
    t_count, batch = states.shape[0], states.shape[1]
    grid = grid.to(device=states.device, dtype=states.dtype)
    flat, dirs = states.reshape(t_count, batch, -1), directions.reshape(t_count - 1, batch, -1)
    sums = torch.zeros(t_count, t_count, dtype=torch.float64)
    if metric == "dev":
        dev_teacher = deviation(flat, flat[0], flat[-1])
        dev_teacher[-1] = 0.0
    for i in range(t_count - 1):
        steps = (grid[i + 1:] - grid[i]).reshape(-1, 1, 1)
        jumps = flat[i] + steps * dirs[i]  # [T - i - 1, B, D]
        if metric == "l1":
            per = (jumps - flat[i + 1:]).abs().sum(-1)
        elif metric == "l2":
            per = (jumps - flat[i + 1:]).norm(dim=-1)
        else:
            per = deviation(jumps, flat[0], flat[-1]) - dev_teacher[i + 1:]
        sums[i, i + 1:] = per.double().sum(-1).cpu()
    return sums


def _check_dp_input(cost, num_steps: int, coeff: float) -> np.ndarray:
    c = np.asarray(cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"the cost matrix must be square with T >= 2, got shape {c.shape}")
    if not 2 <= num_steps <= c.shape[0]:
        raise ValueError(f"need 2 <= N <= T timestamps, got N = {num_steps}, T = {c.shape[0]}")
    if not (math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"the GITS coefficient must be a finite number > 0, got {coeff}")
    if np.isnan(c).any():
        raise ValueError("the cost matrix has NaN entries")
    return c


def dp_schedule(cost, num_steps: int, coeff: float = 1.15, min_first: int = 1) -> tuple[list[int], float]:
    """GITS' dynamic programme (``docs/algorithms.md#gits``): the indices 0 = i_0 < i_1 < ... <
    i_K = T - 1, K = ``num_steps`` - 1, that minimise sum_m coeff^m C[i_m, i_{m+1}], by
    V_j^(1) = C[j, T-1], V_j^(k) = min_{j<i<T-1} (C[j, i] + coeff V_i^(k-1)); backtracking from
    j = 0 takes the smallest minimising i at each step (the lexicographically smallest optimal
    path; the reference's exact-equality search). ``min_first`` > 1 forbids i_1 < min_first (used
    with AFS). O(K T^2). Returns (indices, optimal value V_0^(K))."""
    c = _check_dp_input(cost, num_steps, coeff)
    t_count, k_total = c.shape[0], num_steps - 1
    c = c.copy()
    c[0, 1:min_first] = np.inf
    inner = np.arange(t_count)
    allowed = inner[None, :] > inner[:, None]  # i > j
    allowed[:, t_count - 1] = False  # an intermediate index is never the last grid point
    values = np.full((k_total + 1, t_count), np.inf)
    choice = np.zeros((k_total + 1, t_count), dtype=np.int64)
    values[1, :t_count - 1] = c[:t_count - 1, t_count - 1]
    for k in range(2, k_total + 1):
        candidates = np.where(allowed, c + coeff * values[k - 1][None, :], np.inf)
        choice[k] = np.argmin(candidates, axis=1)  # the first (smallest) minimising index
        values[k] = candidates[inner, choice[k]]
    if not np.isfinite(values[k_total, 0]):
        raise ValueError(f"no path of {k_total} segments from index 0 to {t_count - 1} "
                         f"with i_1 >= {min_first} on a grid of {t_count} points")
    path, j = [0], 0
    for k in range(k_total, 1, -1):
        j = int(choice[k, j])
        path.append(j)
    return [*path, t_count - 1], float(values[k_total, 0])


def path_value(cost, path: list[int], coeff: float) -> float:
    """sum_m coeff^m C[i_m, i_{m+1}], evaluated in the DP's own order (Horner form from the last
    segment), so equal paths give bit-identical values."""
    c = np.asarray(cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    value = c[path[-2], path[-1]]
    for m in range(len(path) - 3, -1, -1):
        value = c[path[m], path[m + 1]] + coeff * value
    return float(value)


def brute_force_schedule(cost, num_steps: int, coeff: float = 1.15, min_first: int = 1) -> tuple[list[int], float]:
    """The reference answer for tests: every increasing index tuple enumerated in lexicographic
    order, keeping the first with the smallest ``path_value``. Exponential in T; small grids only."""
    c = _check_dp_input(cost, num_steps, coeff)
    t_count = c.shape[0]
    best, best_value = None, math.inf
    for middle in itertools.combinations(range(1, t_count - 1), num_steps - 2):
        if middle and middle[0] < min_first:
            continue
        path = [0, *middle, t_count - 1]
        value = path_value(c, path, coeff)
        if value < best_value:
            best, best_value = path, value
    if best is None:
        raise ValueError("no feasible path")
    return best, best_value


# ---------------------------------------------------------------------------------------------
# The search (the fit)


@dataclass
class SearchResult:
    """A finished search: the grid, the chosen indices (AFS index included) and their sigmas, the
    cost matrix, and the compute it took."""

    grid: list[float]
    indices: list[int]
    dp_indices: list[int]
    dp_value: float | None
    afs_index: int | None
    afs_distances: dict
    cost: list[list[float]] | None
    teacher_evaluations: int
    trajectories: int
    accounting: Accounting
    teacher_forward_flops_per_sample: int
    parts: dict | None = None  # the warm-up's cost and this NFE's own (DP, AFS trials), when searched

    @property
    def sigmas(self) -> list[float]:
        return [self.grid[i] for i in self.indices]

    def info(self) -> dict:
        """What a record keeps (the cost matrix stays in ``fit.json``)."""
        return {"schedule_indices": self.indices, "schedule_sigmas": self.sigmas, "dp_indices": self.dp_indices,
                "dp_value": self.dp_value, "afs_index": self.afs_index, "grid_steps": len(self.grid),
                "teacher_evaluations": self.teacher_evaluations, "teacher_trajectories": self.trajectories,
                "includes_teacher_trajectories": True, "device": self.accounting.device,
                "devices": self.accounting.devices,
                "flops": {"teacher_forward_per_sample": self.teacher_forward_flops_per_sample,
                          "counter": "torch.utils.flop_counter.FlopCounterMode (matmul + conv, multiply-add = 2)"},
                "search_parts": self.parts}

    def to_json(self) -> dict:
        return {"fine_tuning": self.accounting.to_dict(), **self.info(), "grid": self.grid,
                "afs_distances": self.afs_distances, "cost_matrix": self.cost}


def _slice_cond(cond: dict, lo: int, hi: int, device) -> dict:
    return {k: (v[lo:hi].to(device) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}


@dataclass
class GITSMethod(Method):
    """GITS: the student solver on a DP-searched subset of a fine grid (``docs/algorithms.md#gits``).

    Defaults are the paper's (CIFAR-10 launch): T = 61 polynomial rho = 7 levels on the suite's
    [sigma_min, sigma_max], iPNDM-4 teacher without AFS, 256 warm-up trajectories, ``dev`` cost,
    gamma = 1.15, student iPNDM-4 (``solver=euler`` gives "DDIM + GITS")."""

    group: str = "solver"
    grid_steps: int = 61
    student_solver: str = "ipndm"  # the default of hyperparameter ``solver``

    def nfe_rule(self) -> str:
        return (f"NFE 1..T-1 (T = grid_steps, default {self.grid_steps}; T-2 with AFS): N = NFE + 1 levels "
                "chosen from the grid")

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and not isinstance(nfe, bool) and 1 <= nfe <= self.grid_steps - 1

    def supports_in(self, suite, nfe: int) -> bool:
        opts = suite.method_options.get(self.name, {}) if suite is not None else {}
        t_count, afs = opts.get("grid_steps", self.grid_steps), opts.get("afs", False)
        if not isinstance(t_count, int) or not isinstance(afs, bool):
            return self.supports(nfe)  # hyperparameters() names the bad value
        return isinstance(nfe, int) and not isinstance(nfe, bool) and 1 <= nfe <= t_count - 1 - int(afs)

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        return {"solver": self.student_solver, "max_order": 4, "afs": False, "num_steps": nfe + 1,
                "grid_steps": self.grid_steps, "schedule": "polynomial", "rho": 7.0,
                "sigma_min": suite.sigma_min, "sigma_max": suite.sigma_max,
                "teacher_solver": "ipndm", "teacher_max_order": 4, "num_warmup": 256, "warmup_batch": 256,
                "warmup_seed": 0, "metric": "dev", "coeff": 1.15, "search_guidance": 1.0}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        name = self.name
        if hp["num_steps"] != nfe + 1:
            raise BadInput(f"{name}: num_steps follows from the NFE (N = NFE + 1); do not set it")
        if hp["solver"] not in STUDENT_SOLVERS:
            raise BadInput(f"{name}: solver must be one of {', '.join(STUDENT_SOLVERS)}, got {hp['solver']!r}")
        if hp["teacher_solver"] not in TEACHER_SOLVERS:
            raise BadInput(f"{name}: teacher_solver must be one of {', '.join(TEACHER_SOLVERS)}, "
                           f"got {hp['teacher_solver']!r}")
        if hp["metric"] not in COST_METRICS:
            raise BadInput(f"{name}: metric must be one of {', '.join(COST_METRICS)}, got {hp['metric']!r}")
        if not isinstance(hp["afs"], bool):
            raise BadInput(f"{name}: afs must be true or false, got {hp['afs']!r}")
        for key in ("grid_steps", "num_warmup", "warmup_batch", "max_order", "teacher_max_order"):
            if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] < 1:
                raise BadInput(f"{name}: {key} must be an integer >= 1, got {hp[key]!r}")
        if not isinstance(hp["warmup_seed"], int) or isinstance(hp["warmup_seed"], bool) or hp["warmup_seed"] < 0:
            raise BadInput(f"{name}: warmup_seed must be an integer >= 0, got {hp['warmup_seed']!r}")
        for key in ("max_order", "teacher_max_order"):
            if hp[key] > 4:
                raise BadInput(f"{name}: {key} must be 1-4, got {hp[key]}")
        for key in ("coeff", "rho", "sigma_min", "sigma_max", "search_guidance"):
            if isinstance(hp[key], bool) or not isinstance(hp[key], (int, float)) or not math.isfinite(hp[key]):
                raise BadInput(f"{name}: {key} must be a finite number, got {hp[key]!r}")
        if hp["coeff"] <= 0:
            raise BadInput(f"{name}: coeff must be > 0, got {hp['coeff']}")
        if not 0 < hp["sigma_min"] < hp["sigma_max"]:
            raise BadInput(f"{name}: need 0 < sigma_min < sigma_max, got {hp['sigma_min']}, {hp['sigma_max']}")
        if hp["search_guidance"] < 0:
            raise BadInput(f"{name}: search_guidance must be >= 0, got {hp['search_guidance']}")
        if hp["search_guidance"] != 1.0 and not suite.conditional:
            raise BadInput(f"{name}: search_guidance needs a conditional suite; {suite.name!r} is unconditional")
        if hp["grid_steps"] < nfe + 1 + int(hp["afs"]):
            raise BadInput(f"{name}: NFE {nfe} needs a grid of at least {nfe + 1 + int(hp['afs'])} levels"
                           f"{' (AFS inserts one)' if hp['afs'] else ''}; grid_steps is {hp['grid_steps']}")
        if hp["schedule"] == "custom":
            raise BadInput(f"{name}: the fine grid needs a schedule family, not 'custom'")
        try:
            schedule_for(hp["schedule"], 2, hp["sigma_min"], hp["sigma_max"], hp["rho"], suite.discrete_vp)
        except ValueError as exc:
            raise BadInput(f"{name}: fine grid: {exc}") from None
        return hp

    def display_name(self, hp: dict) -> str:
        base = "DDIM + GITS" if hp["solver"] == "euler" else "iPNDM + GITS"
        return f"{base} + AFS" if hp["afs"] else base

    # ------------------------------------------------------------------ search

    def grid(self, suite, hp: dict) -> torch.Tensor:
        """The fine grid: ``grid_steps`` levels of the schedule family (float64)."""
        return schedule_for(hp["schedule"], hp["grid_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                            suite.discrete_vp)

    def search(self, suite, teacher: Denoiser, nfe: int, device="cpu", progress=None, devices: int = 1,
               hp: dict | None = None, warmup_dir: Path | None = None) -> SearchResult:
        """Run the GITS search for ``nfe`` (warm-up, cost matrix, DP, AFS insertion) and time it.

        Without ``warmup_dir`` it writes nothing. With it, the warm-up (cost matrix, its cost, the
        teacher's final states of the last warm-up batch) is read from there when present, else
        computed and written there, and the result reports the warm-up's recorded cost as part of
        its own (every NFE's search pays the whole warm-up)."""
        hp = self.hyperparameters(suite, nfe) if hp is None else hp
        device = torch.device(device)
        watch = Stopwatch()
        grid64 = self.grid(suite, hp)
        t_count, num_steps = hp["grid_steps"], hp["num_steps"]
        one = _slice_cond(suite.training_conditioning(1, torch.Generator().manual_seed(0)), 0, 1, device)
        flops_per_sample = per_sample_flops(teacher, suite.latent_shape, one, False, device)
        counted = CountingDenoiser(teacher)
        guided = counted if hp["search_guidance"] == 1.0 else \
            ClassifierFreeGuidance(counted, hp["search_guidance"], suite.unconditional)
        forced = not hp["afs"] and num_steps in (2, t_count)
        cost, dp_value, warm, reused = None, None, None, False
        if forced:  # a single feasible path: nothing to search
            dp_indices = list(range(t_count)) if num_steps == t_count else [0, t_count - 1]
        else:
            warm = read_warmup(warmup_dir) if warmup_dir is not None else None
            reused = warm is not None
            if warm is None:
                warm = self._warmup(suite, guided, counted, hp, grid64, device, progress)
                if warmup_dir is not None:
                    write_warmup(warmup_dir, warm, hp)
            cost = warm["cost"]
            dp_indices, dp_value = dp_schedule(cost, num_steps, hp["coeff"], min_first=2 if hp["afs"] else 1)
        indices, afs_index, distances = list(dp_indices), None, {}
        if hp["afs"]:
            z, c = self._last_batch(suite, hp, device)
            afs_index, distances = self._select_afs_step(guided, hp, grid64, dp_indices,
                                                         (z, c, warm["last_final"].to(device)))
            indices = [0, afs_index, *dp_indices[1:]]
        evaluations = counted.samples + (warm["teacher_evaluations"] if reused else 0)
        seconds = watch.seconds + (warm["wall_seconds"] if reused else 0.0)
        accounting = Accounting(seconds, device_name(device), devices, float(evaluations * flops_per_sample))
        parts = None if warm is None else {
            "warmup": {"wall_seconds": warm["wall_seconds"], "teacher_evaluations": warm["teacher_evaluations"],
                       "device": warm["device"], "reused": reused,
                       **({"folder": str(warmup_dir)} if warmup_dir is not None else {})},
            "schedule": {"wall_seconds": watch.seconds - (0.0 if reused else warm["wall_seconds"]),
                         "teacher_evaluations": evaluations - warm["teacher_evaluations"]}}
        return SearchResult(grid=[float(s) for s in grid64], indices=indices, dp_indices=dp_indices,
                            dp_value=dp_value, afs_index=afs_index, afs_distances=distances,
                            cost=None if cost is None else cost.tolist(), teacher_evaluations=evaluations,
                            trajectories=0 if forced else hp["num_warmup"], accounting=accounting,
                            teacher_forward_flops_per_sample=flops_per_sample, parts=parts)

    @staticmethod
    def _warmup_inputs(suite, hp: dict) -> tuple[torch.Tensor, dict]:
        """All warm-up latents [num_warmup, ...] and their conditioning, from a CPU generator seeded
        with ``warmup_seed`` (latents first), whatever the batch split."""
        gen = torch.Generator().manual_seed(hp["warmup_seed"])
        latents = torch.randn((hp["num_warmup"], *suite.latent_shape), generator=gen)
        return latents, suite.training_conditioning(hp["num_warmup"], gen)

    @staticmethod
    def _batches(hp: dict) -> list[tuple[int, int]]:
        total, batch = hp["num_warmup"], hp["warmup_batch"]
        return [(lo, min(lo + batch, total)) for lo in range(0, total, batch)]

    def _last_batch(self, suite, hp: dict, device) -> tuple[torch.Tensor, dict]:
        latents, cond = self._warmup_inputs(suite, hp)
        lo, hi = self._batches(hp)[-1]
        return latents[lo:hi].to(device), _slice_cond(cond, lo, hi, device)

    def _warmup(self, suite, teacher, counted, hp, grid64, device, progress) -> dict:
        """The cost matrix (float64 [T, T]) averaged over ``num_warmup`` teacher trajectories, the
        teacher's final states on the last batch (for the AFS selection), and what it cost."""
        watch, before = Stopwatch(), counted.samples
        latents, cond = self._warmup_inputs(suite, hp)
        options = {"max_order": hp["teacher_max_order"]} if hp["teacher_solver"] in ("ipndm", "ipndm_v") else {}
        if hp["teacher_solver"] == "dpmpp":
            options["max_order"] = min(hp["teacher_max_order"], 3)
        sums = torch.zeros(len(grid64), len(grid64), dtype=torch.float64)
        batches = self._batches(hp)
        last_final = None
        with (progress or null_progress)(f"GITS warm-up ({hp['num_warmup']} teacher trajectories)",
                                         len(batches)) as advance:
            for lo, hi in batches:
                z, c = latents[lo:hi].to(device), _slice_cond(cond, lo, hi, device)
                states, directions = teacher_run(teacher, z, grid64, hp["teacher_solver"], options, hp["afs"], c)
                sums += cost_sums(states, directions, grid64, hp["metric"])
                last_final = states[-1].cpu()
                del states, directions
                advance()
        return {"cost": sums / hp["num_warmup"], "last_final": last_final, "wall_seconds": watch.seconds,
                "teacher_evaluations": counted.samples - before, "device": device_name(device)}

    def _select_afs_step(self, teacher, hp, grid64, dp_indices, last) -> tuple[int, dict]:
        """AFS: the index k in [1, i_1 - 1] inserted after 0 whose student sample (with its analytic
        first step) is closest, in per-sample L2 averaged over the batch, to the teacher's final
        state on the last warm-up batch (first k on ties)."""
        z, c, target = last
        best, best_distance, distances = None, math.inf, {}
        for k in range(1, dp_indices[1]):
            sigmas = grid64[[0, k, *dp_indices[1:]]]
            with torch.no_grad():
                out = solvers.sample(solvers.SOLVERS[hp["solver"]], teacher, z, sigmas, afs=True, cond=c,
                                     **self._solver_options(hp))
            distance = float((out - target).flatten(1).norm(dim=1).double().mean())
            distances[str(k)] = distance
            if distance < best_distance:
                best, best_distance = k, distance
        return best, distances

    @staticmethod
    def _solver_options(hp: dict) -> dict:
        return {"max_order": hp["max_order"]} if hp["solver"] == "ipndm" else {}

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        path = Path(ctx.workdir) / FIT_FILE
        fit = read_search(ctx.workdir)
        if fit is None:
            shared = warmup_folder(Path(ctx.workdir).parent, ctx.suite.name, ctx.teacher_id, hp)
            result = self.search(ctx.suite, ctx.teacher, ctx.nfe, ctx.device, ctx.progress, ctx.devices, hp, shared)
            fit = {"method": self.name, "nfe": ctx.nfe, "hyperparameters": hp, **result.to_json()}
            Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, (json.dumps(fit, indent=2) + "\n").encode())
        grid = self.grid(ctx.suite, hp)
        indices = fit["schedule_indices"]
        if len(indices) != ctx.nfe + 1 + int(hp["afs"]) or [float(grid[i]) for i in indices] != fit["schedule_sigmas"]:
            raise BadInput(f"{path} does not hold a GITS schedule for these settings; delete it to search again")
        sample = solvers.sampler(solvers.SOLVERS[hp["solver"]], grid[indices], afs=hp["afs"],
                                 **self._solver_options(hp))
        info = {k: fit[k] for k in INFO_KEYS if k in fit}
        return Fitted(denoiser=ctx.teacher, sample=sample, nfe=ctx.nfe, fine_tuning=fit["fine_tuning"], info=info)


INFO_KEYS = ("schedule_indices", "schedule_sigmas", "dp_indices", "dp_value", "afs_index", "grid_steps",
             "teacher_evaluations", "teacher_trajectories", "includes_teacher_trajectories", "device", "devices",
             "flops", "search_parts")
# what the warm-up depends on (shared by every NFE, student solver and coefficient)
WARMUP_KEYS = ("grid_steps", "schedule", "rho", "sigma_min", "sigma_max", "teacher_solver", "teacher_max_order",
               "num_warmup", "warmup_batch", "warmup_seed", "metric", "search_guidance", "afs")


def warmup_folder(parent: Path, suite_name: str, teacher_id: str, hp: dict) -> Path:
    """The sibling folder shared by every GITS fit whose warm-up is the same: named by a hash of the
    suite, the teacher's content id and the warm-up's hyperparameters (``WARMUP_KEYS``)."""
    key = json.dumps({"suite": suite_name, "teacher": teacher_id, **{k: hp[k] for k in WARMUP_KEYS}},
                     sort_keys=True, default=str)
    return Path(parent) / f"gits-warmup-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def write_warmup(folder: Path, warm: dict, hp: dict) -> None:
    """``warmup.pt`` (cost matrix, the last batch's teacher final states), then ``warmup.json`` (its
    cost and settings; written last, so a folder with it is complete). Both atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"cost": warm["cost"], "last_final": warm["last_final"]}, buf)
    atomic_write_bytes(folder / "warmup.pt", buf.getvalue())
    meta = {"wall_seconds": warm["wall_seconds"], "teacher_evaluations": warm["teacher_evaluations"],
            "device": warm["device"], "hyperparameters": {k: hp[k] for k in WARMUP_KEYS}}
    atomic_write_bytes(folder / "warmup.json", (json.dumps(meta, indent=2) + "\n").encode())


def read_warmup(folder: Path) -> dict | None:
    """A complete warm-up in ``folder``, or None."""
    folder = Path(folder)
    if not (folder / "warmup.json").is_file() or not (folder / "warmup.pt").is_file():
        return None
    try:
        meta = json.loads((folder / "warmup.json").read_text())
        tensors = torch.load(folder / "warmup.pt", map_location="cpu", weights_only=True)  # no code execution
        return {**meta, "cost": tensors["cost"], "last_final": tensors["last_final"]}
    except Exception as exc:
        raise BadInput(f"corrupt GITS warm-up in {folder} ({exc}); delete the folder to search again") from None


def read_search(workdir: Path) -> dict | None:
    """A finished search's ``fit.json`` in ``workdir``, or None (absent: search; corrupt: bad input)."""
    path = Path(workdir) / FIT_FILE
    if not path.is_file():
        return None
    try:
        fit = json.loads(path.read_text())
    except ValueError as exc:
        raise BadInput(f"corrupt {path} ({exc}); delete it to search again") from None
    if not isinstance(fit, dict) or "schedule_indices" not in fit or "fine_tuning" not in fit:
        raise BadInput(f"{path} is not a finished GITS search; delete it to search again")
    return fit


register_method(GITSMethod(
    name="gits", display="iPNDM + GITS",
    description="GITS: iPNDM-4 on a time schedule searched by dynamic programming on a 61-level grid from 256 "
                "teacher trajectories"))
register_method(GITSMethod(
    name="gits-ddim", display="DDIM + GITS", student_solver="euler",
    description="GITS with an Euler (= DDIM) student: the same search, shared with `gits`"))
