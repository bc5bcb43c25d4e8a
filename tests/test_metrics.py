import pytest
import torch

from isic_utils.scoring import metrics


def masks(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_hand_computed_counts_and_scores():
    target = masks([1, 1, 0, 0])
    probabilities = masks([0.9, 0.4, 0.6, 0.1])  # TP, FN, FP, TN
    counts = metrics.confusion_counts(probabilities, target)
    assert counts.tolist() == [[1, 1, 1, 1]]
    s = metrics.scores(counts)
    assert s["iou"].item() == pytest.approx(1 / 3)
    assert s["dice"].item() == pytest.approx(0.5)
    assert s["accuracy"].item() == pytest.approx(0.5)
    assert s["sensitivity"].item() == pytest.approx(0.5)
    assert s["specificity"].item() == pytest.approx(0.5)


def test_threshold_applies_to_probabilities_not_logits():
    # probability 0.55 is a lesion pixel; as a logit it would be probability 0.63 — the threshold is on probability
    counts = metrics.confusion_counts(masks([0.55, 0.45]), masks([1, 0]))
    assert counts.tolist() == [[1, 0, 0, 1]]


def test_empty_masks():
    empty = masks([0, 0, 0, 0])
    assert metrics.scores(metrics.confusion_counts(empty, empty))["iou"].item() == 1.0  # nothing to find, nothing found
    assert metrics.scores(metrics.confusion_counts(masks([1, 0, 0, 0]), empty))["iou"].item() == 0.0
    assert metrics.scores(metrics.confusion_counts(empty, masks([1, 0, 0, 0])))["dice"].item() == 0.0
    s = metrics.scores(metrics.confusion_counts(empty, empty))
    assert s["sensitivity"].item() == 1.0 and s["specificity"].item() == 1.0


def test_mean_per_image_differs_from_pooled():
    # image 1: large lesion found perfectly; image 2: small lesion missed
    target = masks([1, 1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0])
    probabilities = masks([1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0])
    summary = metrics.summarize(metrics.confusion_counts(probabilities, target))
    assert summary["iou_mean"] == pytest.approx(0.5)
    assert summary["iou_pooled"] == pytest.approx(7 / 8)


def test_pooled_iou_matches_torchmetrics():
    from torchmetrics.classification import BinaryJaccardIndex

    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(5, 1, 16, 16, generator=generator) > 0.6).float()
    probabilities = torch.rand(5, 1, 16, 16, generator=generator)
    ours = metrics.summarize(metrics.confusion_counts(probabilities, target))["iou_pooled"]
    theirs = BinaryJaccardIndex(threshold=0.5)(probabilities, target.long()).item()
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        metrics.confusion_counts(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_a_difference_is_real_only_beyond_the_seed_spread():
    from isic_utils.scoring.metrics import seed_spread

    assert seed_spread([0.05, 0.06, 0.055])["verdict"] == "beyond the seed spread"
    wide = seed_spread([0.05, -0.02, 0.01])
    assert wide["verdict"] == "within the seed spread" and wide["std"] > 0.03
    assert "needs ≥ 3" in seed_spread([0.05])["verdict"] and "needs ≥ 3" in seed_spread([0.05, 0.06])["verdict"]
    assert seed_spread([0.1, 0.2, 0.3])["mean"] == pytest.approx(0.2)
