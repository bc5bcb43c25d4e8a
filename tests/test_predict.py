import numpy as np
import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.data import read_mask
from isic_utils.metrics import confusion_counts, original_size_counts, summarize
from isic_utils.model import build_model
from isic_utils.predict import load_predictor
from isic_utils.training import CheckpointMismatch, TrainConfig, fit


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model(encoder_weights=None, freeze_encoder=True)
    config = TrainConfig(epochs=2, batch_size=8, precision="fp32", augment=())
    return fit(model, tiny_data, config, run_dir, verbose=False), run_dir


def test_predict_round_trip_at_original_size(trained, tiny_data, tmp_path):
    result, run_dir = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for pair in tiny_data.test.sources:
        (inputs / pair.image.name).write_bytes(pair.image.read_bytes())
    (inputs / "notes.txt").write_text("not an image")
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(inputs),
                 "--output", str(tmp_path / "out"), "--overlays"]) == 0
    for k, pair in enumerate(tiny_data.test.sources):
        mask_path = tmp_path / "out" / f"{pair.id}_Segmentation.png"
        written = Image.open(mask_path)
        assert written.size == tiny_data.test.sizes[k]  # the image's own original size
        assert set(np.unique(np.asarray(written)).tolist()) <= {0, 255}
        assert (tmp_path / "out" / f"{pair.id}_overlay.jpg").exists()


def hand_set_probabilities(model, meta, images_uint8, tta=None):
    """Probability maps that straddle 0.5 inside every image (darker than the image's mean → above 0.5)."""
    grey = images_uint8.float().mean(1, keepdim=True)
    return torch.sigmoid((grey.mean(dim=(2, 3), keepdim=True) - grey) / 8)


def test_written_masks_score_exactly_what_the_evaluation_computes(trained, tiny_data, tmp_path, monkeypatch):
    from isic_utils import predict

    _, run_dir = trained
    monkeypatch.setattr(predict, "predict_probabilities", hand_set_probabilities)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for pair in tiny_data.test.sources:
        (inputs / pair.image.name).write_bytes(pair.image.read_bytes())
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(inputs),
                 "--output", str(tmp_path / "out")]) == 0
    counts = torch.cat([confusion_counts(read_mask(tmp_path / "out" / f"{pair.id}_Segmentation.png").float().unsqueeze(0),
                                         read_mask(pair.mask).float().unsqueeze(0)) for pair in tiny_data.test.sources])
    predicted = counts[:, 0] + counts[:, 1]
    assert (predicted > 0).all() and (counts[:, 2] + counts[:, 3] > 0).all()  # every mask has both classes
    expected = original_size_counts(hand_set_probabilities(None, None, tiny_data.test.images), tiny_data.test)
    assert torch.equal(counts, expected)
    assert summarize(counts) == summarize(expected)


def test_checkpoint_of_another_architecture_is_refused(trained, tmp_path):
    _, run_dir = trained
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["meta"]["decoder"] = "unet"
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointMismatch, match="do not fit a mobilenet_v2 \\+ unet model"):
        load_predictor(tmp_path / "wrong.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        load_predictor(tmp_path / "junk.pt")


def test_empty_input_folder_is_an_error(trained, tmp_path):
    _, run_dir = trained
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 1
