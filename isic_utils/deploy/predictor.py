"""Predictions written to a folder, with or without torch: one 0/255 mask per image at its original size
(``<stem>_Segmentation.png``), ``confidence.csv`` (each mask's confidence and whether it falls under the run's flag
threshold) and, on request, overlays. ``write_predictions`` is the one writer; ``predict`` feeds it PyTorch's masks,
and this module's ONNX engine feeds it an exported model's, importing onnxruntime, numpy, Pillow, scipy and pandas
but never torch (a clinic's laptop needs none):

    python -m isic_utils.deploy.predictor --model best-int8.onnx --input DIR --output DIR [--overlays]

The exported file says everything else (``export``): the image size, colour constancy, threshold, post-processing
and the confidence rule are read from its metadata, and each step here is the numpy form of the package's own
(a test holds the two to the same masks and confidences).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ..base.files import FileProblem, atomic_path, writable_folder
from ..data.pictures import rgb_array
from ..data.sources import OVERLAY_COMMENT, DataError, folder_images
from ..scoring.shape import BAND, UNCERTAIN, largest_lesion, one_lesion

CONFIDENCE_FILE = "confidence.csv"
CHECK = "check by hand"
FORMAT = "isic_utils segmentation model, onnx 1"
META_KEY = "isic_utils"
INPUT, OUTPUT = "image", "probability"
EPS = 1e-6  # the temperature's clip, as scoring.confidence.calibrated


class ModelFileError(ValueError):
    """A file that is not an ONNX model this project exported; the message says what it is and the fix."""


# ----------------------------------------------------------------------------- the writer both engines share


def write_predictions(
    files: list[Path],
    output_dir: Path,
    predict_one: Callable[[Path], tuple[np.ndarray, float]],
    flag_below: float | None,
    overlays: bool = False,
) -> list[Path]:
    """For each image, ``predict_one(path)`` → (its 0/1 mask at original size, its confidence); the mask written as
    a 0/255 PNG, a row of ``confidence.csv`` (flagged below ``flag_below``), and an overlay when asked."""
    written, rows = [], []
    for path in files:
        mask, score = predict_one(path)
        target = output_dir / f"{path.stem}_Segmentation.png"
        with atomic_path(target) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        written.append(target)
        score = round(float(score), 6)  # flagged as written
        flagged = flag_below is not None and score < flag_below
        rows.append(
            {
                "image": path.name,
                "mask": target.name,
                "confidence": score,
                "flag_below": flag_below,
                "flag": CHECK if flagged else "",
            }
        )
        if overlays:
            write_overlay(
                path,
                mask,
                f"confidence {score:.2f}" + (f" - {CHECK}" if flagged else ""),
                output_dir / f"{path.stem}_overlay.jpg",
            )
    with atomic_path(output_dir / CONFIDENCE_FILE) as tmp:  # flag_below: the run's threshold, chosen on validation
        pd.DataFrame(rows, columns=["image", "mask", "confidence", "flag_below", "flag"]).to_csv(tmp, index=False)
    return written


def confidence_summary(path: Path) -> str:
    """One line on what ``confidence.csv`` says: how many masks to check by hand, under which threshold."""
    table = pd.read_csv(path)
    flagged = int((table["flag"] == CHECK).sum())
    threshold = table["flag_below"].iloc[0] if len(table) else float("nan")
    if pd.isna(threshold):
        return (
            f"{path}: each mask's confidence; this checkpoint has no threshold chosen on validation (trained "
            "before it), so none is flagged"
        )
    return f"{path}: {flagged} of {len(table)} masks to check by hand (confidence below {threshold:.3f})"


def write_overlay(path: Path, mask: np.ndarray, caption: str, target: Path) -> None:
    """The image with the mask tinted green and ``caption`` (the confidence, and the flag) written on it."""
    original, _ = rgb_array(path, None)
    picture = original.astype(np.float32)
    tint = np.zeros_like(picture)
    tint[..., 1] = 255
    picture = Image.fromarray(np.where(mask[..., None] > 0, 0.6 * picture + 0.4 * tint, picture).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, picture.height // 25))
    left, top, right, bottom = draw.textbbox((8, 8), caption, font=font)
    draw.rectangle((left - 4, top - 4, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((8, 8), caption, fill=(255, 80, 80) if CHECK in caption else (255, 255, 255), font=font)
    with atomic_path(target) as tmp:  # its comment says what wrote it: predict never reads it as an image
        picture.save(tmp, format="JPEG", quality=90, comment=OVERLAY_COMMENT)


def prepared_folder(input_dir, output_dir, overlays: bool, overwrite: bool) -> tuple[list[Path], Path]:
    """The images of ``input_dir`` and the output folder, checked before any work: nothing it would write exists
    (unless ``overwrite``), no two inputs share a mask's name; what is left out of the input is named."""
    files, left_out = folder_images(input_dir, "--input")
    refuse_collisions(files, Path(output_dir), overlays, overwrite)
    output_dir = writable_folder(output_dir, "--output")
    if left_out:
        shown = ", ".join(p.name for p in left_out[:5]) + (
            f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        )
        print(
            f"predict: {len(files)} image(s) in {input_dir}; left out {len(left_out)} file(s) that are not images "
            f"or are an image's mask or overlay: {shown}",
            flush=True,
        )
    return files, output_dir


