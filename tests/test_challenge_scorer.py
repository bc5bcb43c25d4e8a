"""The ISIC challenge's own scorer (``isic-challenge-scoring``, a dev dependency) as the referee: on masks that a
trained model's checkpoint gives through ``predict`` at each image's original size, our per-image Jaccard, threshold Jaccard, Dice, accuracy, sensitivity
and specificity, and their means, equal what the challenge computes from the same files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from isic_challenge_scoring import metrics as challenge
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from isic_challenge_scoring.load_image import iter_image_pairs
from isic_challenge_scoring.segmentation import SegmentationScore

from isic_utils import predict
from isic_utils.data.sources import find_pairs
from isic_utils.scoring.metrics import per_image_table

from .conftest import assert_same_counts, requires

pytestmark = pytest.mark.filterwarnings("ignore:.*inplace:")  # the scorer uses a pandas idiom newer pandas deprecates

COLUMNS = {
    "iou": "jaccard",
    "threshold_iou": "threshold_jaccard",
    "dice": "dice",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}


def challenge_scores(truth_dir, prediction_dir) -> pd.DataFrame:
    rows = []
    for pair in iter_image_pairs(truth_dir, prediction_dir):
        cm = create_binary_confusion_matrix(
            truth_binary_values=pair.truth_image > 128,
            prediction_binary_values=pair.prediction_image > 128,
            name=pair.image_id,
        )
        rows.append(
            {
                "id": pair.image_id,
                "jaccard": challenge.binary_jaccard(cm),
                "threshold_jaccard": challenge.binary_threshold_jaccard(cm, threshold=0.65),
                "dice": challenge.binary_dice(cm),
                "accuracy": challenge.binary_accuracy(cm),
                "sensitivity": challenge.binary_sensitivity(cm),
                "specificity": challenge.binary_specificity(cm),
            }
        )
    return pd.DataFrame(rows).set_index("id")


def _referee(pairs, checkpoint, tmp_path) -> None:
    """predict writes masks for ``pairs``' images; our per-image and mean scores must equal the challenge's."""
    written = predict.round_trip(checkpoint, pairs, tmp_path / "predicted")
    truth = tmp_path / "truth"
    truth.mkdir()
    for pair in pairs:
        shutil.copy(pair.mask, truth / pair.mask.name)

    theirs = challenge_scores(truth, tmp_path / "predicted")
    ours = per_image_table(written["counts"], [p.id for p in pairs]).set_index("id").loc[theirs.index]
    assert len(theirs) == len(pairs) and (ours["iou"] > 0).all() and (ours["iou"] < 1).all()
    for mine, their in COLUMNS.items():
        assert ours[mine].to_numpy() == pytest.approx(theirs[their].to_numpy(), abs=1e-12), mine
    assert_same_counts(written["counts"], written["expected"])  # the files score what the evaluation computed
    macro = SegmentationScore(iter_image_pairs(truth, tmp_path / "predicted")).macro_average
    for mine, their in COLUMNS.items():
        assert ours[mine].mean() == pytest.approx(macro[their], abs=1e-12), mine


def test_our_scores_equal_the_challenge_scorers_on_masks_written_by_predict(tiny_data, trained_run, tmp_path):
    _, run_dir = trained_run
    _referee(tiny_data.test.sources, run_dir / "best.pt", tmp_path)


@requires("ISIC_SAMPLE_DIR")
@pytest.mark.real_data
def test_the_challenge_scorer_agrees_on_real_full_size_masks(trained_run, tmp_path):
    """The 21 real ISIC images at their original sizes (1024×768 to 3072×2304) with their real ground truth."""
    _, run_dir = trained_run
    pairs = find_pairs(Path(os.environ["ISIC_SAMPLE_DIR"]) / "isic2016-originals", "train")
    assert len(pairs) == 21
    _referee(pairs, run_dir / "best.pt", tmp_path)
