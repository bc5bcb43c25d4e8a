"""Another clinic: the general external loader (PH2's layout, other naming rules, bad folders), colour constancy
applied the same way in training, evaluation and predict, test-time flips, post-processing, the new augmentations,
the external chapter's scoring and the options study."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from isic_utils.config import params as P
from isic_utils.config.params import TrainConfig
from isic_utils.data.augmentation import apply_augmentation, draw_augmentation
from isic_utils.data.decoding import decode_pairs, read_mask
from isic_utils.data.sources import EXTERNAL_LAYOUTS, DataError, find_external_pairs
from isic_utils.data.synthetic import make_synthetic_external
from isic_utils.data.transforms import apply_color_constancy, normalize
from isic_utils.model.inference import flip_averaged, load_trained, predicted_probabilities
from isic_utils.model.networks import build_model
from isic_utils.predict import predict_folder
from isic_utils.scoring.metrics import confusion_counts, original_size_counts, postprocess_mask
from isic_utils.training.loop import fit

from .conftest import assert_same_counts, requires

PH2 = EXTERNAL_LAYOUTS["ph2"]


@pytest.fixture(scope="module")
def ph2_like(tmp_path_factory) -> Path:
    return make_synthetic_external(tmp_path_factory.mktemp("ph2"), count=8)


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


# ----------------------------------------------------------------------------- the loader


def test_ph2_layout_with_one_bit_and_rgb_bmp_masks(ph2_like):
    pairs = find_external_pairs(ph2_like, **PH2)
    assert [p.id for p in pairs] == [f"IMD{k:03d}" for k in range(1, 9)]
    modes = {Image.open(p.mask).mode for p in pairs}
    assert modes == {"1", "RGB"}  # both kinds of PH2 mask are there, and both are read
    decoded = decode_pairs(pairs, 64, progress=False)
    for k, pair in enumerate(pairs):
        full = read_mask(pair.mask)
        truth = np.asarray(Image.open(pair.mask).convert("L")) > 127
        assert torch.equal(full[0].bool(), torch.from_numpy(truth))
        assert decoded.sizes[k] == Image.open(pair.image).size
        assert 0 < decoded.masks[k].float().mean() < 1


@requires("PH2_DIR")
@pytest.mark.real_data
def test_the_real_ph2_sample_is_read_as_distributed():
    pairs = find_external_pairs(os.environ["PH2_DIR"], **PH2)
    assert len(pairs) == 50
    decoded = decode_pairs(pairs, 128, progress=False)
    assert {Image.open(p.mask).mode for p in pairs} == {"1", "RGB"}
    assert all(760 <= w <= 768 and 570 <= h <= 576 for w, h in decoded.sizes)
    lesion = decoded.masks.float().mean(dim=(1, 2, 3))
    assert (lesion > 0.02).all() and (lesion < 0.98).all()


def test_other_naming_rules_and_formats(tmp_path):
    same = tmp_path / "same"
    same.mkdir()
    Image.new("RGB", (40, 30), (200, 150, 140)).save(same / "a.tif")
    Image.new("L", (40, 30), 255).save(same / "a_Segmentation.png")
    Image.new("RGB", (40, 30), (190, 140, 130)).save(same / "b.jpeg")
    Image.new("L", (40, 30), 0).save(same / "b_Segmentation.png")
    pairs = find_external_pairs(same, "*", "{stem}_Segmentation.png")
    assert [(p.id, p.mask.name) for p in pairs] == [("a", "a_Segmentation.png"), ("b", "b_Segmentation.png")]

    folders = tmp_path / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "masks").mkdir()
    Image.new("RGB", (20, 20)).save(folders / "images" / "x1.png")
    Image.new("L", (20, 20), 1).save(folders / "masks" / "x1.png")  # {0, 1} labels
    pairs = find_external_pairs(folders, **EXTERNAL_LAYOUTS["masks_folder"])
    assert [p.mask for p in pairs] == [folders / "masks" / "x1.png"]
    assert decode_pairs(pairs, 32, progress=False).masks.all()


def test_a_missing_mask_names_the_image_and_the_expected_path(ph2_like, tmp_path):
    root = _copy(ph2_like, tmp_path)
    gone = root / "PH2 Dataset images" / "IMD003" / "IMD003_lesion" / "IMD003_lesion.bmp"
    gone.unlink()
    with pytest.raises(DataError, match=r"mask missing for .*IMD003\.bmp: expected .*IMD003_lesion\.bmp"):
        find_external_pairs(root, **PH2)


def test_a_mask_of_another_size_is_refused_naming_it(ph2_like, tmp_path):
    root = _copy(ph2_like, tmp_path)
    mask = root / "PH2 Dataset images" / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp"
    Image.open(mask).resize((100, 80)).save(mask, format="BMP")
    pairs = find_external_pairs(root, **PH2)
    with pytest.raises(DataError, match=r"IMD002_lesion\.bmp is 100×80 but its image is"):
        decode_pairs(pairs, 64, progress=False)


def test_no_images_or_no_folder_say_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images .* matching .*Dermoscopic_Image.* under .*empty"):
        find_external_pairs(tmp_path / "empty", **PH2)
    with pytest.raises(DataError, match=r"external data folder .*nowhere not found"):
        find_external_pairs(tmp_path / "nowhere", **PH2)


def test_a_colour_mask_is_refused(ph2_like, tmp_path):
    root = _copy(ph2_like, tmp_path)
    mask = root / "PH2 Dataset images" / "IMD004" / "IMD004_lesion" / "IMD004_lesion.bmp"
    array = np.asarray(Image.open(mask).convert("RGB")).copy()
    array[..., 0] = 255 - array[..., 0]
    Image.fromarray(array).save(mask, format="BMP")
    with pytest.raises(DataError, match=r"IMD004_lesion\.bmp is a colour mask"):
        decode_pairs(find_external_pairs(root, **PH2), 64, progress=False)


def test_the_profile_says_what_is_wrong_with_an_external_set():
    problems = P.check_external(
        [
            {"name": "PH2", "layot": "ph2", "dir": "x"},
            {"dir": "y"},
            {"name": "Z", "layout": "nope", "dir": "z"},
            {"name": "W", "masks": "mask.png", "dir": "w"},
        ]
    )
    text = "\n".join(problems)
    assert "unknown key(s) ['layot'] (did you mean 'layout'?)" in text
    assert "external[1]: name must be a non-empty string" in text
    assert "external[2]: layout must be one of" in text
    assert "external[3]: masks must be a path with {stem}" in text


# ----------------------------------------------------------------------------- colour constancy


def test_shades_of_grey_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = torch.from_numpy(rng.uniform(60, 200, size=(1, 3, 32, 32))).round().to(torch.uint8)
    cast = (scene.double() * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)).round().to(torch.uint8)
    a, b = (apply_color_constancy(x, "shades_of_grey").double() for x in (scene, cast))
    for out in (a, b):  # the illuminant (the channels' Minkowski 6-means) comes out grey
        illuminant = out.pow(6).mean(dim=(0, 2, 3)).pow(1 / 6)
        assert (illuminant.max() - illuminant.min()) / illuminant.mean() < 0.02
    # the same scene under two lamps: the same image, up to its brightness (which colour constancy keeps)
    assert (a / a.mean() - b / b.mean()).abs().mean() < 0.02
    assert (scene / scene.double().mean() - cast / cast.double().mean()).abs().mean() > 0.1  # before: not the same
    assert torch.equal(apply_color_constancy(scene, "none"), scene)
    with pytest.raises(ValueError, match="color_constancy must be one of"):
        apply_color_constancy(scene, "grey_world")


def test_colour_constancy_is_applied_alike_in_training_evaluation_and_predict(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model(encoder_weights=None, freeze_encoder=False)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()) if module.training else None
    )
    config = TrainConfig(
        epochs=1,
        batch_size=32,
        precision="fp32",
        augment=(),
        monitor_test=False,
        color_constancy="shades_of_grey",
        channels_last=False,
    )
    result = fit(model, tiny_data, config, tmp_path / "run", verbose=False)
    hook.remove()
    spec = model.spec
    expected = normalize(apply_color_constancy(tiny_data.train.images, "shades_of_grey"), spec.mean, spec.std)
    plain = normalize(tiny_data.train.images, spec.mean, spec.std)
    trained_on = torch.cat(seen)
    assert len(trained_on) == len(expected)
    for row in trained_on:  # every training input is one of the colour-constant images, none is a raw one
        assert (expected - row).abs().amax(dim=(1, 2, 3)).min() < 1e-5
        assert (plain - row).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    loaded, meta = load_trained(tmp_path / "run" / "best.pt")
    assert meta["color_constancy"] == "shades_of_grey"
    # predict's path (raw images in, the checkpoint's colour constancy applied) gives evaluation's probabilities
    predicted = predicted_probabilities(loaded, meta, tiny_data.test.images)
    assert torch.allclose(predicted, result.test.probabilities, atol=1e-5)
    # and the masks predict writes from the image files are the ones the evaluation scores
    inputs = tmp_path / "in"
    inputs.mkdir()
    for pair in tiny_data.test.sources:
        shutil.copy(pair.image, inputs / pair.image.name)
    predict_folder(tmp_path / "run" / "best.pt", inputs, tmp_path / "out")
    written = torch.cat(
        [
            confusion_counts(
                read_mask(tmp_path / "out" / f"{p.id}_Segmentation.png").float().unsqueeze(0),
                read_mask(p.mask).float().unsqueeze(0),
            )
            for p in tiny_data.test.sources
        ]
    )
    assert_same_counts(written, original_size_counts(result.test.probabilities, tiny_data.test))


# ----------------------------------------------------------------------------- test-time flips, post-processing


def test_flip_tta_equals_the_plain_prediction_for_a_flip_equivariant_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    pointwise = torch.nn.Conv2d(3, 1, 1)  # a 1×1 convolution commutes with flips
    assert torch.allclose(flip_averaged(pointwise, x, "flips"), torch.sigmoid(pointwise(x)), atol=1e-6)
    lopsided = torch.nn.Conv2d(3, 1, 3, padding=1)  # a 3×3 kernel does not: averaging the flips changes it
    assert not torch.allclose(flip_averaged(lopsided, x, "flips"), torch.sigmoid(lopsided(x)), atol=1e-4)
    symmetric = flip_averaged(lopsided, x, "flips")  # ... into a prediction that is itself flip-equivariant
    assert torch.allclose(flip_averaged(lopsided, x.flip(-1), "flips"), symmetric.flip(-1), atol=1e-6)


class _DarkIsLesion(torch.nn.Module):
    """A model that calls dark pixels lesion: logits ±20 by the normalised input's mean over channels."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 20 * torch.tanh(-4 * x.mean(dim=1, keepdim=True)) + self.bias


