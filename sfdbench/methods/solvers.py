"""Training-free solver baselines: the teacher sampled by a fixed ODE solver on a fixed schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sfdbench.diffusion import solvers
from sfdbench.diffusion.schedules import schedule_for
from sfdbench.errors import BadInput
from sfdbench.methods import register_method
from sfdbench.methods.base import FitContext, Fitted, Method


@dataclass
class SolverMethod(Method):
    """``solver`` on ``schedule`` from the suite's sigma_max to its baseline sigma_min.

    NFE per step is 1 (``evals_per_step=1``) or 2 (Heun-type); AFS saves one evaluation."""

    solver: str = "euler"
    schedule: str = "polynomial"
    rho: float = 7.0
    evals_per_step: int = 1
    afs: bool = False
    options: dict = field(default_factory=dict)

    def steps_for_nfe(self, nfe: int, afs: bool | None = None) -> int | None:
        """Number of timestamps N with NFE = evals_per_step (N - 1) - afs, or None."""
        afs = self.afs if afs is None else afs
        intervals, rem = divmod(nfe + int(afs), self.evals_per_step)
        return intervals + 1 if rem == 0 and intervals >= 1 else None

    def afs_in(self, suite) -> bool:
        """AFS as the suite / ``--set METHOD.afs=true`` says, else the method's default."""
        afs = suite.method_options.get(self.name, {}).get("afs", self.afs) if suite is not None else self.afs
        if not isinstance(afs, bool):
            raise BadInput(f"{self.name}: afs must be true or false, got {afs!r}")
        return afs

    def supports(self, nfe: int) -> bool:
        return isinstance(nfe, int) and nfe >= 1 and self.steps_for_nfe(nfe) is not None

    def supports_in(self, suite, nfe: int) -> bool:
        return isinstance(nfe, int) and nfe >= 1 and self.steps_for_nfe(nfe, self.afs_in(suite)) is not None

    def nfe_rule(self) -> str:
        if self.evals_per_step == 1:
            return "any NFE >= 1"
        return (f"NFE = 2(N-1){' - 1' if self.afs else ''}, i.e. {'odd' if self.afs else 'even'} NFE >= 2 "
                f"({'even' if self.afs else 'odd'} with --set {self.name}.afs={'false' if self.afs else 'true'})")

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        afs = self.afs_in(suite)
        return {"solver": self.solver, "schedule": self.schedule, "rho": self.rho, "afs": afs,
                "num_steps": self.steps_for_nfe(nfe, afs), "sigma_min": suite.sigma_min,
                "sigma_max": suite.sigma_max, **self.options}

    def hyperparameters(self, suite, nfe: int) -> dict:
        hp = super().hyperparameters(suite, nfe)
        if hp["solver"] != self.solver or hp["num_steps"] != self.steps_for_nfe(nfe, hp["afs"]):
            raise BadInput(f"{self.name}: solver and num_steps are fixed by the method, the NFE and afs; "
                           "register a new method to change the solver")
        return hp

    def display_name(self, hp: dict) -> str:
        """``+ AFS`` when AFS is switched on for a solver that runs without it by default (the
        paper's naming of AFS variants of solver baselines)."""
        return f"{self.display} + AFS" if hp["afs"] and not self.afs else self.display

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        sigmas = schedule_for(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                              ctx.suite.discrete_vp)
        options = {k: hp[k] for k in self.options}
        sample = solvers.sampler(solvers.SOLVERS[self.solver], sigmas, afs=hp["afs"], **options)
        return Fitted(denoiser=ctx.teacher, sample=sample, nfe=ctx.nfe)


