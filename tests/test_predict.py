"""``predict``: a trained checkpoint applied to a folder of images (JPEG, PNG, BMP, TIFF) from the command line,
one 0/255 mask per image at its original size that scores exactly what the evaluation computed, with the run's
test-time flips and post-processing unless told otherwise; masks and overlays in the folder are not inputs."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.data.decoding import read_mask
from isic_utils.data.sources import OVERLAY_COMMENT
from isic_utils.data.transforms import normalize
from isic_utils.model.inference import CheckpointMismatch, predicted_probabilities
from isic_utils.predict import load_predictor, predict_folder
from isic_utils.scoring.metrics import confusion_counts, original_size_counts, postprocess_mask

from .conftest import assert_same_counts


@pytest.fixture
def inputs(tiny_data, tmp_path):
    """The test images as made (JPEG), beside a mask, an overlay and a text file that are not inputs."""
    folder = tmp_path / "in"
    folder.mkdir()
    for pair in tiny_data.test.sources:
        shutil.copy(pair.image, folder / pair.image.name)
    shutil.copy(tiny_data.test.sources[0].mask, folder / tiny_data.test.sources[0].mask.name)
    Image.new("RGB", (40, 30)).save(folder / "old_overlay.jpg", comment=OVERLAY_COMMENT)  # an earlier --overlays
    (folder / "notes.txt").write_text("not an image")
    return folder


def counts_of(folder, tiny_data):
    return torch.cat(
        [
            confusion_counts(
                read_mask(folder / f"{p.id}_Segmentation.png").float().unsqueeze(0),
                read_mask(p.mask).float().unsqueeze(0),
            )
            for p in tiny_data.test.sources
        ]
    )


def test_predict_writes_the_masks_the_evaluation_scored(trained_run, tiny_data, inputs, tmp_path, capsys):
    result, run_dir = trained_run
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--overlays",
            ]
        )
        == 0
    )
    assert f"wrote {len(tiny_data.test)} masks" in capsys.readouterr().out  # not the mask, overlay or text file
    assert sorted(p.name for p in out.glob("*_Segmentation.png")) == sorted(
        f"{p.id}_Segmentation.png" for p in tiny_data.test.sources
    )
    for k, pair in enumerate(tiny_data.test.sources):
        written = Image.open(out / f"{pair.id}_Segmentation.png")
        assert written.size == tiny_data.test.sizes[k]  # the image's own original size
        assert set(np.unique(np.asarray(written)).tolist()) == {0, 255}  # a real prediction: lesion and skin
        assert Image.open(out / f"{pair.id}_overlay.jpg").size == tiny_data.test.sizes[k]
    # the masks score exactly what fit's final scoring computed in memory
    assert_same_counts(counts_of(out, tiny_data), original_size_counts(result.test.probabilities, tiny_data.test))


def test_predict_applies_the_flips_and_post_processing_it_is_asked_for(trained_run, tiny_data, inputs, tmp_path):
    _, run_dir = trained_run
    model, meta = load_predictor(run_dir / "best.pt")
    assert (meta["tta"], meta["postprocess"]) == ("none", "none")  # the run's own: what predict does by default
    for tta in ("none", "flips"):
        for post in ("none", "largest_component"):
            out = tmp_path / f"{tta}-{post}"
            assert (
                main(
                    [
                        "predict",
                        "--checkpoint",
                        str(run_dir / "best.pt"),
                        "--input",
                        str(inputs),
                        "--output",
                        str(out),
                        "--tta",
                        tta,
                        "--postprocess",
                        post,
                    ]
                )
                == 0
            )
            probabilities = predicted_probabilities(model, meta, tiny_data.test.images, tta)
            expected = original_size_counts(probabilities, tiny_data.test, postprocess=post)
            assert_same_counts(counts_of(out, tiny_data), expected)
            for source in tiny_data.test.sources:
                mask = read_mask(out / f"{source.id}_Segmentation.png")[0].bool()
                assert mask.any() and not mask.all()
                if post == "largest_component":  # one lesion, no holes: post-processing again changes nothing
                    assert torch.equal(postprocess_mask(mask, "largest_component"), mask)
    # the flips are the four flips' average, and they change this model's masks
    plain = predicted_probabilities(model, meta, tiny_data.test.images, "none")
    flipped = predicted_probabilities(model, meta, tiny_data.test.images, "flips")
    assert not torch.equal(plain, flipped)
    assert not torch.equal(counts_of(tmp_path / "none-none", tiny_data), counts_of(tmp_path / "flips-none", tiny_data))
    x = normalize(tiny_data.test.images, meta["mean"], meta["std"])
    with torch.inference_mode():
        by_hand = sum(torch.sigmoid(model(x.flip(dims))).flip(dims) for dims in ((), (-1,), (-2,), (-2, -1))) / 4
    assert torch.allclose(flipped, by_hand, atol=1e-5)


def test_predict_post_processes_the_masks_it_writes(trained_run, tiny_data, tmp_path, monkeypatch):
    """Whatever the model predicts, ``--postprocess largest_component`` writes one filled lesion and ``none`` the
    thresholded map as it is. The probabilities are made to hold a lesion with a hole and a speck beside it, so
    the verdict does not hang on how a tiny model's logits round on one CPU at one thread count (it once did:
    4 of 6 masks had holes on an AMX Xeon at one thread, 6 of 6 elsewhere)."""
    _, run_dir = trained_run

    def holed(model, meta, images_uint8, tta=None):
        size = images_uint8.shape[-1]
        y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        radius = ((y - size / 2) ** 2 + (x - size / 2) ** 2).sqrt()
        lesion = (radius < size / 4) & (radius > size / 12)  # a ring: its hole is background inside the lesion
        speck = (y < size // 10) & (x < size // 10)  # a second component in a corner
        probabilities = torch.where(lesion | speck, 0.9, 0.1)
        return probabilities.expand(len(images_uint8), 1, size, size).clone()

    monkeypatch.setattr("isic_utils.predict.predict_probabilities", holed)
    folder = tiny_data.test.sources[0].image.parent
    for post in ("none", "largest_component"):
        assert (
            main(
                [
                    "predict",
                    "--checkpoint",
                    str(run_dir / "best.pt"),
                    "--input",
                    str(folder),
                    "--output",
                    str(tmp_path / post),
                    "--postprocess",
                    post,
                ]
            )
            == 0
        )
    for source in tiny_data.test.sources:
        plain, post = (
            read_mask(tmp_path / kind / f"{source.id}_Segmentation.png")[0].bool()
            for kind in ("none", "largest_component")
        )
        height, width = plain.shape
        assert not plain[height // 2, width // 2] and plain[0, 0]  # as predicted: the hole and the speck
        assert post[height // 2, width // 2] and not post[0, 0]  # filled, and the speck gone
        assert torch.equal(post, postprocess_mask(plain, "largest_component"))


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path):
    _, run_dir = trained_run
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["meta"]["decoder"] = "report"
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointMismatch, match="do not fit a mobilenet_v2 \\+ report model"):
        load_predictor(tmp_path / "wrong.pt")


@pytest.mark.parametrize("key, value", [("encoder", "resnet50"), ("decoder", "fpn")])
def test_a_checkpoint_of_a_model_this_version_cannot_build_is_named(trained_run, tmp_path, key, value):
    _, run_dir = trained_run
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["meta"][key] = value
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatch, match=rf"other\.pt describes a model this version cannot build.*{value}"):
        load_predictor(tmp_path / "other.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        load_predictor(tmp_path / "junk.pt")


def test_empty_input_folder_is_an_error(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    assert "no .jpg/.jpeg/.png/.bmp/.tif images in" in capsys.readouterr().err


def test_predict_folder_returns_one_mask_per_image(trained_run, tiny_data, inputs, tmp_path):
    _, run_dir = trained_run
    written = predict_folder(run_dir / "best.pt", inputs, tmp_path / "out")
    assert [p.name for p in written] == sorted(f"{p.id}_Segmentation.png" for p in tiny_data.test.sources)


def test_png_bmp_and_tiff_inputs_give_the_same_masks(trained_run, tiny_data, tmp_path):
    """The same pixels saved as PNG, BMP and TIFF (lossless) are read alike and predicted alike."""
    _, run_dir = trained_run
    folder = tmp_path / "formats"
    folder.mkdir()
    pairs = tiny_data.test.sources[:2]
    for pair in pairs:
        pixels = Image.open(pair.image).convert("RGB")
        for suffix, kind in (("png", "PNG"), ("bmp", "BMP"), ("tif", "TIFF")):
            pixels.save(folder / f"{pair.id}-{suffix}.{suffix}", format=kind)
    written = predict_folder(run_dir / "best.pt", folder, tmp_path / "out")
    assert len(written) == 6
    for pair in pairs:
        masks = [
            np.asarray(Image.open(tmp_path / "out" / f"{pair.id}-{suffix}_Segmentation.png"))
            for suffix in ("png", "bmp", "tif")
        ]
        assert masks[0].shape[::-1] == Image.open(pair.image).size and set(np.unique(masks[0])) == {0, 255}
        assert all(np.array_equal(masks[0], other) for other in masks[1:])
