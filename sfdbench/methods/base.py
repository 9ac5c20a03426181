"""The one interface every method implements, so the harness never branches on a name
(``docs/methods.md``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sfdbench.diffusion.denoiser import Denoiser
from sfdbench.errors import BadInput


@dataclass
class FitContext:
    """What a method may use to fit itself: the suite (latent shape, conditioning, student
    construction), the suite's teacher denoiser and its content id, and a private work folder.
    ``devices`` is how many devices the fit runs on (for device-hours)."""

    suite: Any  # sfdbench.suites.base.Suite
    teacher: Denoiser
    nfe: int
    workdir: Path
    device: torch.device = torch.device("cpu")
    progress: Callable | None = None  # progress_bar(description, total) context manager
    teacher_id: str = ""
    devices: int = 1
    # > 0: fine-tuning methods that support it write an intermediate checkpoint every this many iterations
    # (training.save_snapshot); it observes the fit, so it is not part of any config hash
    snapshot_every: int = 0


@dataclass
class Fitted:
    """A ready sampler. ``sample(denoiser, latents, cond)`` maps unit-Gaussian latents (and the
    suite's per-sample conditioning ``cond``) to the final latent state, calling only ``denoiser``
    (which the harness wraps to count NFE, and to guide). Methods add to ``cond``, never drop from it."""

    denoiser: Denoiser
    sample: Callable[..., torch.Tensor]
    nfe: int
    fine_tuning: dict | None = None  # accounting of the fit (None for training-free solvers)
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    """A method: a name, a display name, a group, the NFEs it supports, its hyperparameters for a
    (suite, NFE), ``fit`` which returns a ``Fitted`` sampler and, for methods that write model
    files, ``load`` which rebuilds that sampler from one (``sfdbench sample``)."""

    name: str = ""
    display: str = ""
    group: str = "solver"  # "solver" or "distillation"
    description: str = ""
    # whether the fit splits its batch over processes (torchrun; ``train_loop(data_parallel=True)``);
    # other methods are fitted by process 0 alone and every process then loads what it wrote
    data_parallel: bool = False

    def nfe_rule(self) -> str:
        raise NotImplementedError

    def supports(self, nfe: int) -> bool:
        raise NotImplementedError

    def supports_in(self, suite, nfe: int) -> bool:
        """Whether NFE ``nfe`` is possible with ``suite``'s settings of this method (``--set``
        can change which NFEs are possible, e.g. AFS on a 2-evaluation solver); default ``supports``."""
        return self.supports(nfe)

    def check_nfe(self, nfe: int, suite=None) -> None:
        if not (self.supports(nfe) if suite is None else self.supports_in(suite, nfe)):
            raise BadInput(f"method {self.name!r} does not support NFE {nfe}; it supports {self.nfe_rule()}")

    def check_suite(self, suite) -> None:
        """Bad input when the method cannot run on ``suite`` at all (default: it can)."""

    def display_name(self, hp: dict) -> str:
        """The name tables show for a run with hyperparameters ``hp``."""
        return self.display

    def default_hyperparameters(self, suite, nfe: int) -> dict:
        """Every setting that determines the result, before the suite's / user's overrides."""
        raise NotImplementedError

    def hyperparameters(self, suite, nfe: int) -> dict:
        """Defaults updated by ``suite.method_options[name]`` (the suite's settings and ``--set``);
        an override of a name the method does not have is bad input."""
        hp = self.default_hyperparameters(suite, nfe)
        overrides = suite.method_options.get(self.name, {})
        unknown = sorted(set(overrides) - set(hp))
        if unknown:
            raise BadInput(f"method {self.name!r} has no hyperparameter {unknown[0]!r}; it has {', '.join(sorted(hp))}")
        return {**hp, **overrides}

    def fit(self, ctx: FitContext) -> Fitted:
        raise NotImplementedError

    def load(self, path: Path, suite, teacher: Denoiser, device, nfe: int | None = None) -> Fitted:
        """The sampler of a model file this method wrote (``sfdbench sample``)."""
        raise BadInput(f"method {self.name!r} writes no model files")