def test_zoom_box_frames_a_small_lesion_with_context_and_leaves_large_ones():
    from isic_utils.model.inference import ZOOM_CONTEXT, zoom_box

    mask = torch.zeros(300, 400, dtype=torch.bool)
    assert zoom_box(mask) is None  # nothing to zoom on
    mask[140:160, 200:230] = True  # 20 × 30 px lesion
    top, bottom, left, right = zoom_box(mask)
    assert top <= 140 and bottom >= 160 and left <= 200 and right >= 230  # the lesion is inside
    assert (bottom - top) / 300 == pytest.approx((right - left) / 400, abs=0.01)  # the image's aspect ratio
    assert (bottom - top) >= ZOOM_CONTEXT * 20 and (bottom - top) < 300 * 0.8
    edge = torch.zeros(300, 400, dtype=torch.bool)
    edge[0:10, 390:400] = True  # at a corner: the crop stays inside the image
    top, bottom, left, right = zoom_box(edge)
    assert top == 0 and right == 400 and bottom <= 300 and left >= 0
    large = torch.zeros(300, 400, dtype=torch.bool)
    large[50:250, 60:340] = True
    assert zoom_box(large) is None  # a large lesion: no zoom


def test_zoom_recovers_a_small_lesion_the_whole_image_pass_blurs():
    """Coarse-to-fine on a 1 %-of-the-image lesion at a tiny model size: the crop's pass outlines it better than the
    whole image's pass upsampled, and outside the crop the two maps are the same."""
    from isic_utils.model.inference import predicted_probabilities, zoom_box, zoomed_probabilities
    from isic_utils.scoring.metrics import full_size_mask

    model = _DarkIsLesion().eval()
    meta = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "threshold": 0.5}
    yy, xx = torch.meshgrid(torch.arange(300), torch.arange(400), indexing="ij")
    truth = ((yy - 150) ** 2 + (xx - 200) ** 2) < 19**2  # about 1 % of the image
    image = torch.full((3, 300, 400), 220, dtype=torch.uint8)
    image[:, truth] = 40
    small = torch.nn.functional.interpolate(image[None].float(), size=(16, 16), mode="area").round().to(torch.uint8)
    coarse = predicted_probabilities(model, meta, small, "none")
    plain = full_size_mask(coarse, (400, 300))[0, 0]
    zoomed = zoomed_probabilities(model, meta, image, coarse)
    refined = zoomed[0, 0] > 0.5

    def jaccard(mask):
        return float((mask & truth).sum() / (mask | truth).sum())

    assert jaccard(refined) > jaccard(plain) + 0.1
    top, bottom, left, right = zoom_box(plain)
    outside = torch.ones_like(truth)
    outside[top:bottom, left:right] = False
    upsampled = torch.nn.functional.interpolate(coarse, size=(300, 400), mode="bilinear", align_corners=False)
    assert torch.equal(zoomed[0, 0][outside], upsampled[0, 0][outside])


