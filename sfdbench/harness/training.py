"""Training loops for the digits suite's shipped networks: the EDM teacher and the feature CNN."""

from __future__ import annotations

import copy
import time

import torch
from torch.nn import functional as F

from sfdbench.diffusion.denoiser import EDMPrecond
from sfdbench.diffusion.losses import edm_loss
from sfdbench.harness.progress import progress_bar
from sfdbench.networks.digits_classifier import DigitsClassifier
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.suites.digits import SIGMA_DATA, load_digits

TEACHER_CONFIG = dict(in_channels=1, model_channels=32, channel_mult=(1, 2, 2), blocks=1, emb_dim=128, dropout=0.1)


def train_digits_teacher(iterations: int = 4500, batch: int = 128, lr: float = 2e-3, ema_decay: float = 0.999,
                         seed: int = 0) -> tuple[DigitsUNet, dict]:
    """EDM training (loss of ``edm_loss``) of the digits U-Net on the train split; Adam with a
    200-step warm-up and cosine decay; returns the EMA network and a metadata dict."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, _ = load_digits("train")
    net = DigitsUNet(**TEACHER_CONFIG)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    denoiser = EDMPrecond(net, sigma_data=SIGMA_DATA)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * i / iterations)).item()))
    start, running = time.perf_counter(), None
    with progress_bar("train digits teacher", iterations) as advance:
        for it in range(iterations):
            idx = torch.randint(len(images), (batch,), generator=gen)
            loss = edm_loss(denoiser, images[idx], generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - min(ema_decay, (1 + it) / (10 + it)))
            running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
            advance(info=f"loss {running:.4f}")
    meta = {"kind": "digits-teacher", "config": ema.config, "sigma_data": SIGMA_DATA, "iterations": iterations,
            "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed, "final_loss_ema": running,
            "wall_seconds": time.perf_counter() - start, "torch": torch.__version__}
    return ema, meta


def train_digits_classifier(epochs: int = 60, batch: int = 64, lr: float = 1e-3, seed: int = 0
                            ) -> tuple[DigitsClassifier, dict]:
    """Cross-entropy training of the feature CNN on the train split, with +-1 pixel random shifts;
    reports held-out accuracy on the test split."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits("train")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    start = time.perf_counter()
    with progress_bar("train digits feature net", steps) as advance:
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