@dataclass
class EDMHeunMethod(SolverMethod):
    """EDM's own deterministic sampler (Karras et al. 2022, Algorithm 1 with t_N = 0): Heun steps
    between the N polynomial (rho = 7) noise levels sigma_max .. sigma_min, then one Euler step to
    sigma = 0, where the corrector cannot be evaluated: NFE = 2(N - 1) + 1, i.e. 35 for EDM's
    CIFAR-10 setting (N = 18) and 79 for ImageNet-64 (N = 40). This is how the teachers' published
    FIDs were sampled, so it is the suites' teacher reference row."""

    def steps_for_nfe(self, nfe: int, afs: bool | None = None) -> int | None:
        afs = self.afs if afs is None else afs
        intervals, rem = divmod(nfe - 1 + int(afs), 2)
        return intervals + 1 if rem == 0 and intervals >= 1 else None

    def nfe_rule(self) -> str:
        return "NFE = 2(N-1) + 1 (Heun to sigma_min, Euler to 0), i.e. odd NFE >= 3; EDM uses 35 and 79"

    def fit(self, ctx: FitContext) -> Fitted:
        hp = self.hyperparameters(ctx.suite, ctx.nfe)
        sigmas = schedule_for(hp["schedule"], hp["num_steps"], hp["sigma_min"], hp["sigma_max"], hp["rho"],
                              ctx.suite.discrete_vp)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        sample = solvers.sampler(solvers.SOLVERS[self.solver], sigmas, afs=hp["afs"])
        return Fitted(denoiser=ctx.teacher, sample=sample, nfe=ctx.nfe)


register_method(EDMHeunMethod(
    name="heun-edm", display="Heun (EDM sampler)", solver="heun", schedule="polynomial", rho=7.0,
    evals_per_step=2, options={"final_step": "euler to sigma=0"},
    description="EDM's deterministic sampler: Heun on rho=7 levels, then an Euler step to 0 (the teachers' "
                "published FID setting)"))
register_method(SolverMethod(
    name="ddim", display="DDIM", solver="euler", schedule="polynomial", rho=7.0,
    description="Euler = deterministic DDIM; polynomial schedule rho=7"))
register_method(SolverMethod(
    name="heun", display="Heun", solver="heun", schedule="polynomial", rho=7.0, evals_per_step=2,
    description="EDM's 2nd-order Heun; polynomial schedule rho=7"))
register_method(SolverMethod(
    name="dpmpp2m", display="DPM-Solver++(2M)", solver="dpmpp", schedule="logsnr", rho=1.0,
    options={"max_order": 2, "predict_x0": True, "lower_order_final": True, "thresholding": True},
    description="multistep DPM-Solver++ order 2, data prediction; logSNR-uniform schedule"))
register_method(SolverMethod(
    name="dpmpp3m", display="DPM-Solver++(3M)", solver="dpmpp", schedule="logsnr", rho=1.0,
    options={"max_order": 3, "predict_x0": True, "lower_order_final": True, "thresholding": True},
    description="multistep DPM-Solver++ order 3, data prediction; logSNR-uniform schedule"))
register_method(SolverMethod(
    name="dpm2", display="DPM-Solver-2", solver="dpm2", schedule="polynomial", rho=7.0, evals_per_step=2,
    options={"r": 0.5},
    description="single-step DPM-Solver-2 (log-sigma midpoint); polynomial schedule rho=7"))
register_method(SolverMethod(
    name="ipndm", display="iPNDM", solver="ipndm", schedule="polynomial", rho=7.0,
    options={"max_order": 4},
    description="iPNDM, fixed Adams-Bashforth weights, order 4; polynomial schedule rho=7"))
register_method(SolverMethod(
    name="ipndm_v", display="iPNDM_v", solver="ipndm_v", schedule="polynomial", rho=7.0,
    options={"max_order": 4, "exact": False},
    description="variable-step iPNDM, order 4, the reference's weights; polynomial schedule rho=7"))
register_method(SolverMethod(
    name="deis", display="DEIS-tAB3", solver="deis", schedule="time_uniform", rho=2.0,
    options={"max_order": 3, "interpolation": "vp_time", "quadrature": "gauss"},
    description="DEIS tAB order 3 (the README table's label; its launch file passes max_order 4); "
                "time-uniform schedule rho=2"))
register_method(SolverMethod(
    name="unipc", display="UniPC(3M, bh2)", solver="unipc", schedule="logsnr", rho=1.0,
    options={"max_order": 3, "variant": "bh2", "predict_x0": True, "lower_order_final": True, "thresholding": True},
    description="multistep UniPC order 3, bh2, data prediction, corrector-free final step; logSNR-uniform schedule"))
