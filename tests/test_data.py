"""Finding, decoding, caching and splitting; the bad-input corpus (each case an error naming the file and the
fix, or a documented conversion — see the policy in isic_utils/data.py)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isic_utils.data import decoding, eda, pictures, sources
from isic_utils.data import splits as D

TRAIN_IMAGES, TRAIN_MASKS = sources.SPLIT_FOLDERS["train"]


def make_root(tmp_path: Path, count: int = 3, size=(40, 30)) -> Path:
    root = tmp_path / "isic"
    (root / TRAIN_IMAGES).mkdir(parents=True)
    (root / TRAIN_MASKS).mkdir(parents=True)
    for k in range(count):
        write_pair(root, f"ISIC_{k:07d}", size)
    return root


def write_pair(root, image_id, size=(40, 30), image=None, mask=None):
    width, height = size
    if image is None:
        image = Image.fromarray(np.full((height, width, 3), 150, np.uint8))
    if mask is None:
        array = np.zeros((height, width), np.uint8)
        array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        mask = Image.fromarray(array)
    image.save(root / TRAIN_IMAGES / f"{image_id}.jpg", format="JPEG") if image.mode in (
        "RGB",
        "L",
        "CMYK",
    ) else image.save(root / TRAIN_IMAGES / f"{image_id}.png")
    mask.save(root / TRAIN_MASKS / f"{image_id}_Segmentation.png")


# ----------------------------------------------------------------------------- finding files


def test_pairs_by_id_and_ignores_strays(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_IMAGES / ".DS_Store").write_bytes(b"x")
    Image.new("RGB", (4, 4)).save(root / TRAIN_IMAGES / "ISIC_0000000_superpixels.png")
    (root / TRAIN_MASKS / "notes.txt").write_text("x")
    (root / "__MACOSX").mkdir()
    pairs = sources.find_pairs(root, "train")
    assert [p.id for p in pairs] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert pairs[0].mask.name == "ISIC_0000000_Segmentation.png"


def test_image_without_mask(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_MASKS / "ISIC_0000001_Segmentation.png").unlink()
    with pytest.raises(
        sources.DataError, match=r"mask missing for ISIC_0000001 .*expected ISIC_0000001_Segmentation\.png"
    ):
        sources.find_pairs(root, "train")


def test_mask_without_image(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_IMAGES / "ISIC_0000002.jpg").unlink()
    with pytest.raises(sources.DataError, match=r"image missing for mask ISIC_0000002_Segmentation\.png"):
        sources.find_pairs(root, "train")


def test_duplicate_ids(tmp_path):
    root = make_root(tmp_path)
    Image.new("RGB", (40, 30)).save(root / TRAIN_IMAGES / "ISIC_0000001.png")
    with pytest.raises(sources.DataError, match="duplicate id ISIC_0000001"):
        sources.find_pairs(root, "train")


def test_missing_split_folder(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(
        sources.DataError, match=r"ISBI2016_ISIC_Part1_Test_Data not found.*found \['ISBI2016_ISIC_Part1_Training"
    ):
        sources.find_pairs(root, "test")


def test_wrongly_named_split_folder(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_IMAGES).rename(root / "Training_Data")
    with pytest.raises(sources.DataError, match="Training_Data"):
        sources.find_pairs(root, "train")


def test_empty_folder(tmp_path):
    root = make_root(tmp_path, count=0)
    with pytest.raises(sources.DataError, match="no ISIC_<id>.jpg images"):
        sources.find_pairs(root, "train")


# ----------------------------------------------------------------------------- decoding: errors


def decode_one(root):
    return decoding.decode_pairs(sources.find_pairs(root, "train"), 32, progress=False)


def test_truncated_jpeg(tmp_path):
    root = make_root(tmp_path)
    path = root / TRAIN_IMAGES / "ISIC_0000001.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(sources.DataError, match=r"ISIC_0000001\.jpg cannot be decoded.*Replace it"):
        decode_one(root)


def test_zero_byte_file(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_IMAGES / "ISIC_0000000.jpg").write_bytes(b"")
    with pytest.raises(sources.DataError, match=r"ISIC_0000000\.jpg is empty \(0 bytes\)"):
        decode_one(root)


def test_not_an_image(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_IMAGES / "ISIC_0000002.jpg").write_text("<html>not an image</html>")
    with pytest.raises(sources.DataError, match=r"ISIC_0000002\.jpg cannot be decoded"):
        decode_one(root)


def test_zero_byte_mask(tmp_path):
    root = make_root(tmp_path)
    (root / TRAIN_MASKS / "ISIC_0000000_Segmentation.png").write_bytes(b"")
    with pytest.raises(sources.DataError, match=r"ISIC_0000000_Segmentation\.png is empty"):
        decode_one(root)


def test_unreadable_file(tmp_path, monkeypatch):
    # the tests run as root in CI, where chmod 000 does not stop reading: simulate the OS refusing the file
    root = make_root(tmp_path)
    blocked = root / TRAIN_IMAGES / "ISIC_0000001.jpg"
    real_open = Image.open

    def guarded(path, *args, **kwargs):
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(decoding.Image, "open", guarded)
    with pytest.raises(sources.DataError, match=r"ISIC_0000001\.jpg: permission denied.*chmod"):
        decode_one(root)


def test_mask_of_another_size(tmp_path):
    root = make_root(tmp_path)
    Image.new("L", (20, 20)).save(root / TRAIN_MASKS / "ISIC_0000001_Segmentation.png")
    with pytest.raises(sources.DataError, match=r"ISIC_0000001_Segmentation\.png is 20×20 but its image is 40×30"):
        decode_one(root)


def test_colour_mask_is_refused(tmp_path):
    root = make_root(tmp_path)
    array = np.zeros((30, 40, 3), np.uint8)
    array[5:20, 5:20] = (255, 0, 0)
    Image.fromarray(array).save(root / TRAIN_MASKS / "ISIC_0000000_Segmentation.png")
    with pytest.raises(sources.DataError, match="colour mask"):
        decode_one(root)


# ----------------------------------------------------------------------------- decoding: conversions


def test_mask_conversions(tmp_path):
    base = np.zeros((30, 40), np.uint8)
    base[8:22, 10:30] = 1
    expected = torch.from_numpy(base).unsqueeze(0)
    cases = {
        "0_255": Image.fromarray(base * 255),
        "0_1": Image.fromarray(base),
        "rgb_equal": Image.fromarray(np.stack([base * 255] * 3, -1)),
        "16bit": Image.fromarray(base.astype(np.uint16) * 65535),
        "palette": Image.fromarray(base * 255).convert("P"),
    }
    for name, mask in cases.items():
        path = tmp_path / f"{name}.png"
        mask.save(path)
        assert torch.equal(decoding.read_mask(path), expected), name
    # anti-aliased edge: grey values go to the nearer class
    soft = (base * 255).astype(np.uint8)
    soft[7, 10:30] = 100
    soft[22, 10:30] = 200
    path = tmp_path / "soft.png"
    Image.fromarray(soft).save(path)
    result = decoding.read_mask(path)[0]
    assert result[7].sum() == 0 and result[22].sum() == 20


def test_image_mode_conversions(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "grey.jpg": (Image.fromarray(np.full((30, 40), 90, np.uint8)), (90, 90, 90)),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), (200, 0, 0)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)]), "RGBA"), (200, 0, 0)),
        "grey16.png": (Image.fromarray(np.full((30, 40), 65535 // 2, np.uint16)), (127, 127, 127)),
    }
    for name, (image, colour) in cases.items():
        path = tmp_path / name
        image.save(path)
        tensor, size = decoding.read_image(path, 32)
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8, name
        assert size == (40, 30), name
        assert tensor[:, 16, 16].tolist() == pytest.approx(list(colour), abs=3), name


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((30, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white as stored
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    tensor, size = decoding.read_image(path, None)
    assert size == (30, 40) and tensor.shape == (3, 40, 30)
    assert tensor[:, :20].float().mean() > 200 and tensor[:, 20:].float().mean() < 50  # white now on top


def test_exif_rotated_pair_decodes_when_mask_is_drawn_on_the_displayed_image(tmp_path):
    root = make_root(tmp_path, count=0)
    image = Image.fromarray(np.full((30, 40, 3), 100, np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(root / TRAIN_IMAGES / "ISIC_0000009.jpg", exif=exif.tobytes())
    Image.new("L", (30, 40), 255).save(root / TRAIN_MASKS / "ISIC_0000009_Segmentation.png")
    decoded = decode_one(root)
    assert decoded.sizes == [(30, 40)]


def test_masks_are_resized_nearest_and_stay_binary(tmp_path):
    mask = np.zeros((300, 400), np.uint8)
    mask[::2] = 255  # a pattern bilinear resizing would turn grey
    path = tmp_path / "stripes.png"
    Image.fromarray(mask).save(path)
    resized = decoding.read_mask(path, 64)
    assert resized.shape == (1, 64, 64)
    assert set(resized.unique().tolist()) <= {0, 1}


def test_real_size_jpeg_decodes_to_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (767, 1022, 3), dtype=np.uint8)).save(path)
    tensor, size = decoding.read_image(path, 128)
    assert tensor.shape == (3, 128, 128) and size == (1022, 767)


# ----------------------------------------------------------------------------- cache, splits, dataset


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_root(tmp_path)
    pairs = sources.find_pairs(root, "train")
    first = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    monkeypatch.setattr(decoding, "_decode_pair", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    second = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    assert torch.equal(first.images, second.images) and first.sizes == second.sizes
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another cache entry
        decoding.decode_pairs(pairs, 64, tmp_path / "cache", progress=False)


def test_split_sizes_and_seed():
    ids = [f"ISIC_{k:07d}" for k in range(900)]
    train, val = D.split_ids(ids, 0.2, seed=0)
    assert (len(train), len(val)) == (720, 180)
    assert not set(train) & set(val)
    assert D.split_ids(ids, 0.2, seed=0) == (train, val)
    assert D.split_ids(ids, 0.2, seed=1) != (train, val)


def test_load_report_data_holdout(synthetic_root, tmp_path):
    data = D.load_report_data(synthetic_root, 32, test_split="holdout", holdout_fraction=0.25, progress=False)
    assert data.counts() == {"train": 12, "validation": 3, "test": 5}
    assert not set(data.test.ids) & set(data.train.ids + data.val.ids)
    assert "held-out" in data.test_source


def test_pixel_stats_and_alignment(tiny_data):
    stats = eda.pixel_stats(tiny_data.train.images)
    assert all(0 < m < 1 for m in stats["mean"]) and all(0 < s < 0.5 for s in stats["std"])
    table = eda.check_alignment(tiny_data.train)
    assert table["mask_named_for_image"].all()
    assert (table["lesion_fraction"] > 0).all() and table["lesion_darker_than_skin"].all()


def test_wide_and_float_grey_values_are_scaled_not_wrapped(tmp_path):
    """A 32-bit value of 70000 once became 16 (wrapped past 255); a float TIFF in [0, 1] became black."""
    cases = {
        "int32.tif": (np.array([[0, 70000], [140000, 2**31 - 1]], np.int32), [0, 0, 0, 127]),
        "float01.tif": (np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), [0, 128, 255, 64]),
        "grey16.png": (np.array([[0, 65535], [32768, 255]], np.uint16), [0, 255, 128, 1]),
    }
    for name, (array, expected) in cases.items():
        Image.fromarray(array).save(tmp_path / name)
        tensor, _ = decoding.read_image(tmp_path / name)
        assert tensor[0].flatten().tolist() == expected, name
    assert pictures.to_8bit(np.array([-5, 300], np.int32)).tolist() == [0, 1]  # negatives to 0, never wrapped


def test_a_cmyk_mask_is_refused_naming_it(tmp_path):
    mask = Image.fromarray(np.zeros((30, 40, 3), np.uint8)).convert("CMYK")
    mask.save(tmp_path / "m.jpg")
    with pytest.raises(sources.DataError, match=r"m\.jpg is a CMYK image; masks must be single-channel"):
        decoding.read_mask(tmp_path / "m.jpg")


def test_an_image_past_pillows_safety_limit_is_a_clear_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "huge.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "huge_mask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,200 pixels is then a "decompression bomb"
    with pytest.raises(sources.DataError, match=r"huge\.png is larger than Pillow's safety limit.*MAX_IMAGE_PIXELS"):
        decoding.read_image(tmp_path / "huge.png", 32)
    with pytest.raises(sources.DataError, match=r"huge_mask\.png is larger than Pillow's safety limit"):
        decoding.read_mask(tmp_path / "huge_mask.png")