def test_largest_component_keeps_one_lesion_and_fills_its_holes():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[1:7, 1:7] = True  # the lesion, with a hole
    mask[3:5, 3:5] = False
    mask[9:11, 9:11] = True  # a speck elsewhere
    mask[7, 7] = True  # touches the lesion only at a corner: 8-connected, so part of it
    out = postprocess_mask(mask, "largest_component")
    expected = torch.zeros_like(mask)
    expected[1:7, 1:7] = True
    expected[7, 7] = True
    assert torch.equal(out, expected)
    assert torch.equal(postprocess_mask(mask, "none"), mask)
    empty = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    assert torch.equal(postprocess_mask(empty, "largest_component"), empty)


# ----------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("name", ["scale_rotate", "zoom_out", "shrink_on_skin", "color_strong"])
def test_new_augmentations_move_image_and_mask_together(tiny_data, name):
    masks = tiny_data.train.masks[:6]
    images = (masks * 255).expand(-1, 3, -1, -1).contiguous()  # an image that is its own mask
    draws = draw_augmentation(6, [name], torch.Generator().manual_seed(1))
    moved, moved_masks = apply_augmentation(images, masks, draws)
    assert moved.dtype == torch.uint8 and moved_masks.dtype == torch.uint8
    assert set(moved_masks.unique().tolist()) <= {0, 1}
    if name in ("scale_rotate", "zoom_out", "shrink_on_skin"):
        agree = ((moved[:, :1] > 127) == moved_masks.bool()).float().mean()
        assert agree > 0.97 and not torch.equal(moved_masks, masks)
    else:
        assert torch.equal(moved_masks, masks) and not torch.equal(moved, images)


