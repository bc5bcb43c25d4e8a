"""The ISIC challenge's own scorer (``isic-challenge-scoring``, a dev dependency) as the referee: on masks written
by ``predict`` at each image's original size, our per-image Jaccard, threshold Jaccard, Dice, accuracy, sensitivity
and specificity, and their means, equal what the challenge computes from the same files."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from isic_challenge_scoring import metrics as challenge
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from isic_challenge_scoring.load_image import iter_image_pairs
from isic_challenge_scoring.segmentation import SegmentationScore

from isic_utils import predict
from isic_utils.metrics import per_image_table
from isic_utils.model import build_model
from isic_utils.training import TrainConfig, fit

pytestmark = pytest.mark.filterwarnings("ignore:.*inplace:")  # the scorer uses a pandas idiom newer pandas deprecates

COLUMNS = {"iou": "jaccard", "threshold_iou": "threshold_jaccard", "dice": "dice", "accuracy": "accuracy",
           "sensitivity": "sensitivity", "specificity": "specificity"}


def straddling_probabilities(model, meta, images_uint8, tta=None):
    """Probability maps with both classes in every image (darker than the image's mean → lesion), so each score
    is computed on a real prediction rather than an empty one."""
    grey = images_uint8.float().mean(1, keepdim=True)
    return torch.sigmoid((grey.mean(dim=(2, 3), keepdim=True) - grey) / 8)


def challenge_scores(truth_dir, prediction_dir) -> pd.DataFrame:
    rows = []
    for pair in iter_image_pairs(truth_dir, prediction_dir):
        cm = create_binary_confusion_matrix(truth_binary_values=pair.truth_image > 128,
                                            prediction_binary_values=pair.prediction_image > 128, name=pair.image_id)
        rows.append({"id": pair.image_id, "jaccard": challenge.binary_jaccard(cm),
                     "threshold_jaccard": challenge.binary_threshold_jaccard(cm, threshold=0.65),
                     "dice": challenge.binary_dice(cm), "accuracy": challenge.binary_accuracy(cm),
                     "sensitivity": challenge.binary_sensitivity(cm), "specificity": challenge.binary_specificity(cm)})
    return pd.DataFrame(rows).set_index("id")


def test_our_scores_equal_the_challenge_scorers_on_masks_written_by_predict(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=8, precision="fp32", augment=(), monitor_test=False)
    fit(build_model(encoder_weights=None, freeze_encoder=True), tiny_data, config, tmp_path / "run", verbose=False)
    monkeypatch.setattr(predict, "predict_probabilities", straddling_probabilities)
    pairs = tiny_data.test.sources
    written = predict.round_trip(tmp_path / "run" / "best.pt", pairs, tmp_path / "predicted")
    truth = tmp_path / "truth"
    truth.mkdir()
    for pair in pairs:
        shutil.copy(pair.mask, truth / pair.mask.name)

    theirs = challenge_scores(truth, tmp_path / "predicted")
    ours = per_image_table(written["counts"], [p.id for p in pairs]).set_index("id").loc[theirs.index]
    assert len(theirs) == len(pairs) and (ours["iou"] > 0).all() and (ours["iou"] < 1).all()
    for mine, their in COLUMNS.items():
        assert ours[mine].to_numpy() == pytest.approx(theirs[their].to_numpy(), abs=1e-12), mine
    assert torch.equal(written["counts"], written["expected"])  # the files score what the evaluation computed
    macro = SegmentationScore(iter_image_pairs(truth, tmp_path / "predicted")).macro_average
    for mine, their in COLUMNS.items():
        assert ours[mine].mean() == pytest.approx(macro[their], abs=1e-12), mine
