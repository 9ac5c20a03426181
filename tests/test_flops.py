"""Fine-tuning FLOPs: torch's flop counter per sample x the counted evaluations."""

from __future__ import annotations

import json

import torch
from torch import nn

from sfdbench.methods import FitContext, get_method
from sfdbench.methods.training import per_sample_flops
from sfdbench.suites import get_suite


class LinearDenoiser(nn.Module):
    """D(x, sigma) = W x (flattened): a closed-form FLOP count, 2 * in * out per forward."""

    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(n, n, bias=False)

    def forward(self, x, sigma, **cond):
        return self.lin(x.flatten(1)).reshape(x.shape)


def test_per_sample_flops_of_a_linear_map_is_closed_form():
    model = LinearDenoiser(12)
    assert per_sample_flops(model, (3, 4), {}, backward=False) == 2 * 12 * 12
    # backward to the weight only (the input needs no gradient): one more matmul of the same size
    assert per_sample_flops(model, (3, 4), {}, backward=True) == 2 * (2 * 12 * 12)
    assert model.lin.weight.grad is None  # nothing accumulated


def test_sfd_fit_records_flops_of_every_counted_evaluation(tmp_path):
    suite = get_suite("digits")
    suite.method_options = {**suite.method_options, "sfd": {**suite.method_options["sfd"], "iterations": 2,
                                                            "batch": 4, "checkpoint_every": 1}}
    teacher = suite.load_teacher()
    method = get_method("sfd")
    hp = method.hyperparameters(suite, 2)
    fitted = method.fit(FitContext(suite=suite, teacher=teacher, nfe=2, workdir=tmp_path, device=torch.device("cpu"),
                                   progress=None))
    fit = json.loads((tmp_path / "fit.json").read_text())
    per = fit["flops"]
    n = hp["num_steps"]  # N = NFE + 2 with AFS: N - 2 student evaluations per trajectory
    assert fit["student_evaluations"] == 2 * 4 * (n - 1 - int(hp["afs"]))
    assert fit["teacher_evaluations"] == 2 * 4 * (hp["M"] + 1) * (n - 1)
    expected = (fit["teacher_evaluations"] * per["teacher_forward_per_sample"]
                + fit["student_evaluations"] * per["student_forward_backward_per_sample"])
    assert fitted.fine_tuning["flops"] == expected > 0
    # forward + backward costs between 2x and 4x a forward (backward: input and weight gradients)
    assert 2 < per["student_forward_backward_per_sample"] / per["teacher_forward_per_sample"] < 4