def test_zoom_out_shrinks_the_lesion_into_a_black_frame():
    """The zoom-out augmentation (small lesions): a chosen image is the whole image shrunk by its scale, its lesion's
    area by the scale squared, the frame around it black and background; an image not chosen is left as it was."""
    from isic_utils.data.augmentation import ZOOM_OUT

    size = 64
    masks = torch.zeros(4, 1, size, size, dtype=torch.uint8)
    masks[:, :, 16:48, 16:48] = 1  # a square lesion of a quarter of the frame
    images = torch.full((4, 3, size, size), 200, dtype=torch.uint8)
    images[masks.expand(-1, 3, -1, -1).bool()] = 60
    scale = torch.tensor([0.5, 0.75, 1.0, 0.5])
    low, high = ZOOM_OUT["scale"]
    u = torch.stack(
        [torch.tensor([0.0, 0.0, 0.0, 0.99]), (scale - low) / (high - low), torch.rand(4), torch.rand(4)], 1
    )
    moved, moved_masks = apply_augmentation(images, masks, {"zoom_out": u})
    area = moved_masks.flatten(1).sum(1).float() / masks.flatten(1).sum(1)
    assert torch.allclose(area[:3], scale[:3] ** 2, atol=0.05), area
    assert torch.equal(moved[3], images[3]) and torch.equal(moved_masks[3], masks[3])  # not chosen
    shrunk = moved[0, 0]
    assert (shrunk == 0).float().mean() == pytest.approx(0.75, abs=0.05)  # a half-size image: 3/4 of it black
    assert ((shrunk == 60) == moved_masks[0, 0].bool()).float().mean() > 0.99


def test_shrink_on_skin_sets_the_shrunk_lesion_on_the_images_own_skin():
    """The shrink-on-skin augmentation (small lesions, no frame): a chosen image is shrunk by its scale (its lesion's
    area by the scale squared) onto a field of its own skin colour (the median outside the lesion; the texture
    only adds brightness around it), never black; an image not chosen is left as it was; the draws are the seed's."""
    from isic_utils.data.augmentation import SHRINK_ON_SKIN

    size = 64
    masks = torch.zeros(4, 1, size, size, dtype=torch.uint8)
    masks[:, :, 16:48, 16:48] = 1  # a square lesion of a quarter of the frame
    skin, lesion = torch.tensor([200, 150, 120], dtype=torch.uint8), torch.tensor([60, 30, 20], dtype=torch.uint8)
    images = skin.view(1, 3, 1, 1).repeat(4, 1, size, size)
    images[:, :, 16:48, 16:48] = lesion.view(1, 3, 1, 1)
    scale = torch.tensor([0.5, 0.25, 1.0, 0.5])
    low, high = SHRINK_ON_SKIN["scale"]
    u = torch.stack(
        [torch.tensor([0.0, 0.0, 0.0, 0.99]), (scale - low) / (high - low), torch.rand(4), torch.rand(4)], 1
    )
    flat = torch.zeros(4, 1, 8, 8)
    moved, moved_masks = apply_augmentation(images, masks, {"shrink_on_skin": u, "skin_texture": flat})
    area = moved_masks.flatten(1).sum(1).float() / masks.flatten(1).sum(1)
    assert torch.allclose(area[:3], scale[:3] ** 2, atol=0.06), area
    assert torch.equal(moved[3], images[3]) and torch.equal(moved_masks[3], masks[3])  # not chosen
    for k in (0, 1):  # around the lesion: the skin's own colour, not a black frame
        around = moved[k].flatten(1)[:, ~moved_masks[k].flatten().bool()]
        assert (around == skin.view(3, 1)).all(0).float().mean() > 0.9
        inside = moved[k].flatten(1)[:, moved_masks[k].flatten().bool()]
        assert (inside.float() - lesion.view(3, 1)).abs().amax(0).float().median() < 30
    textured, _ = apply_augmentation(images, masks, {"shrink_on_skin": u, "skin_texture": torch.randn(4, 1, 8, 8)})
    assert not torch.equal(textured[0], moved[0]) and torch.equal(textured[3], images[3])
    first, second = (draw_augmentation(4, ["shrink_on_skin"], torch.Generator().manual_seed(5)) for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in ("shrink_on_skin", "skin_texture"))


