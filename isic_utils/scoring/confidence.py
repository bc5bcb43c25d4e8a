"""Which masks to trust: a per-image confidence computed from the model's probability map alone (the ground truth
never enters it), chosen and thresholded on validation, and the calibration of the pixel probabilities.

Candidates, each in [0, 1], higher = more likely right, from one ``1×S×S`` probability map ``p`` and its mask
``p > 0.5``:

- **boundary sharpness**: the mean of ``|2p − 1|`` over a band of pixels around the predicted boundary (a model
  sure where the lesion ends); 0 for an empty mask.
- **certain area**: the predicted lesion's pixels over those pixels plus every uncertain pixel (``0.1 < p < 0.9``).
- **one lesion** (shape): the share of the predicted lesion in its largest 8-connected piece, times a border check
  that is 1 while at least ``BORDER_FREE`` (a tenth) of the image's border is background and falls to 0 as the
  predicted lesion closes the whole border. Fragments are implausible in dermoscopy, and an inverted mask
  (background predicted as lesion) has perfectly sharp boundaries but covers the whole border: it scores ~0 here.
  Real lesions do touch the border (up to 88 % of it on the development validation images), so only the last tenth
  counts: a stricter check (the share of border left free) lowered validation ρ from 0.67–0.75 to 0.35–0.56.
- the two uncertainty measures each **× one lesion**.

The kept confidence is the product candidate with the higher Spearman ρ against JA on validation (a product: so a
mask that cannot be one lesion is never trusted for being sharp). Images below ``flag_below`` (the threshold that
best separates validation images under the ISIC 2018 failure line, JA < 0.65, Youden's J) are "check this one by
hand".

Calibration: a temperature ``T`` on the logits (``sigmoid(logit(p) / T)``), fitted on validation pixels by
likelihood, is kept when it lowers the validation expected calibration error (ECE, 15 equal-width bins). It never
changes a mask: ``p > 0.5`` ⇔ ``logit(p) / T > 0``, so JA is the same with and without it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import optimize
from scipy.stats import mannwhitneyu, spearmanr

from .metrics import THRESHOLD_JACCARD
from .shape import BAND, UNCERTAIN, one_lesion

KEPT = ("boundary sharpness × one lesion", "certain area × one lesion")  # what the confidence is chosen among
CANDIDATES = ("boundary sharpness", "certain area", "one lesion", *KEPT)
ECE_BINS = 15


def _maps(probabilities: torch.Tensor) -> torch.Tensor:
    """``N×1×S×S`` (or ``N×S×S``) probabilities as float ``N×1×S×S``."""
    p = probabilities.float()
    return p.unsqueeze(1) if p.dim() == 3 else p


def candidate_scores(probabilities: torch.Tensor) -> pd.DataFrame:
    """One row per image, one column per candidate in ``CANDIDATES``, from the probability maps alone."""
    p = _maps(probabilities)
    mask = (p > 0.5).float()
    sure = (2 * p - 1).abs()
    k = 2 * BAND + 1
    dilated = F.max_pool2d(mask, k, stride=1, padding=BAND)
    eroded = 1 - F.max_pool2d(1 - mask, k, stride=1, padding=BAND)
    band = (dilated - eroded).flatten(1)
    band_pixels = band.sum(1)
    sharpness = torch.where(
        band_pixels > 0, (sure.flatten(1) * band).sum(1) / band_pixels.clamp(min=1), torch.zeros_like(band_pixels)
    )
    lesion = mask.flatten(1).sum(1)
    uncertain = (sure < UNCERTAIN).flatten(1).sum(1).float()
    certain = torch.where(lesion > 0, lesion / (lesion + uncertain).clamp(min=1), torch.zeros_like(lesion))
    shape = torch.tensor([one_lesion(m[0].numpy().astype(bool)) for m in mask], dtype=torch.float64)
    sharpness, certain = sharpness.double(), certain.double()
    return pd.DataFrame(
        {
            "boundary sharpness": sharpness.numpy(),
            "certain area": certain.numpy(),
            "one lesion": shape.numpy(),
            KEPT[0]: (sharpness * shape).numpy(),
            KEPT[1]: (certain * shape).numpy(),
        }
    )


def scores(probabilities: torch.Tensor, calibration: dict | None = None) -> np.ndarray:
    """The kept confidence of each image (``calibration["confidence"]``, after its temperature), from the
    probabilities alone. Without a calibration (a checkpoint from before it): the first kept candidate, T = 1."""
    calibration = calibration or {}
    p = calibrated(probabilities, calibration.get("temperature", 1.0))
    return candidate_scores(p)[calibration.get("confidence", KEPT[0])].to_numpy()


# ----------------------------------------------------------------------------- how well a confidence flags failures


def auroc(confidence, iou, fail_below: float = THRESHOLD_JACCARD) -> float:
    """Area under the ROC curve of flagging images with JA < ``fail_below`` by low confidence (0.5: chance; 1: every
    failure less confident than every success). NaN when the set has no failure or nothing but failures."""
    confidence, failed = np.asarray(confidence, float), np.asarray(iou, float) < fail_below
    if failed.all() or not failed.any():
        return float("nan")
    u = mannwhitneyu(confidence[~failed], confidence[failed]).statistic
    return float(u / (failed.sum() * (~failed).sum()))


def flag_threshold(confidence, iou, fail_below: float = THRESHOLD_JACCARD) -> float:
    """The confidence under which an image is flagged, chosen on validation: the cut that maximises Youden's J
    (flagged failures' share + unflagged successes' share − 1). Without both kinds of image: the lowest 10 %."""
    confidence, failed = np.asarray(confidence, float), np.asarray(iou, float) < fail_below
    if failed.all() or not failed.any():
        return float(np.quantile(confidence, 0.1))
    cuts = np.unique(confidence)
    cuts = np.append(cuts, np.inf)  # "flag below cut": every observed value, and everything
    j = [
        ((confidence < c) & failed).sum() / failed.sum() + ((confidence >= c) & ~failed).sum() / (~failed).sum() - 1
        for c in cuts
    ]
    best = cuts[int(np.argmax(j))]
    return float(best) if np.isfinite(best) else float(confidence.max() + 1e-9)


def assessment(confidence, iou, flag_below: float, fail_below: float = THRESHOLD_JACCARD) -> dict:
    """How one set's confidences track its JA: Spearman ρ, AUROC for failures, and the flagged-vs-failed counts."""
    confidence, iou = np.asarray(confidence, float), np.asarray(iou, float)
    failed, flagged = iou < fail_below, confidence < flag_below
    varied = len(iou) > 2 and np.ptp(confidence) > 0 and np.ptp(iou) > 0
    return {
        "images": int(len(iou)),
        "Spearman ρ": float(spearmanr(confidence, iou)[0]) if varied else float("nan"),
        f"AUROC (JA < {fail_below})": auroc(confidence, iou, fail_below),
        "flagged": f"{flagged.mean():.0%}" if len(iou) else "—",
        "failed & flagged": int((failed & flagged).sum()),
        "failed, not flagged": int((failed & ~flagged).sum()),
        "flagged, not failed": int((~failed & flagged).sum()),
        "neither": int((~failed & ~flagged).sum()),
    }


