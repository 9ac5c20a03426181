"""Print the metric equality tables (issue 4's "must show"): our FID/KID against formulas written
out with scipy/numpy, our precision/recall/density/coverage against the ``prdc`` package, and the
CLIP score against the hand formula on an untrained open_clip model. Every number printed here
is also asserted by the tests whose helpers this reuses.

    python tests/equality_tables.py
"""

import contextlib
import io

import numpy as np
import torch
from test_metrics_clip import MODEL, PROMPTS, hand_cosines
from test_metrics_evaluate import hand_kid, scipy_fid
from test_metrics_prdc import CASES, KEYS, reference_prdc

from sfdbench.metrics import digits_features
from sfdbench.metrics.evaluate import compute_metrics_from_features
from sfdbench.metrics.images import to_uint8
from sfdbench.metrics.knn import prdc
from sfdbench.metrics.reference import reference_statistics
from sfdbench.suites.digits import FEATURE_WEIGHTS, load_digits


def fid_kid_rows() -> list[str]:
    space = digits_features.feature_space(FEATURE_WEIGHTS)
    reference = reference_statistics(space, "equality-digits-train", lambda: to_uint8(load_digits("train")[0]))
    feats = space.features(to_uint8(load_digits("test")[0]))
    ref_feats = reference.features.to(torch.float64).numpy()
    ours = compute_metrics_from_features(feats, reference, ("fid", "kid"), kid_subsets=1, kid_subset_size=297)
    fid = scipy_fid(feats.numpy(), ref_feats)
    rng = np.random.RandomState(0)  # torch-fidelity's draw order: generated subset first, then reference
    rng.choice(297, 297, replace=False)
    kid = hand_kid(feats.numpy(), ref_feats[rng.choice(1500, 297, replace=False)])
    return [f"| FID (297 held-out vs 1500 train digits) | {ours['fid']:.10g} | {fid:.10g} (scipy sqrtm) | "
            f"{abs(ours['fid'] - fid) / fid:.1e} |",
            f"| KID (1 subset of 297) | {ours['kid']:.10g} | {kid:.10g} (unbiased MMD, numpy) | "
            f"{abs(ours['kid'] - kid) / abs(kid):.1e} |"]


def prdc_rows() -> list[str]:
    rows = []
    for name, make in CASES.items():
        real, fake, k, tile = make(np.random.default_rng(0))
        ours, theirs = prdc(real, fake, k=k, tile=tile), reference_prdc(real, fake, k)
        diff = max(abs(ours[key] - theirs[key]) for key in KEYS)
        cells = " | ".join(f"{ours[key]:.4f}" for key in KEYS)
        rows.append(f"| {name} ({len(real)}x{len(fake)}x{real.shape[1]}, k={k}) | {cells} | {diff:.1e} |")
    return rows


def clip_rows() -> list[str]:
    import open_clip

    from sfdbench.metrics.clip_score import ClipModel, clip_score

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    clip = ClipModel(model.eval(), preprocess, open_clip.get_tokenizer(MODEL), MODEL, None)
    images = torch.randint(0, 256, (len(PROMPTS), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cos = hand_cosines(clip, images, PROMPTS)
    rows = []
    for clip_at_zero in (True, False):
        ours = clip_score(images, PROMPTS, clip, clip_at_zero=clip_at_zero)
        hand = float(np.mean(100 * (np.maximum(cos, 0) if clip_at_zero else cos)))
        what = "100 max(cos, 0)" if clip_at_zero else "100 cos (no clip)"
        rows.append(f"| {MODEL} untrained, {len(PROMPTS)} pairs, {what} | {ours:.6f} | {hand:.6f} | "
                    f"{abs(ours - hand):.1e} |")
    return rows


def main() -> None:
    print("| metric | sfdbench | independent | relative difference |\n|---|---|---|---|")
    print("\n".join(fid_kid_rows()))
    print("\n| case (real x fake x dim) | " + " | ".join(KEYS) + " | max abs diff vs prdc |\n|---|---|---|---|---|---|")
    with contextlib.redirect_stderr(io.StringIO()):
        print("\n".join(prdc_rows()))
    print("\n| CLIP score | sfdbench | hand formula | abs difference |\n|---|---|---|---|")
    print("\n".join(clip_rows()))


if __name__ == "__main__":
    main()
