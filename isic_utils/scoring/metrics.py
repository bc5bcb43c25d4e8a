"""Segmentation metrics from per-image confusion counts.

Predictions are **probabilities** thresholded at 0.5 (never raw logits). For each image we count true/false
positives/negatives; every metric is then reported two ways:

- ``*_mean`` — the mean over images of the per-image score. This is how the ISIC 2016 challenge ranked entries
  (mean per-image Jaccard). Every ratio whose denominator is 0 is 1 (0/0 → 1): an image whose mask and prediction
  are both empty scores IoU and Dice 1 (nothing to find, nothing found); the sensitivity of an image without lesion
  pixels is 1 whatever was predicted (its false positives show in specificity, IoU and Dice), and the specificity of
  an image without background pixels is 1 likewise.
- ``*_pooled`` — the score of the pixels pooled over the whole set ("micro" averaging, what
  ``torchmetrics.BinaryJaccardIndex`` computes when fed every pixel).

Definitions: IoU (Jaccard) = TP / (TP + FP + FN); Dice = 2TP / (2TP + FP + FN); pixel accuracy =
(TP + TN) / all; sensitivity = TP / (TP + FN); specificity = TN / (TN + FP); threshold Jaccard (the ISIC 2018
ranking rule, as the challenge's scorer ``isic-challenge-scoring`` computes it) = IoU where IoU ≥ 0.65, else 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.decoding import read_mask
from .shape import largest_lesion

METRICS = ("iou", "threshold_iou", "dice", "accuracy", "sensitivity", "specificity")
THRESHOLD_JACCARD = 0.65  # the ISIC 2018 ranking rule: an image scoring Jaccard below this counts 0


def confusion_counts(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image counts, an ``N×4`` int64 tensor of (TP, FP, FN, TN).

    ``probabilities``: ``N×1×H×W`` (or ``N×H×W``) in [0, 1]; ``targets``: the same shape, {0, 1}.
    """
    if probabilities.shape != targets.shape:
        raise ValueError(f"prediction shape {tuple(probabilities.shape)} differs from target {tuple(targets.shape)}")
    predicted = (probabilities > threshold).flatten(1)
    actual = targets.flatten(1) > 0.5
    tp = (predicted & actual).sum(1)
    fp = (predicted & ~actual).sum(1)
    fn = (~predicted & actual).sum(1)
    tn = (~predicted & ~actual).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.ones_like(numerator))


def scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores from ``K×4`` counts (per image, or one pooled row): a dict of ``K`` float64 tensors."""
    tp, fp, fn, tn = counts.double().unbind(1)
    iou = _ratio(tp, tp + fp + fn)
    return {
        "iou": iou,
        "threshold_iou": torch.where(iou >= THRESHOLD_JACCARD, iou, torch.zeros_like(iou)),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }


def per_image_table(counts: torch.Tensor, ids=None, sizes=None) -> pd.DataFrame:
    """One row per image: id (and original width, height when ``sizes`` is given), TP/FP/FN/TN, each score."""
    table = pd.DataFrame(counts.numpy(), columns=["tp", "fp", "fn", "tn"])
    for name, values in scores(counts).items():
        table[name] = values.numpy()
    if sizes is not None:
        table.insert(0, "height", [s[1] for s in sizes])
        table.insert(0, "width", [s[0] for s in sizes])
    if ids is not None:
        table.insert(0, "id", list(ids))
    return table


def summarize(counts: torch.Tensor) -> dict[str, float]:
    """``{metric}_mean`` (mean of per-image scores) and ``{metric}_pooled`` (pixels pooled) for every metric."""
    per_image = scores(counts)
    pooled = scores(counts.sum(0, keepdim=True))
    summary = {}
    for name in METRICS:
        summary[f"{name}_mean"] = float(per_image[name].mean())
        if name != "threshold_iou":  # a rule for single images: pooling pixels first has no meaning for it
            summary[f"{name}_pooled"] = float(pooled[name][0])
    return summary


POSTPROCESSING = ("none", "largest_component")


def postprocess_mask(mask: torch.Tensor, method: str = "none") -> torch.Tensor:
    """Post-process a binary ``H×W`` (or ``1×…×H×W``) mask: ``largest_component`` keeps the largest 8-connected
    foreground component and fills its holes (one lesion per dermoscopy image); ``none`` returns it unchanged.
    An empty mask stays empty."""
    if method == "none":
        return mask
    if method != "largest_component":
        raise ValueError(f"postprocess must be one of {list(POSTPROCESSING)}, got {method!r}")
    array = mask.detach().cpu().numpy().astype(bool)
    plane = largest_lesion(array.reshape(array.shape[-2:]))
    return torch.from_numpy(plane.reshape(array.shape)).to(mask.device, mask.dtype)


def full_size_mask(
    probabilities: torch.Tensor, size: tuple[int, int], threshold: float = 0.5, postprocess: str = "none"
) -> torch.Tensor:
    """A ``1×1×h×w`` probability map → the binary ``1×1×H×W`` mask at the image's original (width, height) =
    ``size``: bilinear upsampling, threshold, then ``postprocess``. The one path from a model's output to a mask,
    for scoring and for ``predict``."""
    width, height = size
    upsampled = torch.nn.functional.interpolate(
        probabilities.float(), size=(height, width), mode="bilinear", align_corners=False
    )
    return postprocess_mask(upsampled > threshold, postprocess)


def original_size_counts(probabilities, data_split, threshold: float = 0.5, postprocess: str = "none", refine=None):
    """Challenge-style counts: each probability map upsampled (bilinear) to its image's original size,
    thresholded at ``threshold`` (then post-processed), and compared with the original full-size mask.

    ``probabilities``: one ``N×1×h×w`` tensor, or a list of them (a run's seeds), for which each full-size mask is
    read once and a list of counts is returned. ``postprocess``: one method for all, or a list (one per map).
    ``refine``: None, or a list (one per map) of None or a function (image index, its ``1×1×h×w`` map) → its map at
    the original size (coarse-to-fine: ``inference.zoomed_probabilities``), used instead of upsampling. Entries that
    share a map and a refinement (the same objects) and differ only in post-processing upsample or refine it once.
    """
    several = isinstance(probabilities, (list, tuple))
    maps = list(probabilities) if several else [probabilities]
    methods = list(postprocess) if isinstance(postprocess, (list, tuple)) else [postprocess] * len(maps)
    refiners = list(refine) if refine is not None else [None] * len(maps)
    counts: list[list[torch.Tensor]] = [[] for _ in maps]
    for k, pair in enumerate(data_split.sources):
        mask = read_mask(pair.mask, None).float().unsqueeze(0)
        made: dict[tuple[int, int], torch.Tensor] = {}  # one full-size mask per distinct (map, refinement)
        for store, maps_k, method, refined in zip(counts, maps, methods, refiners):
            key = (id(maps_k), id(refined))
            if key not in made:
                coarse = maps_k[k : k + 1] if refined is None else refined(k, maps_k[k : k + 1])
                made[key] = full_size_mask(coarse, data_split.sizes[k], threshold)
            store.append(confusion_counts(postprocess_mask(made[key], method).float(), mask, 0.5))
    joined = [torch.cat(store) for store in counts]
    return joined if several else joined[0]


MIN_SEEDS = 3  # a difference is judged against the training's own spread only with at least this many seeds


def seed_spread(differences) -> dict:
    """A difference measured once per training seed (seed k of one against seed k of the other): its mean, its std
    over seeds, and whether it stands out of that spread — the mean more than twice the std away from 0 — which is
    judged only with ``MIN_SEEDS`` seeds or more."""
    values = np.asarray(list(differences), float)
    mean = float(values.mean()) if len(values) else float("nan")
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    if len(values) < MIN_SEEDS:
        verdict = (
            f"one seed's difference: needs ≥ {MIN_SEEDS} seeds"
            if len(values) == 1
            else f"{len(values)} seeds: needs ≥ {MIN_SEEDS}"
        )
    else:
        verdict = "beyond the seed spread" if abs(mean) > 2 * std else "within the seed spread"
    return {"mean": mean, "std": std, "seeds": int(len(values)), "verdict": verdict}
