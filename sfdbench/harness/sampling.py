"""Seeded latents and batched sampling with NFE counting."""

from __future__ import annotations

import time

import torch

from sfdbench.diffusion.denoiser import CountingDenoiser
from sfdbench.methods.base import Fitted

SEED_STRIDE = 10_000_000  # samples per run seed; torch's CPU generator keeps only 32 seed bits
MAX_RUN_SEED = 2**32 // SEED_STRIDE - 1  # 428


def noise_seed(run_seed: int, index: int) -> int:
    """Sample ``index`` of a run with seed ``run_seed`` uses generator seed run_seed * 10^7 + index;
    for run seed 0 that is the sample index itself, as in the paper's protocol (seeds 0..n-1).
    (torch.Generator.manual_seed on CPU uses only the low 32 bits, hence the decimal stride.)"""
    if not 0 <= index < SEED_STRIDE or not 0 <= run_seed <= MAX_RUN_SEED:
        raise ValueError(f"need 0 <= seed <= {MAX_RUN_SEED} and fewer than {SEED_STRIDE} samples per seed")
    return run_seed * SEED_STRIDE + index


def seeded_latents(run_seed: int, start: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Unit-Gaussian latents, one CPU generator per sample, so a sample never depends on the
    batch size, device count or shard."""
    out = torch.empty((count, *shape))
    for j in range(count):
        gen = torch.Generator().manual_seed(noise_seed(run_seed, start + j))
        out[j] = torch.randn(shape, generator=gen)
    return out


@torch.no_grad()
def generate(fitted: Fitted, run_seed: int, n: int, shape: tuple[int, ...], batch: int = 500,
             device: torch.device | str = "cpu", advance=None) -> tuple[torch.Tensor, dict]:
    """Samples in [-1, 1] for seeds 0..n-1 of ``run_seed`` plus sampling statistics, with the
    NFE counted by wrapping the method's denoiser (not trusted from the method)."""
    counter = CountingDenoiser(fitted.denoiser)
    chunks, seconds = [], 0.0
    for start in range(0, n, batch):
        count = min(batch, n - start)
        latents = seeded_latents(run_seed, start, count, shape).to(device)
        t0 = time.perf_counter()
        chunks.append(fitted.sample(counter, latents).float().cpu())
        seconds += time.perf_counter() - t0
        if advance:
            advance(count)
    nfe_counted = counter.samples / n
    return torch.cat(chunks), {"nfe_counted": nfe_counted, "sampling_seconds": seconds,
                               "images_per_second": n / seconds if seconds > 0 else None}