# ----------------------------------------------------------------------------- the chapter and the study


@pytest.fixture(scope="module")
def tiny_task1(tmp_path_factory, synthetic_root):
    """task1 trained one epoch on the tiny profile (post-processing on), in a folder of its own."""
    from isic_utils.training.experiments import prepare_data, train_run

    base = tmp_path_factory.mktemp("tiny-task1")
    root = P.project_root(Path(__file__).parent)
    overrides = {"output_dir": str(base / "out"), "data_dir": str(synthetic_root)}
    train = P.resolve(
        "train",
        root / "params" / "task1.yaml",
        "tiny",
        {**overrides, "epochs": 1, "postprocess": "largest_component"},
        root,
    )
    train_run(train, prepare_data(train, progress=False), verbose=False)
    return base, overrides, root


def test_external_scores_equal_a_by_hand_scoring(tiny_task1):
    """The chapter's per-image table for a run equals scoring the run's checkpoint on the set by hand."""
    from isic_utils.evaluation.external import external_sets, halves, load_external, validate_external

    base, overrides, root = tiny_task1
    chapter = P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root)
    result = validate_external(chapter, ["task1"], base / "out" / "external")
    (other,) = external_sets(chapter)
    split, left_out = load_external(other, 64)
    assert left_out == 0
    model, meta = load_trained(base / "out" / "task1" / "seed0" / "best.pt")
    by_hand = original_size_counts(
        predicted_probabilities(model, meta, split.images, "none"), split, postprocess="largest_component"
    )
    table = pd.read_csv(base / "out" / "external" / "tables" / f"per_image_{other.name}_task1_seed0.csv")
    assert table[["tp", "fp", "fn", "tn"]].to_numpy().tolist() == by_hand.tolist()
    gap = result.gap.iloc[0]
    assert gap["JA gap"] == pytest.approx(gap["JA on the set"] - gap["JA ISIC test"])
    # the reporting half: the same per-image rows, only the half no choice looks at
    half = result.gap.set_index("external set").loc[f"{other.name}, reporting half"]
    reporting = halves(list(table["id"]))[1]
    assert half["images"] == len(reporting) == len(table) // 2
    assert half["JA on the set"] == pytest.approx(table[table["id"].isin(reporting)]["iou"].mean())
    options = result.options
    assert len(options) == 12 and set(options["data"]) == {"validation", other.name}  # 2 splits × 6 options
    assert options[options["the run's own scoring"]]["largest component"].all()


def test_every_inference_option_scores_as_by_hand_at_four_passes_and_one_zoom_per_image(tiny_task1, monkeypatch):
    """Scoring a run on a split with every inference option gives what each option gives by hand, and runs the
    model four times per image (the flips; no-flips is their identity pass) and zooms each image once for both
    post-processings: scoring was 20 minutes of the options study on the later releases."""
    from isic_utils.data.decoding import read_image
    from isic_utils.evaluation import external as E
    from isic_utils.model.inference import zoomed_probabilities
    from isic_utils.training.experiments import load_run

    base, overrides, root = tiny_task1
    chapter = P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root)
    (other,) = E.external_sets(chapter)
    split, _ = E.load_external(other, 64)
    passes, zooms = [], []

    def counted_model(path):
        model, meta = load_trained(path)
        model.register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
        return model, meta

    def counted_zoom(model, meta, image, coarse):
        before = sum(passes)
        zoomed = zoomed_probabilities(model, meta, image, coarse)
        zooms.append(sum(passes) - before)  # the crop's pass, if the lesion was small enough to zoom on
        return zoomed

    monkeypatch.setattr(E, "load_trained", counted_model)
    monkeypatch.setattr(E, "zoomed_probabilities", counted_zoom)
    run = load_run(base / "out", "task1")
    scored = E.score_split(run, split, other.name)
    seeds = len(run.seeds)
    assert len(zooms) == seeds * len(split) and set(zooms) <= {0, 1}
    assert sum(passes) - sum(zooms) == seeds * 4 * len(split)
    model, meta = load_trained(base / "out" / "task1" / "seed0" / "best.pt")
    for tta, post in E.INFERENCE_OPTIONS:
        maps = predicted_probabilities(model, meta, split.images, "flips" if tta == "flips" else "none")

        def zoom(k, coarse):
            return zoomed_probabilities(model, meta, read_image(split.sources[k].image)[0], coarse)

        by_hand = original_size_counts([maps], split, postprocess=[post], refine=[zoom if tta == "zoom" else None])[0]
        table = scored.tables[(0, tta, post)]
        assert table[["tp", "fp", "fn", "tn"]].to_numpy().tolist() == by_hand.tolist(), (tta, post)
    # asked for plain scoring alone (a training option's run in the options study): one pass per image, no zoom,
    # and the same plain tables
    passes.clear(), zooms.clear()
    plain = E.score_split(run, split, other.name, E.PLAIN)
    assert plain.options == [o for o in E.INFERENCE_OPTIONS if o in (("none", "none"), plain.own)]  # and its own
    assert sum(passes) == seeds * len(split) and zooms == []
    for key, table in plain.tables.items():
        pd.testing.assert_frame_equal(table, scored.tables[key])


