"""SFD's accumulation over rounds (``SFDStepConfig.micro_batch``, the latent suites' 128 trajectories per iteration
in rounds): one iteration in rounds of 3 + 3 + 2 trajectories gives the same losses and the same updated weights
as the whole batch of 8 at once, with per-sample conditioning split and a scalar step condition shared."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.diffusion.schedules import polynomial
from sfdbench.errors import BadInput
from sfdbench.methods.sfd import SFDStepConfig, check_training_hyperparameters, sfd_iteration


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.noise = nn.Linear(1, 2)
        self.label = nn.Linear(3, 2)

    def forward(self, x, c_noise, class_labels=None, step_condition=None):
        h = self.conv(torch.tanh(x)) + self.noise(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        if class_labels is not None:
            h = h + self.label(class_labels)[:, :, None, None]
        if step_condition is not None:
            h = h * (1 + 0.01 * float(step_condition))
        return h


def run(micro_batch, model, latents, cond):
    model = copy.deepcopy(model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = SFDStepConfig(m=2, micro_batch=micro_batch)
    sigmas = polynomial(4, 0.01, 80.0).float()
    out = sfd_iteration(model, teacher, optimizer, latents, sigmas, cfg, student_cond=cond, teacher_cond=cond)
    return out, model


def test_rounds_equal_the_whole_batch():
    torch.manual_seed(0)
    model = EDMPrecond(TinyNet())
    latents = torch.randn(8, 2, 4, 4)
    labels = torch.nn.functional.one_hot(torch.randint(3, (8,)), 3).float()
    cond = {"class_labels": labels, "step_condition": 4}
    whole, a = run(None, model, latents, cond)
    rounds, b = run(3, model, latents, cond)
    assert rounds["rounds"] == 3 and "rounds" not in whole
    assert rounds["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    moved = max((p - q).abs().max() for p, q in zip(a.parameters(), model.parameters()))
    assert moved > 1e-3  # the iteration did update the weights (so equal weights mean equal updates)
    # the rounds see their own labels: shuffling the labels across samples changes the result
    shuffled, _ = run(3, model, latents, {**cond, "class_labels": labels.roll(1, 0)})
    assert shuffled["losses"][1:] != pytest.approx(whole["losses"][1:], rel=1e-6)


def test_micro_batch_must_be_a_positive_integer():
    from sfdbench.methods import get_method
    from sfdbench.suites import get_suite

    hp = get_method("sfd").hyperparameters(get_suite("ms_coco"), 2)
    assert hp["micro_batch"] == 16 and hp["batch"] == 128
    assert "micro_batch" not in get_method("sfd").hyperparameters(get_suite("cifar10"), 2)  # hashes unchanged
    assert "micro_batch" not in get_method("sfd").hyperparameters(get_suite("lsun_bedroom"), 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(BadInput, match="micro_batch"):
            check_training_hyperparameters("sfd", {**hp, "micro_batch": bad})
