"""The one entry point from uint8 samples to every metric: ``compute_metrics``.

    metrics = compute_metrics(images_u8, reference, space)            # fid, kid, prdc
    metrics = compute_metrics(images_u8, reference, space, metrics=ALL_METRICS, prompts=captions)

Which implementation computes what (all on the same float64 features):

* ``fid``: torch-fidelity ``fid_features_to_statistics`` / ``fid_statistics_to_metric``.
* ``kid`` (mean) and ``kid_std`` (std over subsets): torch-fidelity ``kid_features_to_metric``,
  polynomial kernel (degree 3, gamma 1/D, coef 1), ``kid_subsets`` subsets of
  ``kid_subset_size = min(1000, n_generated, n_reference)`` unless given (returned as
  ``kid_subset_size``), subsets drawn from ``RandomState(seed)``.
* ``density`` and ``coverage``: ``sfdbench.metrics.knn.prdc`` (Naeem et al. 2020, k=5), exact and tiled.
* ``precision`` and ``recall``, by ``pr_definition``:

  - ``"knn"`` (default; the Naeem et al. 2020 / ``prdc`` package / SFD reference definition, zju-pi/diff-sampler
    ``sfd-main/prdc.py``; ``docs/algorithms.md#precision-and-recall``):
    the same k-NN radii as density/coverage, a point is inside a ball when ``d < radius``;
  - ``"torch-fidelity"``: torch-fidelity's ``prc_features_to_metric`` with ``prc_neighborhood=k``
    (Kynkaenniemi et al. 2019), inside when ``d <= radius``.

  Both use the k-th neighbour excluding self; they differ only where a distance ties a radius exactly
  (duplicates), where ``"knn"`` is the one that equals ``prdc.compute_prdc``.
* ``clip_score``: ``sfdbench.metrics.clip_score`` (open_clip), 100 * max(cos, 0) by default.

Metrics that cannot be computed honestly (PRDC/KID against an EDM-style reference holding only
``mu``/``sigma``) are returned as ``None`` and explained under the ``"notes"`` key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sfdbench.errors import BadInput
from sfdbench.metrics.fid import fid_from_statistics, fid_statistics
from sfdbench.metrics.images import count_bad, validate_images
from sfdbench.metrics.knn import DEFAULT_K, DEFAULT_TILE, prdc
from sfdbench.metrics.reference import ReferenceStats

IMAGE_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")
ALL_METRICS = (*IMAGE_METRICS, "clip_score")
PRDC_METRICS = ("precision", "recall", "density", "coverage")
PR_DEFINITIONS = {
    "knn": "k-NN radii (k-th neighbour excluding self), inside iff d < radius (Naeem et al. 2020; = prdc package, "
           "SFD reference prdc.py)",
    "torch-fidelity": "torch-fidelity prc_features_to_metric, prc_neighborhood=k, inside iff d <= radius "
                      "(Kynkaenniemi et al. 2019)",
}
KID_MAX_SUBSET = 1000
KID_SUBSETS = 100


def _load_reference(reference) -> ReferenceStats:
    if isinstance(reference, ReferenceStats):
        return reference
    if isinstance(reference, str | Path):
        return ReferenceStats.load(Path(reference))
    if isinstance(reference, dict) and "mu" in reference and "sigma" in reference:
        return ReferenceStats(np.asarray(reference["mu"], np.float64), np.asarray(reference["sigma"], np.float64),
                              reference.get("features"), source="reference dict")
    raise BadInput(f"reference must be ReferenceStats, an .npz path or a dict with mu/sigma, got {type(reference)}")


def _check_reference(ref: ReferenceStats, dim: int, space=None) -> None:
    if ref.dim != dim:
        name = f"{space.name}:{space.layer}" if space is not None else "the feature extractor"
        raise BadInput(f"reference statistics {ref.source} have {ref.dim}-d features but {name} gives {dim}-d; "
                       "use reference statistics computed with the same extractor and layer")
    if space is not None and ref.meta:
        theirs = (ref.meta.get("feature_extractor"), ref.meta.get("feature_layer"),
                  ref.meta.get("feature_weights_sha256"))
        ours = (space.name, space.layer, space.weights_id)
        if all(v is not None for v in theirs) and theirs != ours:
            raise BadInput(f"reference statistics {ref.source} were computed with {theirs} but the metrics use "
                           f"{ours}; recompute the reference (delete the cached file) or pick the matching extractor")


def kid_subset_size_for(n_generated: int, n_reference: int, requested: int | None = None) -> int:
    """``min(1000, n_generated, n_reference)`` by default; a requested size must fit both sets."""
    if requested is None:
        size = min(KID_MAX_SUBSET, n_generated, n_reference)
    else:
        size = int(requested)
        if size > min(n_generated, n_reference):
            raise BadInput(f"KID subset size {size} is larger than the sample count (generated {n_generated}, "
                           f"reference {n_reference}); use kid_subset_size <= {min(n_generated, n_reference)} "
                           f"or leave it unset (min({KID_MAX_SUBSET}, n))")
    if size < 2:
        raise BadInput(f"KID needs subsets of at least 2 samples, got {size}; generate more samples")
    return size


def seeded_subset(n: int, size: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a ``RandomState(seed)`` subset of ``size`` out of ``n`` (None: keep all)."""
    if size is None or size >= n:
        return None
    return np.sort(np.random.RandomState(seed).permutation(n)[:size])


