"""Apply a trained checkpoint to new images: one binary mask per image at the image's original size.

``python -m isic_utils predict --checkpoint RUN_DIR/seed0/best.pt --input DIR --output DIR [--overlays]``
writes ``<stem>_Segmentation.png`` (0/255, the ISIC naming) for every JPEG/PNG in ``--input``, and
``confidence.csv``: each mask's confidence (from the model's probabilities alone, as the run chose it on validation)
and whether it falls under the run's threshold for "check this one by hand".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from .base.files import atomic_path, writable_folder
from .data.decoding import decode_pairs, read_image, read_mask
from .data.sources import OVERLAY_COMMENT, DataError, folder_images
from .model.inference import load_trained, predicted_probabilities
from .scoring import confidence
from .scoring.metrics import confusion_counts, full_size_mask, original_size_counts

CONFIDENCE_FILE = "confidence.csv"
CHECK = "check by hand"


def load_predictor(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a ``best.pt`` describes and load its weights (see ``training.load_trained``)."""
    return load_trained(checkpoint)


def predict_probabilities(model, meta: dict, images_uint8: torch.Tensor, tta: str | None = None) -> torch.Tensor:
    """Probability maps ``N×1×S×S`` for uint8 ``N×3×S×S`` images at the checkpoint's image size, with the run's
    colour constancy and (unless ``tta`` says otherwise) its test-time flips."""
    return predicted_probabilities(model, meta, images_uint8, tta)


def predict_folder(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    overlays: bool = False,
    tta: str | None = None,
    postprocess: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a 0/255 PNG mask at original size for every image in ``input_dir``; returns the mask paths.

    Every JPEG/PNG/BMP/TIFF is read but the masks and overlays of another image of the folder
    (``sources.folder_images``; what is left out is named on stdout); an unreadable file raises ``DataError``
    naming it. The checkpoint's colour constancy is always applied (the model was trained on such images); its test-time flips and post-processing unless ``tta`` /
    ``postprocess`` say otherwise ("none", "flips", "largest_component").

    Nothing is replaced unless ``overwrite``: when a mask or overlay it would write exists already (ground truth
    beside the images, an earlier run), or two inputs share a name (``a.jpg`` and ``a.png``), it stops before
    writing anything, naming the files.
    """
    model, meta = load_predictor(checkpoint)
    tta = meta["tta"] if tta is None else tta
    postprocess = meta["postprocess"] if postprocess is None else postprocess
    files, left_out = folder_images(input_dir, "--input")
    _refuse_collisions(files, Path(output_dir), overlays, overwrite)
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
    calibration = meta.get("calibration") or {}
    flag_below = calibration.get("flag_below")
    written, rows = [], []
    for path in files:
        image, (width, height) = read_image(path, meta["image_size"])
        probabilities = predict_probabilities(model, meta, image.unsqueeze(0), tta)
        full = full_size_mask(probabilities, (width, height), meta["threshold"], postprocess)
        mask = full[0, 0].numpy().astype(np.uint8) * 255
        target = output_dir / f"{path.stem}_Segmentation.png"
        with atomic_path(target) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG")
        written.append(target)
        score = round(float(confidence.scores(probabilities, calibration)[0]), 6)  # flagged as written
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
            _write_overlay(
                path,
                mask,
                f"confidence {score:.2f}" + (f" - {CHECK}" if flagged else ""),
                output_dir / f"{path.stem}_overlay.jpg",
            )
    with atomic_path(output_dir / CONFIDENCE_FILE) as tmp:  # flag_below: the run's threshold, chosen on validation
        pd.DataFrame(rows).to_csv(tmp, index=False)
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


def _write_overlay(path: Path, mask: np.ndarray, caption: str, target: Path) -> None:
    """The image with the mask tinted green and ``caption`` (the confidence, and the flag) written on it."""
    original, _ = read_image(path, None)
    picture = original.permute(1, 2, 0).numpy().astype(np.float32)
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


def _refuse_collisions(files: list[Path], output_dir: Path, overlays: bool, overwrite: bool) -> None:
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


def round_trip(checkpoint: str | Path, pairs: list, output_dir: str | Path) -> dict:
    """Run ``predict_folder`` on the folder holding ``pairs``' images, then read every written mask back.

    Returns ``written`` (the paths predict_folder returned), ``masks`` (the mask path per pair, ISIC-named),
    ``sizes`` (each image's original (width, height)), ``counts`` (confusion counts of each written mask against
    its ground truth) and ``expected`` (the counts the evaluation computes in memory at original size), so a test or
    a check can compare the CLI's output with the report's scoring.
    """
    output_dir = Path(output_dir)
    written = predict_folder(checkpoint, pairs[0].image.parent, output_dir)
    model, meta = load_predictor(checkpoint)
    decoded = decode_pairs(pairs, meta["image_size"], progress=False)
    expected = original_size_counts(
        predict_probabilities(model, meta, decoded.images), decoded, postprocess=meta["postprocess"]
    )
    masks = [output_dir / f"{pair.id}_Segmentation.png" for pair in pairs]
    counts = torch.cat(
        [
            confusion_counts(read_mask(path).float().unsqueeze(0), read_mask(pair.mask).float().unsqueeze(0))
            for pair, path in zip(pairs, masks)
        ]
    )
    return {"written": written, "masks": masks, "sizes": decoded.sizes, "counts": counts, "expected": expected}
