"""Seeded latents and conditioning, batched sampling with NFE counting and guidance."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sfdbench import parallel
from sfdbench.diffusion.denoiser import ClassifierFreeGuidance, CountingDenoiser
from sfdbench.methods.base import Fitted
from sfdbench.methods.training import peak_memory
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


def _counting_views(fitted: Fitted, suite, guidance: float):
    network = CountingDenoiser(fitted.denoiser)
    return network, CountingDenoiser(guided(network, suite, guidance))


def _sample_batch(fitted: Fitted, suite, sampler_view, run_seed: int, start: int, count: int,
                  device) -> tuple[torch.Tensor, dict, float]:
    """uint8 images of samples start..start+count-1 (decoded by the suite), their conditioning (CPU)
    and the seconds spent sampling and decoding."""
    latents, cond = seeded_inputs(suite, run_seed, start, count)
    on_device = {k: v.to(device) for k, v in cond.items()}
    t0 = time.perf_counter()
    final = fitted.sample(sampler_view, latents.to(device), on_device)
    images = suite.decode(final)
    seconds = time.perf_counter() - t0
    return to_uint8(images.float().cpu()), cond, seconds


def _stats(network_calls: float, sampler_calls: float, n: int, seconds: float, device=None) -> dict:
    return {"nfe_counted": network_calls / n, "sampler_nfe": sampler_calls / n, "sampling_seconds": seconds,
            "images_per_second": n / seconds if seconds > 0 else None,
            **({"peak_memory": peak_memory(torch.device(device))} if device is not None else {})}


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(device))


@torch.no_grad()
def generate(fitted: Fitted, suite, run_seed: int, n: int, batch: int = 500, device: torch.device | str = "cpu",
             guidance: float = 1.0, advance=None, first_index: int = 0) -> tuple[torch.Tensor, dict, dict]:
    """uint8 images [N, C, H, W] of samples first_index..first_index+n-1 of ``run_seed`` (decoded by
    the suite, converted batch by batch), their conditioning (batched, on the CPU) and sampling
    statistics, all in this process (sample grids, ``sfdbench sample``; runs evaluate through
    ``generate_rows``).

    The NFE is counted twice, never trusted from the method: ``nfe_counted`` = network
    evaluations per sample (a counter right around the model), ``sampler_nfe`` = evaluations of
    the (guided) denoiser the sampler sees; with guidance each of those costs 2 network calls."""
    network, sampler_view = _counting_views(fitted, suite, guidance)
    chunks, conds, seconds = [], [], 0.0
    for start in range(0, n, batch):
        count = min(batch, n - start)
        images, cond, spent = _sample_batch(fitted, suite, sampler_view, run_seed, first_index + start, count, device)
        seconds += spent
        chunks.append(images)
        conds.append(cond)
        if advance:
            advance(count)
    joined = {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds and conds[0] else {}
    return torch.cat(chunks), joined, _stats(network.samples, sampler_view.samples, n, seconds)


@torch.no_grad()
def generate_rows(fitted: Fitted, suite, run_seed: int, n: int, batch: int = 500,
                  device: torch.device | str = "cpu", guidance: float = 1.0, advance=None, first_index: int = 0,
                  save_dir: Path | None = None) -> tuple[dict | None, dict]:
    """Streaming sampling for evaluation: each batch of samples first_index.. of ``run_seed`` is
    decoded, turned into per-sample rows by ``suite.summarize`` (e.g. feature vectors) and dropped,
    so host memory holds rows, never all images. Returns (rows concatenated in sample order, stats).

    Several processes (``torchrun``): batch j goes to process j mod K; as every sample's noise and
    conditioning depend only on (run seed, index) and batches keep their boundaries, the samples are
    those of one process, bit for bit. Rows are gathered to process 0 (other processes get None);
    NFE counts are summed and the sampling time is the slowest process's. ``save_dir``: every batch
    is also written as ``batch{j:06d}.npz`` (``images`` uint8, ``index``, conditioning) by the process
    that made it, for external tools."""
    network, sampler_view = _counting_views(fitted, suite, guidance)
    reset_peak_memory(device)
    mine, seconds = [], 0.0
    starts = list(range(0, n, batch))
    for j in range(parallel.rank(), len(starts), parallel.world()):
        start, count = starts[j], min(batch, n - starts[j])
        images, cond, spent = _sample_batch(fitted, suite, sampler_view, run_seed, first_index + start, count, device)
        seconds += spent
        if save_dir is not None:
            write_sample_shard(Path(save_dir) / f"batch{j:06d}.npz", images, cond, first_index + start)
        mine.append((j, suite.summarize(images, cond)))
        if advance:  # this round's batches, from every process (the bar counts the whole run)
            round_start = j - parallel.rank()
            advance(sum(min(batch, n - starts[i]) for i in range(round_start, min(round_start + parallel.world(),
                                                                                   len(starts)))))
    network_calls, sampler_calls = parallel.sum_over_processes([network.samples, sampler_view.samples])
    stats = _stats(network_calls, sampler_calls, n, parallel.max_over_processes(seconds), device)
    stats["peak_memory"]["batch"] = batch  # per process: one batch in flight at a time
    gathered = parallel.gather_to_main(mine)
    if gathered is None:
        return None, stats
    ordered = [rows for _, rows in sorted((item for part in gathered for item in part), key=lambda t: t[0])]
    return {k: torch.cat([rows[k] for rows in ordered]) for k in ordered[0]}, stats


def write_sample_shard(path: Path, images_u8: torch.Tensor, cond: dict, first_index: int) -> None:
    """One batch of samples as an .npz: ``images`` uint8 [B, C, H, W], ``index`` (global sample
    indices) and each conditioning tensor under its own name."""
    import io

    import numpy as np

    from sfdbench.io import atomic_write_bytes

    buf = io.BytesIO()
    arrays = {"images": images_u8.numpy(), "index": np.arange(first_index, first_index + len(images_u8)),
              **{f"cond_{k}": v.numpy() for k, v in cond.items()}}
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
