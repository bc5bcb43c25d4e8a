"""Real ISIC files from $ISIC_SAMPLE_DIR and the ImageNet weights from $ISIC_ENCODER_WEIGHTS (skipped when unset)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isic_utils.config.params import TrainConfig
from isic_utils.data.decoding import decode_pairs
from isic_utils.data.sources import find_pairs
from isic_utils.data.splits import load_report_data
from isic_utils.model.networks import build_model
from isic_utils.predict import round_trip
from isic_utils.scoring.metrics import scores
from isic_utils.training.loop import fit

from .conftest import requires

pytestmark = pytest.mark.real_data


@requires("ISIC_SAMPLE_DIR")
def test_originals_load_at_their_real_sizes():
    root = Path(os.environ["ISIC_SAMPLE_DIR"]) / "isic2016-originals"
    pairs = find_pairs(root, "train")
    assert len(pairs) == 21
    decoded = decode_pairs(pairs, 128, progress=False)
    assert decoded.images.shape == (21, 3, 128, 128) and decoded.masks.shape == (21, 1, 128, 128)
    assert max(w * h for w, h in decoded.sizes) >= 3072 * 2304 * 0.9  # up to ~7 Mpx originals
    assert all(w >= h for w, h in decoded.sizes)  # landscape, as the official archive
    fractions = decoded.masks.float().mean(dim=(1, 2, 3))
    assert ((fractions > 0.01) & (fractions < 0.99)).all()


@requires("ISIC_SAMPLE_DIR")
@requires("ISIC_ENCODER_WEIGHTS")
def test_one_epoch_on_real_images_with_imagenet_weights(tmp_path):
    root = Path(os.environ["ISIC_SAMPLE_DIR"]) / "isic2016-train-512"
    data = load_report_data(root, 128, test_split="holdout", limit=40, cache_dir=tmp_path / "cache", progress=False)
    assert data.counts() == {"train": 32, "validation": 8, "test": 20}
    torch.manual_seed(0)
    model = build_model(encoder_weights="imagenet", freeze_encoder=False)  # $ISIC_ENCODER_WEIGHTS stands in
    result = fit(
        model, data, TrainConfig(freeze_encoder=False, epochs=1, batch_size=16), tmp_path / "run", verbose=False
    )
    # the weights are named by the variable that points at them, never by a folder of this machine
    assert model.encoder_weights["source"] == "ImageNet weights from $ISIC_ENCODER_WEIGHTS"
    # transfer learning shows at once: one epoch of 2 steps from ImageNet weights finds lesions (validation and test
    # JA 0.44 when measured; a random encoder, trained the same way, finds none: JA 0.0)
    row = result.history.iloc[0]
    assert row["val_iou_mean"] > 0.2
    assert result.test.counts.shape == (20, 4) and result.test.summary()["iou_mean"] > 0.2
    predict_round_trip(tmp_path / "run" / "best.pt", tmp_path)


def predict_round_trip(checkpoint, tmp_path):
    """predict on the 21 originals: masks at each image's exact size, binary, scoring what the evaluation says."""
    originals = Path(os.environ["ISIC_SAMPLE_DIR"]) / "isic2016-originals"
    pairs = find_pairs(originals, "train")
    result = round_trip(checkpoint, pairs, tmp_path / "masks")
    written, expected, counts = result["written"], result["expected"], result["counts"]
    assert len(written) == 21
    for pair, size, path in zip(pairs, result["sizes"], written):
        mask = Image.open(path)
        assert path.name == f"{pair.id}_Segmentation.png" and mask.size == size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    # batch vs one-at-a-time inference may flip a pixel sitting exactly at the threshold, no more
    assert (counts - expected).abs().max() <= 1e-5 * counts.sum(1).max()
    assert torch.allclose(scores(counts)["iou"], scores(expected)["iou"], atol=1e-4)