def refuse_collisions(files: list[Path], output_dir: Path, overlays: bool, overwrite: bool) -> None:
    """Stop before any work when two inputs would write one mask, or (without ``overwrite``) a file exists."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    shared = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if shared:
        stem, paths = next(iter(shared.items()))
        raise DataError(
            f"{' and '.join(p.name for p in paths)} in {paths[0].parent} would both be written as "
            f"{stem}_Segmentation.png ({len(shared)} such name(s)). Fix: rename or move one of each."
        )
    if overwrite:
        return
    targets = [output_dir / f"{p.stem}_Segmentation.png" for p in files]
    targets += [output_dir / f"{p.stem}_overlay.jpg" for p in files] if overlays else []
    targets.append(output_dir / CONFIDENCE_FILE)
    existing = [t for t in targets if t.exists()]
    if existing:
        raise DataError(
            f"{len(existing)} file(s) that predict would write exist already in {output_dir} (e.g. "
            f"{existing[0].name}: ground truth, or an earlier run) and are kept. Fix: choose an empty "
            "--output folder, or pass --overwrite to replace them."
        )


# ----------------------------------------------------------------------------- the ONNX engine, in numpy


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session on ``threads`` threads; ``ModelFileError`` for a file it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the .onnx file that export wrote.")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors: a truncated, corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{path} cannot be read as an ONNX model ({reason}). Give a file that `python -m isic_utils export` wrote."
        ) from exc


def read_metadata(path_or_session) -> dict:
    """What an exported model says of itself (``META_KEY``); ``ModelFileError`` for a file that is not ONNX or not
    one this project exported."""
    run = session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    props = run.get_modelmeta().custom_metadata_map
    name = path_or_session if isinstance(path_or_session, (str, Path)) else "the model"
    if META_KEY not in props:
        raise ModelFileError(
            f"{name} is an ONNX model, but not one this project exported (no '{META_KEY}' metadata: it does not say "
            "its image size, normalisation or threshold). Export a checkpoint with `python -m isic_utils export`."
        )
    meta = json.loads(props[META_KEY])
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{name} was exported as {meta.get('format')!r}; this version reads {FORMAT!r}.")
    return meta


def shades_of_grey(images: np.ndarray, power: int = 6) -> np.ndarray:
    """``data.transforms.apply_color_constancy``'s shades of grey on uint8 ``N×3×H×W`` arrays, in numpy."""
    x = images.astype(np.float64)
    illuminant = np.power(np.power(x, power).mean(axis=(-2, -1), keepdims=True), 1.0 / power)
    unit = illuminant / np.maximum(np.linalg.norm(illuminant, axis=1, keepdims=True), 1e-12)
    scaled = x / np.maximum(unit * 3**0.5, 1e-12)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def graph_input(meta: dict, images: np.ndarray) -> np.ndarray:
    """uint8 ``N×3×S×S`` images as the exported graph takes them: their colour constancy, float32 0–255."""
    if meta["color_constancy"] == "shades_of_grey":
        images = shades_of_grey(images)
    elif meta["color_constancy"] != "none":
        raise ModelFileError(f"colour constancy {meta['color_constancy']!r} is not one this version applies.")
    return images.astype(np.float32)


