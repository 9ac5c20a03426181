"""Training loops for the digits suites' shipped networks: the EDM teacher (unconditional for
``digits``, class-conditional with label dropout for ``digits-cond``) and the feature CNN.

No progress bar is imported here (suites may not import the harness): each loop takes a
``progress(description, total)`` context-manager factory yielding ``advance(n=1, info="")``, the
shape of ``sfdbench.harness.progress.progress_bar``; the default shows nothing.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch.nn import functional as F

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.diffusion.losses import edm_loss
from sfdbench.errors import BadInput
from sfdbench.networks.digits_classifier import DigitsClassifier
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits_data import SIGMA_DATA, load_digits

TEACHER_CONFIG = dict(in_channels=1, model_channels=32, channel_mult=(1, 2, 2), blocks=1, emb_dim=128, dropout=0.1)
NUM_CLASSES = 10
# Classifier-free guidance's label dropout for the digits-cond teacher (Ho & Salimans 2022 use 0.1-0.2)
COND_LABEL_DROPOUT = 0.1

Progress = Callable[[str, int], AbstractContextManager[Callable[..., None]]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """The default ``progress``: yields an ``advance(n=1, info="")`` that does nothing."""

    def advance(n: int = 1, info: str = "") -> None:
        pass

    yield advance


def one_hot(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Integer labels [B] -> float one-hot rows [B, label_dim] (EDM's ``class_labels``)."""
    return F.one_hot(labels.long(), label_dim).float()


def drop_labels(class_labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each row zeroed ("no label") with probability
    ``p``; draws exactly one uniform per row from ``generator``."""
    keep = torch.rand(class_labels.shape[0], generator=generator, device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)[:, None]


def train_digits_teacher(iterations: int = 4500, batch: int = 128, lr: float = 2e-3, ema_decay: float = 0.999,
                         seed: int = 0, label_dim: int = 0, label_dropout: float = 0.0,
                         progress: Progress = no_progress, config: dict | None = None
                         ) -> tuple[DigitsUNet, dict]:
    """EDM training (loss of ``edm_loss``) of the digits U-Net on the train split; Adam with a
    200-step warm-up and cosine decay; returns the EMA network and a metadata dict.

    ``label_dim=0``: the unconditional ``digits`` teacher (metadata kind ``digits-teacher``); it draws
    exactly the random numbers it always did (batch indices, sigma, noise per step), so the shipped
    teacher stays reproducible bit for bit. ``label_dim=10``: the class-conditional ``digits-cond``
    teacher (kind ``digits-cond-teacher``): the sampled batch's one-hot labels, each row zeroed with
    probability ``label_dropout`` by a mask drawn from the same generator after the noise, so that one
    network is both D(x; sigma, c) and D(x; sigma) for classifier-free guidance. ``config`` replaces
    ``TEACHER_CONFIG`` (tests use a tiny one); ``label_dim`` is added to it."""
    if label_dim < 0 or not 0.0 <= label_dropout <= 1.0:
        raise BadInput(f"label_dim must be >= 0 and label_dropout in [0, 1], got {label_dim} and {label_dropout}")
    if label_dim == 0 and label_dropout:
        raise BadInput("label_dropout needs a class-conditional teacher (label_dim > 0)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits("train")
    if label_dim and int(labels.max()) >= label_dim:
        raise BadInput(f"label_dim {label_dim} is smaller than the {int(labels.max()) + 1} digit classes")
    net = DigitsUNet(**(config if config is not None else TEACHER_CONFIG), label_dim=label_dim)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    denoiser = EDMPrecond(net, sigma_data=SIGMA_DATA)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * i / iterations)).item()))
    start, running = time.perf_counter(), None
    description = "train digits-cond teacher" if label_dim else "train digits teacher"
    with progress(description, iterations) as advance:
        for it in range(iterations):
            idx = torch.randint(len(images), (batch,), generator=gen)
            cond_fn = None
            if label_dim:
                class_labels = one_hot(labels[idx], label_dim)
                cond_fn = lambda g, c=class_labels: {"class_labels": drop_labels(c, label_dropout, g)}  # noqa: E731
            loss = edm_loss(denoiser, images[idx], generator=gen, cond_fn=cond_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - min(ema_decay, (1 + it) / (10 + it)))
            running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
            advance(info=f"loss {running:.4f}")
    meta = {"kind": "digits-cond-teacher" if label_dim else "digits-teacher", "config": ema.config,
            "sigma_data": SIGMA_DATA, "label_dim": label_dim, "label_dropout": label_dropout,
            "iterations": iterations, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed,
            "final_loss_ema": running, "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}  # CPU float results differ in the last bit across thread counts
    return ema, meta


def train_digits_classifier(epochs: int = 60, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                            progress: Progress = no_progress) -> tuple[DigitsClassifier, dict]:
    """Cross-entropy training of the feature CNN on the train split, with +-1 pixel random shifts;
    reports held-out accuracy on the test split."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits("train")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    start = time.perf_counter()
    with progress("train digits feature net", steps) as advance:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                xb = _random_shift(x[idx], gen)
                loss = F.cross_entropy(net.train()(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                advance(info=f"loss {loss.item():.3f}")
    accuracy = classifier_accuracy(net, *load_digits("test"))
    meta = {"kind": "digits-features", "config": net.config, "epochs": epochs, "batch": batch, "lr": lr,
            "seed": seed, "test_accuracy": accuracy, "n_test": len(load_digits("test")[0]),
            "wall_seconds": time.perf_counter() - start, "torch": torch.__version__}
    return net.eval(), meta


@torch.no_grad()
def classifier_accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net.eval()(x).argmax(1) == y).float().mean())


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (background = -1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]
