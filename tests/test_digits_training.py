"""The digits training loops: determinism, the class-conditional teacher, label dropout, and the
random-number order of ``edm_loss``'s conditioning hook."""

from contextlib import contextmanager

import pytest
import torch

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.diffusion.losses import edm_loss
from sfdbench.errors import BadInput
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits_training import drop_labels, one_hot, train_digits_teacher

TINY = dict(in_channels=1, model_channels=8, channel_mult=(1,), blocks=1, emb_dim=16, dropout=0.1)


def tiny_train(**kwargs):
    return train_digits_teacher(iterations=3, batch=8, config=TINY, **kwargs)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("label_dim,label_dropout", [(0, 0.0), (10, 0.1)])
def test_teacher_training_is_deterministic(label_dim, label_dropout):
    net_a, meta_a = tiny_train(seed=3, label_dim=label_dim, label_dropout=label_dropout)
    net_b, meta_b = tiny_train(seed=3, label_dim=label_dim, label_dropout=label_dropout)
    assert_same_state(net_a, net_b)
    assert meta_a["final_loss_ema"] == meta_b["final_loss_ema"]
    net_c, _ = tiny_train(seed=4, label_dim=label_dim, label_dropout=label_dropout)
    assert not torch.equal(net_a.conv_out.weight, net_c.conv_out.weight)


def test_conditional_teacher_uses_class_labels():
    net, meta = tiny_train(seed=0, label_dim=10, label_dropout=0.1)
    assert meta["kind"] == "digits-cond-teacher" and meta["config"]["label_dim"] == 10
    assert meta["label_dim"] == 10 and meta["label_dropout"] == 0.1
    assert tiny_train(seed=0)[1]["kind"] == "digits-teacher"
    x = torch.randn(10, 1, 8, 8)
    c_noise = torch.full((10,), 0.1)
    labels = one_hot(torch.arange(10), 10)
    with torch.no_grad():
        cond = net(x, c_noise, class_labels=labels)
        other = net(x, c_noise, class_labels=labels.roll(1, dims=0))
        dropped = net(x, c_noise, class_labels=torch.zeros_like(labels))
        unlabelled = net(x, c_noise)
    assert not torch.allclose(cond, other)
    assert torch.equal(dropped, unlabelled)  # an all-zero row is "no label" (bias-free label map)


def test_training_reports_progress():
    calls = []

    @contextmanager
    def progress(description, total):
        calls.append((description, total))
        yield lambda n=1, info="": calls.append(n)

    tiny_train(seed=0, label_dim=10, label_dropout=0.1, progress=progress)
    assert calls == [("train digits-cond teacher", 3), 1, 1, 1]


def test_label_dropout_needs_labels_and_a_probability():
    with pytest.raises(BadInput):
        tiny_train(label_dropout=0.1)
    with pytest.raises(BadInput):
        tiny_train(label_dim=10, label_dropout=1.5)


def test_drop_labels_zeroes_rows_with_the_set_probability():
    labels = one_hot(torch.arange(100_000) % 10, 10)
    gen = torch.Generator().manual_seed(0)
    out = drop_labels(labels, 0.1, gen)
    dropped = out.sum(1) == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005  # std of the fraction ~0.001
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(drop_labels(labels[:50], 0.0, gen), labels[:50])
    assert not drop_labels(labels[:50], 1.0, gen).any()


def test_edm_loss_draws_the_conditioning_after_sigma_and_noise():
    torch.manual_seed(0)
    denoiser = EDMPrecond(DigitsUNet(**TINY, label_dim=10).eval())
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = one_hot(torch.arange(4), 10)
    seen = {}

    def cond_fn(g):
        seen["next"] = torch.rand(3, generator=g)
        return {"class_labels": labels}

    loss_hook = edm_loss(denoiser, x0, torch.Generator().manual_seed(1), cond_fn=cond_fn)
    loss_kwarg = edm_loss(denoiser, x0, torch.Generator().manual_seed(1), class_labels=labels)
    assert torch.equal(loss_hook, loss_kwarg)
    g = torch.Generator().manual_seed(1)
    torch.randn(4, 1, 1, 1, generator=g)  # sigma
    torch.randn(4, 1, 8, 8, generator=g)  # noise
    assert torch.equal(seen["next"], torch.rand(3, generator=g))