# ----------------------------------------------------------------------------- calibration of pixel probabilities

_EPS = 1e-6


def calibrated(probabilities: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``sigmoid(logit(p) / T)``; the same probabilities when ``T`` is 1. Masks (``> 0.5``) never change."""
    if temperature == 1.0:
        return probabilities.float()
    p = probabilities.float().clamp(_EPS, 1 - _EPS)
    return torch.sigmoid(torch.logit(p) / temperature)


def expected_calibration_error(probabilities: torch.Tensor, masks: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Pixel ECE: over ``bins`` equal-width bins of predicted probability, the pixel-weighted mean of
    |observed lesion frequency − mean predicted probability|."""
    table = reliability(probabilities, masks, bins)
    return float((table["pixels"] * (table["observed"] - table["predicted"]).abs()).sum() / table["pixels"].sum())


def reliability(probabilities: torch.Tensor, masks: torch.Tensor, bins: int = ECE_BINS) -> pd.DataFrame:
    """The reliability diagram's numbers: per probability bin, its pixels, their mean predicted probability and the
    observed share of lesion pixels (empty bins left out)."""
    p = probabilities.float().flatten()
    y = masks.float().flatten()
    if p.shape != y.shape:
        raise ValueError(f"probabilities {tuple(probabilities.shape)} and masks {tuple(masks.shape)} differ in shape")
    index = (p * bins).long().clamp(max=bins - 1)
    pixels = torch.bincount(index, minlength=bins).double()
    predicted = torch.bincount(index, weights=p.double(), minlength=bins)
    observed = torch.bincount(index, weights=y.double(), minlength=bins)
    kept = pixels > 0
    return pd.DataFrame(
        {
            "bin": [f"{k / bins:.2f}–{(k + 1) / bins:.2f}" for k in range(bins)],
            "pixels": pixels.numpy(),
            "predicted": (predicted / pixels.clamp(min=1)).numpy(),
            "observed": (observed / pixels.clamp(min=1)).numpy(),
        }
    )[kept.numpy()].reset_index(drop=True)


def fit_temperature(probabilities: torch.Tensor, masks: torch.Tensor) -> float:
    """The temperature that maximises the likelihood of ``masks`` under ``sigmoid(logit(p) / T)`` (T in 0.05–20)."""
    logits = torch.logit(probabilities.float().flatten().clamp(_EPS, 1 - _EPS)).double()
    y = masks.float().flatten().double()

    def nll(log_t: float) -> float:
        return float(F.binary_cross_entropy_with_logits(logits / np.exp(log_t), y))

    found = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


def fit_calibration(val_probabilities: torch.Tensor, val_masks: torch.Tensor, val_iou) -> dict:
    """Everything chosen on validation: the temperature (kept only when it lowers the validation ECE), which
    candidate is the confidence (the higher validation ρ among ``KEPT``), and the flagging threshold. Also the
    validation ECE before and after and each candidate's validation ρ, for the report."""
    before = expected_calibration_error(val_probabilities, val_masks)
    fitted = fit_temperature(val_probabilities, val_masks)
    after = expected_calibration_error(calibrated(val_probabilities, fitted), val_masks)
    temperature = fitted if after < before else 1.0
    candidates = candidate_scores(calibrated(val_probabilities, temperature))
    iou = np.asarray(val_iou, float)
    rho = {
        name: (
            float(spearmanr(candidates[name], iou)[0])
            if len(iou) > 2 and np.ptp(candidates[name]) > 0 and np.ptp(iou) > 0
            else float("nan")
        )
        for name in CANDIDATES
    }
    chosen = max(KEPT, key=lambda name: -np.inf if np.isnan(rho[name]) else rho[name])
    return {
        "temperature": temperature,
        "fitted_temperature": fitted,
        "ece_val": before,
        "ece_val_calibrated": expected_calibration_error(calibrated(val_probabilities, temperature), val_masks),
        "confidence": chosen,
        "flag_below": flag_threshold(candidates[chosen], iou),
        "validation_rho": rho,
    }


IN_CHECKPOINT = ("temperature", "confidence", "flag_below")  # what predict needs of a run's calibration