def upsampled(probability: np.ndarray, width: int, height: int) -> np.ndarray:
    """An ``h×w`` map resized to ``height×width`` bilinearly as ``torch.nn.functional.interpolate`` does it
    (``align_corners=False``: pixel centres aligned, source indices clamped at the edges), in float32."""

    def axis(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(size / out)
        source = np.maximum((np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
        low = np.minimum(np.floor(source).astype(np.int64), size - 1)
        high = np.minimum(low + 1, size - 1)
        return low, high, (source - low).astype(np.float32)

    p = probability.astype(np.float32)
    y0, y1, wy = axis(height, p.shape[0])
    x0, x1, wx = axis(width, p.shape[1])
    rows = p[y0] * (1 - wy)[:, None] + p[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


def map_confidence(probability: np.ndarray, calibration: dict) -> float:
    """``scoring.confidence.scores`` for one ``S×S`` probability map, in numpy: after the calibration's temperature,
    the kept candidate (boundary sharpness or certain area, times the one-lesion check)."""
    temperature = calibration.get("temperature", 1.0)
    p = probability.astype(np.float32)
    if temperature != 1.0:
        clipped = np.clip(p, EPS, 1 - EPS)
        p = (1 / (1 + np.exp(-(np.log(clipped / (1 - clipped)) / temperature)))).astype(np.float32)
    mask = p > 0.5
    sure = np.abs(2 * p - 1)
    size = 2 * BAND + 1
    band = ndimage.maximum_filter(mask, size, mode="constant", cval=False) & ~ndimage.minimum_filter(
        mask, size, mode="constant", cval=True
    )
    rule = calibration.get("confidence", "boundary sharpness × one lesion")
    if rule.startswith("boundary sharpness"):
        score = float(sure[band].astype(np.float64).sum() / band.sum()) if band.any() else 0.0
    elif rule.startswith("certain area"):
        lesion = int(mask.sum())
        uncertain = int((sure < UNCERTAIN).sum())
        score = lesion / max(lesion + uncertain, 1) if lesion else 0.0
    else:  # "one lesion" alone
        score = 1.0
    return score * one_lesion(mask) if rule.endswith("one lesion") else score


class OnnxPredictor:
    """An exported model, and what its metadata says to do around it."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.session = session(path, threads)
        self.meta = read_metadata(self.session)
        self.path = Path(path)

    def probability(self, image: np.ndarray) -> np.ndarray:
        """The ``S×S`` lesion probability of a uint8 ``S×S×3`` image (already resized to the model's size)."""
        x = graph_input(self.meta, image.transpose(2, 0, 1)[None])
        return self.session.run([OUTPUT], {INPUT: x})[0][0, 0]

    def mask(self, probability: np.ndarray, width: int, height: int, postprocess: str | None = None) -> np.ndarray:
        """The 0/1 mask at the original size: upsampled, thresholded, post-processed (default: as exported)."""
        mask = upsampled(probability, width, height) > self.meta["threshold"]
        method = self.meta["postprocess"] if postprocess is None else postprocess
        return largest_lesion(mask) if method == "largest_component" else mask

    def predict_one(self, path: Path, postprocess: str | None = None) -> tuple[np.ndarray, float]:
        image, (width, height) = rgb_array(path, int(self.meta["image_size"]))
        probability = self.probability(image)
        confidence = map_confidence(probability, self.meta.get("calibration") or {})
        return self.mask(probability, width, height, postprocess), confidence


def predict_folder(
    model: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    overlays: bool = False,
    postprocess: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """``predict``'s folder, with an exported model instead of a checkpoint: the same masks, ``confidence.csv`` and
    overlays; nothing replaced unless ``overwrite``."""
    predictor = OnnxPredictor(model)
    files, output_dir = prepared_folder(input_dir, output_dir, overlays, overwrite)
    flag_below = (predictor.meta.get("calibration") or {}).get("flag_below")
    return write_predictions(files, output_dir, lambda p: predictor.predict_one(p, postprocess), flag_below, overlays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m isic_utils.deploy.predictor",
        description="Apply an exported (.onnx) model to a folder of images, without torch.",
    )
    parser.add_argument("--model", required=True, help="the .onnx file `python -m isic_utils export` wrote")
    parser.add_argument("--input", required=True, help="folder of images (JPEG, PNG, BMP, TIFF)")
    parser.add_argument("--output", required=True, help="folder for the masks, confidence.csv and overlays")
    parser.add_argument("--overlays", action="store_true", help="also write <stem>_overlay.jpg")
    parser.add_argument("--postprocess", choices=("none", "largest_component"), help="default: as exported")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    args = parser.parse_args(argv)
    try:
        written = predict_folder(args.model, args.input, args.output, args.overlays, args.postprocess, args.overwrite)
    except (ModelFileError, DataError, FileProblem, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} masks to {args.output}")
    print(confidence_summary(Path(args.output) / CONFIDENCE_FILE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
