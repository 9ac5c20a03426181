"""Seeded latents and conditioning, batched sampling with NFE counting and guidance."""

from __future__ import annotations

import time

import torch

from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser
from sfdbench.methods.base import Fitted
from sfdbench.metrics.images import to_uint8
from sfdbench.suites.base import collate

SEED_STRIDE = 10_000_000  # samples per run seed; torch's CPU generator keeps only 32 seed bits
MAX_RUN_SEED = 2**32 // SEED_STRIDE - 1  # 428


def noise_seed(run_seed: int, index: int) -> int:
    """Sample ``index`` of a run with seed ``run_seed`` uses generator seed run_seed * 10^7 + index;
    for run seed 0 that is the sample index itself, as in the paper's protocol (seeds 0..n-1).
    (torch.Generator.manual_seed on CPU uses only the low 32 bits, hence the decimal stride.)"""
    if not 0 <= index < SEED_STRIDE or not 0 <= run_seed <= MAX_RUN_SEED:
        raise ValueError(f"need 0 <= seed <= {MAX_RUN_SEED} and fewer than {SEED_STRIDE} samples per seed")
    return run_seed * SEED_STRIDE + index


def seeded_inputs(suite, run_seed: int, start: int, count: int) -> tuple[torch.Tensor, dict]:
    """Unit-Gaussian latents and conditioning of samples start..start+count-1, one CPU generator
    per sample: its latent first, then its conditioning (``suite.conditioning``) from the same
    generator, so a sample never depends on the batch size, device count or shard."""
    latents = torch.empty((count, *suite.latent_shape))
    conds = []
    for j in range(count):
        gen = torch.Generator().manual_seed(noise_seed(run_seed, start + j))
        latents[j] = torch.randn(suite.latent_shape, generator=gen)
        conds.append(suite.conditioning(gen, start + j))
    return latents, collate(conds)


def guided(denoiser, suite, guidance: float):
    """``denoiser`` with classifier-free guidance at scale ``guidance`` (1 = unguided: unchanged)."""
    return denoiser if guidance == 1.0 else ClassifierFreeGuidance(denoiser, guidance, suite.unconditional)


@torch.no_grad()
def generate(fitted: Fitted, suite, run_seed: int, n: int, batch: int = 500, device: torch.device | str = "cpu",
             guidance: float = 1.0, advance=None) -> tuple[torch.Tensor, dict, dict]:
    """uint8 images [N, C, H, W] of seeds 0..n-1 of ``run_seed`` (decoded by the suite, converted
    batch by batch), their conditioning (batched, on the CPU) and sampling statistics.

    The NFE is counted twice, never trusted from the method: ``nfe_counted`` = network
    evaluations per sample (a counter right around the model), ``sampler_nfe`` = evaluations of
    the (guided) denoiser the sampler sees; with guidance each of those costs 2 network calls."""
    network = CountingDenoiser(fitted.denoiser)
    sampler_view = CountingDenoiser(guided(network, suite, guidance))
    chunks, conds, seconds = [], [], 0.0
    for start in range(0, n, batch):
        count = min(batch, n - start)
        latents, cond = seeded_inputs(suite, run_seed, start, count)
        on_device = {k: v.to(device) for k, v in cond.items()}
        t0 = time.perf_counter()
        final = fitted.sample(sampler_view, latents.to(device), on_device)
        images = suite.decode(final)
        seconds += time.perf_counter() - t0
        chunks.append(to_uint8(images.float().cpu()))
        conds.append(cond)
        if advance:
            advance(count)
    stats = {"nfe_counted": network.samples / n, "sampler_nfe": sampler_view.samples / n,
             "sampling_seconds": seconds, "images_per_second": n / seconds if seconds > 0 else None}
    joined = {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds and conds[0] else {}
    return torch.cat(chunks), joined, stats