def test_a_checkpoint_scored_once_is_read_back_while_it_and_the_images_are_the_same(tiny_task1, tmp_path, monkeypatch):
    """The score store (the options study's): a second scoring of the same checkpoints on the same images loads no
    model and gives the same tables, to the dtype; another split or a changed checkpoint is scored again."""
    from isic_utils.evaluation import external as E
    from isic_utils.training.experiments import load_run

    base, overrides, root = tiny_task1
    chapter = P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root)
    (other,) = E.external_sets(chapter)
    split, _ = E.load_external(other, 64)
    run = load_run(base / "out", "task1")
    run.run_dir = shutil.copytree(run.run_dir, tmp_path / "task1")  # a copy whose checkpoint this test may change
    loads = []

    def counted(path):
        loads.append(path)
        return load_trained(path)

    monkeypatch.setattr(E, "load_trained", counted)
    store = tmp_path / "scores"
    first = E.score_split(run, split, other.name, store=store)
    assert len(loads) == len(run.seeds) and first.read_back == []
    again = E.score_split(run, split, other.name, store=store)
    assert len(loads) == len(run.seeds) and again.read_back == list(run.seeds["seed"])  # no model loaded
    assert again.calibrations == first.calibrations and again.options == first.options
    for key, table in first.tables.items():
        pd.testing.assert_frame_equal(again.tables[key], table)
    # other images: scored again
    fewer = split.subset(split.ids[:-1])
    assert E.score_split(run, fewer, other.name, store=store).read_back == [] and len(loads) == 2 * len(run.seeds)
    # a checkpoint retrained (here: one weight moved): scored again, and its new scores are what is stored
    best = run.run_dir / "seed0" / "best.pt"
    state = torch.load(best, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] += 0.5
    torch.save(state, best)
    moved = E.score_split(run, split, other.name, store=store)
    assert moved.read_back == [] and len(loads) == 3 * len(run.seeds)
    assert E.score_split(run, split, other.name, store=store).read_back == [0]
    # the same files copied elsewhere, written later (a data folder provisioned anew): read back
    copies = []
    for k, pair in enumerate(split.sources):
        image, mask = tmp_path / "copy" / f"{k}{pair.image.suffix}", tmp_path / "copy" / f"{k}_mask{pair.mask.suffix}"
        image.parent.mkdir(exist_ok=True)
        shutil.copyfile(pair.image, image)
        shutil.copyfile(pair.mask, mask)
        copies.append(dataclasses.replace(pair, image=image, mask=mask))
    copied = dataclasses.replace(split, sources=copies)
    assert E.score_split(run, copied, other.name, store=store).read_back == list(run.seeds["seed"])
    # one of those files edited: scored again
    copies[0].mask.write_bytes(copies[0].mask.read_bytes() + b"\0")
    assert E.score_split(run, copied, other.name, store=store).read_back == []
    # another version of the scoring code: scored again
    monkeypatch.setattr(E, "scoring_code", lambda: b"other code")
    assert E.score_split(run, split, other.name, store=store).read_back == []