def compute_metrics_from_features(features: torch.Tensor, reference, metrics=IMAGE_METRICS, *, k: int = DEFAULT_K,
                                  kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS,
                                  pr_definition: str = "knn", prdc_samples: int | None = None, seed: int = 0,
                                  tile: int = DEFAULT_TILE, space=None) -> dict:
    """Every requested image metric from generated features [N, D] and a reference (see module doc)."""
    unknown = set(metrics) - set(IMAGE_METRICS)
    if unknown:
        raise BadInput(f"unknown image metric(s) {sorted(unknown)}; choose from {', '.join(IMAGE_METRICS)}")
    if pr_definition not in PR_DEFINITIONS:
        raise BadInput(f"unknown pr_definition {pr_definition!r}; choose from {', '.join(PR_DEFINITIONS)}")
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise BadInput(f"features must be [N, D], got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise BadInput(f"{count_bad(features)} feature vector(s) contain NaN/Inf; check the feature extractor input")
    ref = _load_reference(reference)
    _check_reference(ref, features.shape[1], space)
    n = features.shape[0]
    out: dict = {}
    notes: list[str] = []

    if "fid" in metrics:
        if n < 2:
            raise BadInput(f"FID needs at least 2 samples, got {n}; generate more samples")
        out["fid"] = fid_from_statistics(fid_statistics(features), ref.fid_stats())

    needs_ref_features = [m for m in metrics if m == "kid" or m in PRDC_METRICS]
    if needs_ref_features and not ref.has_features:
        for m in needs_ref_features:
            out[m] = None
        if "kid" in metrics:
            out["kid_std"] = None
        notes.append(f"{', '.join(needs_ref_features)} unavailable: reference {ref.source} holds only mu/sigma "
                     "(EDM-style); recompute the reference with sfdbench to store its features")
        needs_ref_features = []
    ref_feats = ref.features.to(torch.float64) if needs_ref_features else None

    if "kid" in metrics and ref_feats is not None:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        size = kid_subset_size_for(n, ref_feats.shape[0], kid_subset_size)
        kid = kid_features_to_metric(features.to(torch.float64), ref_feats, kid_subsets=kid_subsets,
                                     kid_subset_size=size, rng_seed=seed, verbose=False)
        out.update(kid=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD], kid_subset_size=size,
                   kid_subsets=kid_subsets)

    wanted_prdc = [m for m in PRDC_METRICS if m in metrics]
    if wanted_prdc and ref_feats is not None:
        idx = seeded_subset(n, prdc_samples, seed)
        fake = features if idx is None else features[torch.from_numpy(idx)]
        values = prdc(ref_feats, fake, k=k, tile=tile)
        if pr_definition == "torch-fidelity" and {"precision", "recall"} & set(wanted_prdc):
            values.update(torch_fidelity_precision_recall(ref_feats, fake, k, batch=tile))
        out.update({m: values[m] for m in wanted_prdc})
    if notes:
        out["notes"] = "; ".join(notes)
    return out


