"""A closed-form test bed for the global convergence order of every solver.

Data: a Gaussian mixture p(x0) = sum_k w_k N(mu_k, v_k I) in d dimensions. Its exact denoiser is
the posterior-weighted mixture of the component Wiener denoisers,
    D(x, sigma) = sum_k r_k(x, sigma) (mu_k + v_k / (v_k + sigma^2) (x - mu_k)),
    r_k proportional to w_k N(x; mu_k, (v_k + sigma^2) I),
smooth and nonlinear in x. The exact probability-flow solution from sigma_max to sigma_min is
computed by scipy's ``solve_ivp`` (DOP853, rtol = atol = 1e-13, float64) in the variable
u = ln sigma, where the ODE reads dx/du = x - D(x, e^u); DOP853 and Radau agree to ~1e-13.

Every solver runs from the same x(sigma_max) to sigma_min on its schedule; the global error is
max |x_N - x_exact| over samples and coordinates, and the fitted order is the least-squares slope
of -log(error) against log(steps) (steps = N - 1 intervals).

Why per-solver step ranges: at 4-64 steps most solvers are pre-asymptotic here (sigma spans
80 -> 0.002, and the warm-up / lower-order final steps of multistep methods contribute errors
of a lower order with small constants), so a 4-64 fit mixes regimes; the table shows it next to
the fit over a range where the local slope has settled (errors far above the 1e-13 accuracy of
the reference). The ranges were chosen from the local slopes so that every asserted fit (except
exact iPNDM_v's, below) holds within 0.3 for latent seeds 1-5, not just for the default one
(seed 1, which has the hardest sample: one that changes component late, making Euler
pre-asymptotic up to ~100 steps). The theoretical orders and the reasons behind the non-obvious
ones:

* All multistep methods start with one Euler (first-order) step and some end with lower-order
  steps, so strictly asymptotically they are all at most second order; those steps' error
  constants are tiny here (the flow is nearly straight at sigma_max, and the data-prediction
  model value barely moves near sigma_min), so the design order shows over wide step ranges.
  Where the low-order steps do surface inside a practical range, the case says so.
* DPM-Solver++(3M): 2, not 3 -- the reference's 3rd-order multistep update has a D2 coefficient
  half the Taylor-consistent one (tests/test_solvers_closed_form.py).
* iPNDM: 2, not 4. Fixed equal-step Adams-Bashforth weights on a smooth unequal grid
  t = phi(u): the local error is k^2 phi'' f sum_j c_j (j + 1/2) + O(k^3) and
  sum_j c_j (j + 1/2) = 0 for every AB order, so the O(h^2) local term cancels and the method is
  globally second order -- not first (that needs step ratios that do not tend to 1, see the
  local-error tests), and not higher.
* iPNDM_v with the reference's weights, order 4: 2 on the polynomial grid (the weights do not
  sum to 1 on unequal steps, off by O(h^2) on a smooth grid) and 3 on the geometric logsnr grid
  (they sum to 1 there, but the 3rd-difference weight is 11/24 instead of 9/24); see
  ``solvers.ipndm_v_coefficients``. Order 3 is fine (3).
* iPNDM_v with exact weights (``exact=True``), order 4: 4, in a window only -- below ~100 steps
  it is pre-asymptotic and beyond ~700 the Euler warm-up step shows; over 96-768 steps the fit is
  3.6-4.0 depending on the samples (latent seeds 1-7; 4.0 on the default one). The update's own
  order (local error O(h^5)) is tested directly in tests/test_convergence.py.
* DEIS-tAB3: 3 over 32-256 steps; on the time_uniform rho = 2 schedule its Euler warm-up step
  surfaces beyond ~500 steps (local slope 2.3-2.6 at 1024 -> 2048 for most seeds).
* UniPC-p: p + 1 (the corrector UniC raises the order by one). The preset (3M, bh2, lower-order
  final) is reported, not asserted: its last step is a first-order predictor without corrector
  and its first a second-order one; it fits 3.7-4.3 over 64-1024 steps depending on the samples
  and falls towards 3 beyond ~1000 steps. Without lower-order final steps it gives 4.

Run ``python -m sfdbench.diffusion.convergence`` for the table (about ten seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from sfdbench.diffusion import schedules, solvers

DTYPE = torch.float64


@dataclass
class GaussianMixture:
    """p(x0) = sum_k w_k N(mu_k, v_k I) on R^d; ``means`` [K, d], ``variances`` [K], ``weights`` [K]."""

    means: torch.Tensor
    variances: torch.Tensor
    weights: torch.Tensor
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        self.means = torch.as_tensor(self.means, dtype=DTYPE)
        self.variances = torch.as_tensor(self.variances, dtype=DTYPE)
        weights = torch.as_tensor(self.weights, dtype=DTYPE)
        self.log_weights = torch.log(weights / weights.sum())

    @classmethod
    def default(cls, dim: int = 4, seed: int = 0) -> GaussianMixture:
        """Three components with unit-scale random means and variances 0.2 / 0.5 / 0.3.

        (With variances 0.05 / 0.2 / 0.1 the flow near sigma_min is stiffer -- responsibilities
        switch late and sharply for samples between components -- and even Euler needs ~500
        steps before its local slope reaches 0.9; the orders are the same, only later.)"""
        means = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        return cls(means, torch.tensor([0.2, 0.5, 0.3], dtype=DTYPE), torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """r_k(x, sigma) = P(component k | x0 + sigma n = x), shape [B, K]; x is [B, d]."""
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)  # [B or 1, 1]
        var = self.variances[None, :] + sig**2  # [B, K]
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # [B, K]
        logits = self.log_weights[None, :] - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        return torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """The exact denoiser E[x0 | x] (the class is itself a ``Denoiser``)."""
        flat = x.reshape(x.shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        shrink = self.variances[None, :] / (self.variances[None, :] + sig**2)  # [B, K]
        post = self.means[None] + shrink[..., None] * (flat[:, None, :] - self.means[None])  # [B, K, d]
        return (self.responsibilities(flat, sigma)[..., None] * post).sum(1).reshape(x.shape)

    def log_density(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """log p_sigma(x) of the noised data (for checking D against Tweedie's formula)."""
        var = self.variances[None, :] + sigma**2
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        log_comp = self.log_weights[None, :] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(log_comp, dim=1)

    def exact_flow(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float, *, method: str = "DOP853",
                   rtol: float = 1e-13, atol: float = 1e-13) -> torch.Tensor:
        """The PF-ODE solution at ``sigma_end`` from ``x_start`` at ``sigma_start`` (scipy solve_ivp
        in u = ln sigma: dx/du = x - D(x, e^u))."""
        from scipy.integrate import solve_ivp

        shape = x_start.shape

        def rhs(u, y):
            x = torch.from_numpy(y).reshape(shape)
            return (x - self(x, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), x_start.reshape(-1).numpy().copy(),
                        method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


@dataclass(frozen=True)
class Case:
    """One solver configuration: ``solver`` is a key of ``solvers.SOLVERS``; ``theory`` the
    expected global order (None: reported, not asserted); ``steps`` the (lo, hi) fit range."""

    name: str
    solver: str
    options: dict = field(default_factory=dict)
    schedule: str = "polynomial"
    rho: float = 7.0
    theory: float | None = None
    steps: tuple[int, int] = (8, 64)
    note: str = ""


NO_THR = {"thresholding": False}  # the mixture's x0 estimates leave [-1, 1]; thresholding is not part of the ODE
CASES: tuple[Case, ...] = (
    Case("Euler / DDIM", "euler", {}, "polynomial", 7, 1, (128, 1024)),
    Case("Heun", "heun", {}, "polynomial", 7, 2, (16, 128)),
    Case("DPM-Solver-2", "dpm2", {}, "polynomial", 7, 2, (16, 128)),
    Case("DPM-Solver++(1M)", "dpmpp", {"max_order": 1, **NO_THR}, "logsnr", 1, 1, (128, 1024)),
    Case("DPM-Solver++(2M)", "dpmpp", {"max_order": 2, **NO_THR}, "logsnr", 1, 2, (128, 1024)),
    Case("DPM-Solver++(3M)", "dpmpp", {"max_order": 3, **NO_THR}, "logsnr", 1, 2, (256, 2048),
         "reference D2 coefficient: 2, not 3"),
    Case("iPNDM (4)", "ipndm", {"max_order": 4}, "polynomial", 7, 2, (128, 1024),
         "fixed AB weights on unequal steps: 2, not 4"),
    Case("iPNDM (4)", "ipndm", {"max_order": 4}, "logsnr", 1, 2, (128, 1024),
         "fixed AB weights on unequal steps: 2, not 4"),
    Case("iPNDM_v (4)", "ipndm_v", {"max_order": 4}, "polynomial", 7, 2, (256, 2048),
         "reference weights do not sum to 1 on unequal steps"),
    Case("iPNDM_v (4)", "ipndm_v", {"max_order": 4}, "logsnr", 1, 3, (256, 2048),
         "reference weights: 11/24 instead of 9/24 on the 3rd difference"),
    Case("iPNDM_v (3)", "ipndm_v", {"max_order": 3}, "polynomial", 7, 3, (128, 1024)),
    Case("iPNDM_v (4, exact)", "ipndm_v", {"max_order": 4, "exact": True}, "polynomial", 7, 4, (96, 768),
         "exact variable-step weights; narrow window (see module docstring)"),
    Case("DEIS-tAB3", "deis", {"max_order": 3}, "time_uniform", 2, 3, (32, 256),
         "Euler warm-up (O(h^2)) takes over beyond ~500 steps"),
    Case("DEIS-tAB3", "deis", {"max_order": 3}, "polynomial", 7, 3, (128, 1024)),
    Case("DEIS-tAB2", "deis", {"max_order": 2}, "time_uniform", 2, 2, (32, 256)),
    Case("UniPC(3M, bh2) preset", "unipc", {"max_order": 3, **NO_THR}, "logsnr", 1, None, (64, 1024),
         "lower-order final steps: ~4 here, 3 and below past ~1000 steps; not asserted"),
    Case("UniPC(3M, bh2), no LOF", "unipc", {"max_order": 3, "lower_order_final": False, **NO_THR}, "logsnr", 1, 4,
         (256, 2048), "UniC raises p = 3 to 4"),
    Case("UniPC(2M, bh2)", "unipc", {"max_order": 2, **NO_THR}, "logsnr", 1, 3, (256, 2048)),
    Case("UniPC(2M, bh1)", "unipc", {"max_order": 2, "variant": "bh1", **NO_THR}, "logsnr", 1, 3, (128, 1024)),
    Case("UniPC(2M, bh2, eps)", "unipc", {"max_order": 2, "predict_x0": False}, "logsnr", 1, 3, (128, 1024)),
    Case("UniPC(1, bh2)", "unipc", {"max_order": 1, **NO_THR}, "logsnr", 1, 2, (64, 512), "UniC raises Euler to 2"),
)


def step_counts(lo: int, hi: int, points: int = 5) -> list[int]:
    """``points`` geometrically spaced step counts from lo to hi (rounded, distinct)."""
    return sorted({int(round(v)) for v in np.geomspace(lo, hi, points)})


def fit_order(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    return -float(np.polyfit(np.log(np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)[0])


class TestBed:
    """A mixture, start points x(sigma_max) = z sigma_max and their exact flow to sigma_min."""

    __test__ = False  # not a pytest class

    def __init__(self, mixture: GaussianMixture | None = None, samples: int = 8, seed: int = 1):
        self.mixture = mixture or GaussianMixture.default()
        self.latents = torch.randn(samples, self.mixture.dim, generator=torch.Generator().manual_seed(seed),
                                   dtype=DTYPE)

    @cached_property
    def exact(self) -> torch.Tensor:
        m = self.mixture
        return m.exact_flow(self.latents * m.sigma_max, m.sigma_max, m.sigma_min)

    def sigmas(self, case: Case, steps: int) -> torch.Tensor:
        m = self.mixture
        return schedules.get_schedule(case.schedule, steps + 1, m.sigma_min, m.sigma_max, case.rho)

    def global_error(self, case: Case, steps: int) -> float:
        x = solvers.sample(solvers.SOLVERS[case.solver], self.mixture, self.latents, self.sigmas(case, steps),
                           **case.options)
        return (x - self.exact).abs().max().item()

    def errors(self, case: Case, steps: list[int]) -> list[float]:
        return [self.global_error(case, n) for n in steps]


@dataclass
class Result:
    case: Case
    steps: list[int]
    errors: list[float]
    fitted: float
    fitted_4_64: float


def run(cases=CASES, bed: TestBed | None = None) -> list[Result]:
    bed = bed or TestBed()
    short = step_counts(4, 64, 5)
    out = []
    for case in cases:
        steps = step_counts(*case.steps)
        errors = bed.errors(case, steps)
        out.append(Result(case, steps, errors, fit_order(steps, errors), fit_order(short, bed.errors(case, short))))
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    bed = TestBed()
    m = bed.mixture
    table = Table(title=f"Global convergence on a {m.means.shape[0]}-component Gaussian mixture in d = {m.dim} "
                        f"(sigma {m.sigma_max} -> {m.sigma_min}, {bed.latents.shape[0]} samples, float64)")
    for col in ("solver", "schedule", "theory", "fitted", "fit range", "fitted 4-64", "error (lo -> hi)", "note"):
        table.add_column(col, justify="left" if col in ("solver", "schedule", "note") else "right")
    for r in run(bed=bed):
        c = r.case
        sched = c.schedule if c.schedule == "logsnr" else f"{c.schedule} rho={c.rho:g}"
        theory = "-" if c.theory is None else f"{c.theory:g}"
        table.add_row(c.name, sched, theory, f"{r.fitted:.2f}", f"{r.steps[0]}-{r.steps[-1]}", f"{r.fitted_4_64:.2f}",
                      f"{r.errors[0]:.1e} -> {r.errors[-1]:.1e}", c.note)
    Console().print(table)


if __name__ == "__main__":
    main()