def test_a_stored_score_is_keyed_by_the_code_that_scores_and_not_by_the_augmentations(tmp_path, monkeypatch):
    """A change to colour constancy or the metrics changes the code digest a stored score is keyed by (scored
    again); a change to an augmentation, which only training runs, does not (every run's scores read back, not the
    whole study scored again because one augmentation was tuned)."""
    from isic_utils.data import augmentation, transforms
    from isic_utils.evaluation import external as E
    from isic_utils.scoring import metrics as M

    before = E.scoring_code.__wrapped__()
    for module, changes in ((augmentation, False), (transforms, True), (M, True)):
        changed = tmp_path / Path(module.__file__).name
        changed.write_bytes(Path(module.__file__).read_bytes() + b"\n# changed\n")
        monkeypatch.setattr(module, "__file__", str(changed))
        assert (E.scoring_code.__wrapped__() != before) is changes, module.__name__
        monkeypatch.undo()
    # the training choices (losses, schedules, averages, mixing) live with the parameters, not in the scored code
    assert not any(hasattr(M, name) for name in ("LOSSES", "LR_SCHEDULES", "WEIGHT_AVERAGES", "STYLE_MIXINGS"))


def test_the_options_study_keeps_every_option_measured_over_calls(tmp_path):
    """`options --only A`, then `--only B` (one option at a time, as on a CPU): the table holds the base, A and B,
    A's row and the base's as the first call measured them (their scores read back, not recomputed); a run in the
    folder trained with other parameters (here: another number of epochs) is left out, and the line says how to
    train it as the study does."""
    from isic_utils.evaluation.generalisation import options_study

    values = {"output_dir": str(tmp_path), "seeds": [0]}
    first = options_study("tiny", 1, values, echo=[].append, only=["256 px"])
    lines = []
    second = options_study("tiny", 1, values, echo=lines.append, only=["weight average"])
    assert list(second["option"])[:3] == ["base", "weight average", "256 px"]
    kept = ["base", "256 px", "test-time flips", "largest component", "zoom (coarse-to-fine)"]
    pd.testing.assert_frame_equal(
        second.set_index("option").loc[kept].drop(columns="chosen"),
        first.set_index("option").loc[kept].drop(columns="chosen"),
    )
    read_back = [line for line in lines if "read back" in line]
    assert {line.split()[1] for line in read_back} == {"base", "256_px"} and len(read_back) == 4  # validation, set
    # an augmentation constant tuned in place since (the study's base augments with colour jitter): the runs trained
    # before are no longer the study's, and the line says why
    from isic_utils.data import augmentation
    from isic_utils.evaluation.generalisation import measured_before

    lines.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(augmentation, "COLOR_JITTER", 0.3)
        assert measured_before("tiny", 1, values, None, {}, lines.append) == {}
    assert any(
        "(weight_average) is in the study's folder but left out of the table: it was trained with other augmentation "
        "constants than data/augmentation.py's now ({'color_jitter': 0.2}, now {'color_jitter': 0.3})" in line
        for line in lines
    ), lines
    assert set(measured_before("tiny", 1, values, None, {}, print)) == {"base", "256 px", "weight average"}
    lines.clear()
    third = options_study("tiny", 2, values, echo=lines.append, only=["base"])
    assert list(third["option"])[:2] == ["base", "test-time flips"]
    for run in ("weight_average", "256_px"):
        assert any(
            f"({run}) is in the study's folder but left out of the table: it was trained with other parameters than "
            "the study's now (epochs 1, the study's 2)"
            in line
            and f"--only {run} trains it as the study does" in line
            for line in lines
        ), lines


def test_two_runs_compared_seed_for_seed_on_every_split_and_half(tiny_task1):
    """tools/compare_runs.py: a run against itself differs by exactly 0 everywhere, and its whole-set JA is the
    one chapter 3 reports for it."""
    import importlib.util

    from isic_utils.evaluation.external import validate_external

    spec = importlib.util.spec_from_file_location("compare_runs", P.project_root() / "tools" / "compare_runs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base, overrides, root = tiny_task1
    chapter = P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root)
    out = str(base / "out")
    table = tool.compare(out, out, "task1", chapter).set_index("split")
    assert list(table.index) == [
        "ISIC test",
        "validation",
        "other-clinic",
        "other-clinic, choosing half",
        "other-clinic, reporting half",
    ]
    assert (table["B − A"] == 0).all() and (table["JA A"] == table["JA B"]).all()
    result = validate_external(chapter, ["task1"], base / "out" / "compare-check")
    whole = result.table.set_index("data").loc["other-clinic", "JA"]
    assert table.loc["other-clinic", "JA A"] == pytest.approx(whole)


