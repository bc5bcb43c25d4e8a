"""Challenge-style scoring: probability maps upsampled to each image's original size, threshold on probability."""

import numpy as np
import pytest
import torch
from PIL import Image

from isic_utils.data.decoding import DecodedSplit
from isic_utils.data.sources import Pair
from isic_utils.scoring.metrics import original_size_counts, scores, summarize


def split_with_masks(tmp_path, masks: list[np.ndarray]) -> DecodedSplit:
    pairs, sizes = [], []
    for k, mask in enumerate(masks):
        path = tmp_path / f"ISIC_{k:07d}_Segmentation.png"
        Image.fromarray(mask).save(path)
        pairs.append(Pair(f"ISIC_{k:07d}", tmp_path / f"ISIC_{k:07d}.jpg", path))
        sizes.append((mask.shape[1], mask.shape[0]))
    n = len(masks)
    return DecodedSplit(
        [p.id for p in pairs],
        torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
        sizes,
        pairs,
    )


def test_upsampled_to_original_size_before_thresholding(tmp_path):
    # 2×2 map, left column 0.9, right 0.1 → bilinear to 4 wide gives 0.9, 0.7, 0.3, 0.1 → left half predicted
    probabilities = torch.tensor([[[[0.9, 0.1], [0.9, 0.1]]]])
    truth = np.zeros((6, 4), np.uint8)
    truth[:, :2] = 255
    counts = original_size_counts(probabilities, split_with_masks(tmp_path, [truth]))
    assert counts.tolist() == [[12, 0, 0, 12]]  # 6 rows × 2 columns each side, at the original 4×6 size
    assert scores(counts)["iou"].item() == 1.0


def test_threshold_is_on_probability(tmp_path):
    truth = np.full((4, 4), 255, np.uint8)
    just_above = torch.full((1, 1, 2, 2), 0.51)
    just_below = torch.full((1, 1, 2, 2), 0.49)
    split = split_with_masks(tmp_path, [truth])
    assert scores(original_size_counts(just_above, split))["iou"].item() == 1.0
    assert scores(original_size_counts(just_below, split))["iou"].item() == 0.0


def test_empty_masks_and_the_mean_over_images(tmp_path):
    empty = np.zeros((4, 6), np.uint8)
    full = np.full((4, 6), 255, np.uint8)
    split = split_with_masks(tmp_path, [empty, full])
    probabilities = torch.zeros(2, 1, 2, 2)  # predicts nothing anywhere
    summary = summarize(original_size_counts(probabilities, split))
    assert summary["iou_mean"] == pytest.approx(0.5)  # empty/empty scores 1, the missed lesion 0
    assert summary["iou_pooled"] == 0.0
    assert summary["specificity_mean"] == 1.0