def torch_fidelity_precision_recall(real_features, fake_features, k: int = DEFAULT_K, batch: int = DEFAULT_TILE):
    """torch-fidelity's precision/recall (``<=`` balls) with neighbourhood ``k``, memory O(batch x N)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    res = prc_features_to_metric(torch.as_tensor(fake_features), torch.as_tensor(real_features), prc_neighborhood=k,
                                 prc_batch_size=batch, save_cpu_ram=True, verbose=False)
    return {"precision": float(res[KEY_METRIC_PRECISION]), "recall": float(res[KEY_METRIC_RECALL])}


def compute_metrics(images_u8: torch.Tensor, reference, extractor, metrics=IMAGE_METRICS, prompts=None, *,
                    k: int = DEFAULT_K, kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS,
                    pr_definition: str = "knn", prdc_samples: int | None = None, seed: int = 0, clip=None,
                    clip_at_zero: bool = True, device: str | torch.device = "cpu", tile: int = DEFAULT_TILE) -> dict:
    """Metrics of uint8 samples [N, C, H, W] against ``reference``.

    Args:
        images_u8: generated images, uint8 [N, C, H, W] (from ``sfdbench.metrics.images.to_uint8``).
        reference: ``ReferenceStats``, a path to an ``.npz`` (ours or EDM-style mu/sigma), or a dict.
        extractor: a ``FeatureSpace`` (``inception_feature_space()``, ``digits_features.feature_space()``).
        metrics: any of ``ALL_METRICS`` = fid, kid, precision, recall, density, coverage, clip_score.
        prompts: one caption per image (required for ``clip_score``).
        k: neighbourhood size for precision/recall/density/coverage (5 as in the paper).
        kid_subset_size / kid_subsets: KID subsets (default ``min(1000, n)``, 100 subsets).
        pr_definition: ``"knn"`` (prdc, strict ``<``) or ``"torch-fidelity"`` (``<=``); see module doc.
        prdc_samples: use a seeded subset of this many generated samples for PRDC (the SFD reference
            implementation, zju-pi/diff-sampler, file ``sfd-main/prdc.py``, uses 5000).
        seed: seed of the KID subsets and of the PRDC subset.
        clip: a loaded ``ClipModel`` (default: ``load_clip()``, ViT-g-14 / laion2b_s34b_b88k).
        clip_at_zero: CLIP score 100 * max(cos, 0) (default, issue 4) or 100 * cos (SFD reference,
            ``sfd-main/clip_score.py``; ``docs/algorithms.md#clip-score``).

    Returns:
        ``{"fid": float, "kid": float, "kid_std": float, "kid_subset_size": int, "kid_subsets": int,
        "precision": ..., "recall": ..., "density": ..., "coverage": ..., "clip_score": float}`` for the
        requested metrics; unavailable ones are ``None`` with a ``"notes"`` entry.
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise BadInput(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
    image_metrics = tuple(m for m in metrics if m in IMAGE_METRICS)
    images_u8 = validate_images(images_u8, extractor if image_metrics else None)
    n = images_u8.shape[0]
    if "fid" in image_metrics and n < 2:
        raise BadInput(f"FID needs at least 2 samples, got {n}; generate more samples")
    if any(m in PRDC_METRICS for m in image_metrics) and min(n, prdc_samples or n) < k + 1:
        raise BadInput(f"precision/recall/density/coverage with k={k} need at least {k + 1} samples, got {n}; "
                       "generate more samples or lower k")
    if "clip_score" in metrics:
        if prompts is None or isinstance(prompts, str) or len(prompts) != n:
            got = "none" if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
            raise BadInput(f"clip_score needs one prompt per image ({n}), got {got}; pass prompts=[...]")
    out: dict = {}
    if image_metrics:
        if extractor is None or reference is None:
            raise BadInput("image metrics need a feature extractor and reference statistics")
        ref = _load_reference(reference)
        _check_reference(ref, extractor.dim, extractor)  # before the (possibly long) feature extraction
        feats = extractor.features(images_u8, device)
        out.update(compute_metrics_from_features(
            feats, ref, image_metrics, k=k, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
            pr_definition=pr_definition, prdc_samples=prdc_samples, seed=seed, tile=tile, space=extractor))
    if "clip_score" in metrics:
        from sfdbench.metrics.clip_score import clip_score, load_clip

        out["clip_score"] = clip_score(images_u8, list(prompts), clip or load_clip(device=device),
                                       clip_at_zero=clip_at_zero, device=device)
    return out


def protocol(extractor=None, *, k: int = DEFAULT_K, kid_subset_size: int | None = None,
             kid_subsets: int = KID_SUBSETS, pr_definition: str = "knn", n_reference: int | None = None,
             clip=None, clip_at_zero: bool = True) -> dict:
    """What a run record should say about how ``compute_metrics`` computed its numbers."""
    out = {
        **(extractor.protocol() if extractor is not None else {}),
        "n_reference": n_reference,
        "fid_implementation": "torch-fidelity fid_features_to_statistics + fid_statistics_to_metric (float64)",
        "kid_implementation": "torch-fidelity kid_features_to_metric (poly kernel d=3, gamma=1/D, coef0=1)",
        "kid_subset_size": kid_subset_size if kid_subset_size is not None else f"min({KID_MAX_SUBSET}, n)",
        "kid_subsets": kid_subsets,
        "prdc_k": k,
        "pr_definition": f"{pr_definition}: {PR_DEFINITIONS[pr_definition]}",
        "density_coverage_implementation": "sfdbench.metrics.knn (exact, float64, tiled; = prdc package)",
    }
    if clip is not None:
        out.update(clip.protocol(clip_at_zero))
    return out