def test_a_missing_external_folder_is_skipped_with_where_to_get_it(tiny_task1, tmp_path, monkeypatch):
    from isic_utils.evaluation.external import external_reading, external_sets, validate_external
    from isic_utils.report import tables as report

    base, overrides, root = tiny_task1
    monkeypatch.setenv("PH2_DIR", str(tmp_path / "no-ph2"))
    monkeypatch.setenv("ISIC_LATER_DIR", str(tmp_path / "no-later"))
    values = P.resolve("external", None, "isic2016_holdout", None, root)
    ph2, later = external_sets(values)
    assert ph2.root == tmp_path / "no-ph2" and not ph2.found and not later.found
    assert "fc.up.pt" in ph2.missing_note() and "skipped" in ph2.missing_note()
    assert (
        str(tmp_path) not in ph2.missing_note() and "$PH2_DIR names no folder (…/no-ph2)" in ph2.missing_note()
    )  # no machine path
    assert "point $PH2_DIR at it" in ph2.missing_note()
    monkeypatch.delenv("PH2_DIR")
    default = external_sets(values)[0]
    assert "no folder data/PH2;" in default.missing_note() and str(root) not in default.missing_note()
    monkeypatch.setenv("PH2_DIR", str(tmp_path / "no-ph2"))
    # the chapter still runs: validation scored, the set named as skipped, an empty gap table the index can read
    chapter = {
        **P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root),
        "external": values["external"],
    }
    out = base / "out" / "external-missing"
    result = validate_external(chapter, ["task1"], out)
    assert result.gap.empty and set(result.options["data"]) == {"validation"}
    assert "no-ph2" in external_reading(result)
    if (base / "out" / "external").exists():  # another test's chapter folder
        (base / "out" / "external").rename(base / "out" / "external-kept")
    out.rename(base / "out" / "external")
    assert report.chapter_finding(base / "out", "external", "external").startswith("no external set was found")


def test_an_external_set_holding_the_runs_own_images_leaves_them_out_and_says_so(tiny_task1, synthetic_root, tmp_path):
    """A later release holds earlier ones' images (ISIC 2018's training archive holds ISIC 2016's): chapter 3 scores a
    set only on the ids the runs never saw, says how many it left out, and skips a set with nothing left."""
    from isic_utils.data.sources import RELEASES, SPLIT_FOLDERS
    from isic_utils.evaluation.external import external_reading, validate_external

    base, overrides, root = tiny_task1
    later = tmp_path / "later"
    images, masks = RELEASES["isic2018"].folders["train"]
    (later / images).mkdir(parents=True)
    (later / masks).mkdir()
    seen = sorted((synthetic_root / SPLIT_FOLDERS["train"][0]).glob("ISIC_*.jpg"))[:2]
    for k, image in enumerate([*seen, seen[0]]):
        name = image.stem if k < 2 else "ISIC_9999999"  # two images the run trained on, one it never saw
        shutil.copy(image, later / images / f"{name}.jpg")
        mask = synthetic_root / SPLIT_FOLDERS["train"][1] / f"{image.stem}_Segmentation.png"
        shutil.copy(mask, later / masks / f"{name}_segmentation.png")
    chapter = {
        **P.resolve("external", None, "tiny", {**overrides, "runs": ["task1"]}, root),
        "external": [
            {"name": "later", "layout": "isic2018_train", "dir": str(later)},
            {"name": "the same images", "layout": "isic2016_train", "dir": str(synthetic_root)},
        ],
    }
    result = validate_external(chapter, ["task1"], base / "out" / "external-overlap")
    assert list(result.gap["external set"]) == ["later", "later, reporting half"]
    assert int(result.gap["images"].iloc[0]) == 1
    reading = external_reading(result)
    assert "later: 2 of its 3 images are in the runs' own data" in reading and "scored on the other 1" in reading
    assert "the same images: all its" in reading and "the set is skipped" in reading


def test_figures_show_the_masks_the_scores_come_from():
    """A run scored with post-processing is drawn post-processed: no speck in a figure that the scoring removed."""
    from isic_utils.report.plots import as_scored

    probabilities = torch.zeros(1, 1, 8, 8)
    probabilities[0, 0, 1:4, 1:4] = 0.9
    probabilities[0, 0, 6, 6] = 0.9
    drawn = as_scored(probabilities, {"postprocess": "largest_component"})
    assert drawn[0, 0, 6, 6] == 0 and drawn[0, 0, 2, 2] == 1
    assert as_scored(probabilities, {"postprocess": "none"}) is probabilities


def test_the_index_reads_a_gap_table_of_an_earlier_version(tmp_path):
    """An index rewritten after one chapter reran (``--only task3``) reads chapter 3's gap table as that chapter last
    wrote it: before the reporting halves, a set's scores sat in columns named after it (found by rerunning the
    development report)."""
    from isic_utils.report import tables as report

    tables = tmp_path / "external" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame(
        [
            {
                "run": "task3",
                "external set": "PH2",
                "images": 50,
                "JA ISIC test": 0.859,
                "JA PH2": 0.816,
                "JA gap": -0.043,
            }
        ]
    ).to_csv(tables / "gap.csv", index=False)
    finding = report.chapter_finding(tmp_path, "external", "external")
    assert "task3 JA 0.816 on PH2 vs 0.859 on the ISIC test set (-0.043)" in finding
