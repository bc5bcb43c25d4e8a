"""Apply a trained checkpoint to new images: one binary mask per image at the image's original size.

``python -m isic_utils predict --checkpoint RUN_DIR/seed0/best.pt --input DIR --output DIR [--overlays]``
writes ``<stem>_Segmentation.png`` (0/255, the ISIC naming) for every JPEG/PNG in ``--input``, and
``confidence.csv``: each mask's confidence (from the model's probabilities alone, as the run chose it on validation)
and whether it falls under the run's threshold for "check this one by hand".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.decoding import decode_pairs, read_image, read_mask
from .deploy.predictor import (  # noqa: F401  (CHECK, CONFIDENCE_FILE, confidence_summary: predict's API)
    CHECK,
    CONFIDENCE_FILE,
    confidence_summary,
    prepared_folder,
    write_predictions,
)
from .model.inference import load_trained, predicted_probabilities
from .scoring import confidence
from .scoring.metrics import confusion_counts, full_size_mask, original_size_counts


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
    files, output_dir = prepared_folder(input_dir, output_dir, overlays, overwrite)
    calibration = meta.get("calibration") or {}

    def predict_one(path: Path) -> tuple[np.ndarray, float]:
        image, (width, height) = read_image(path, meta["image_size"])
        probabilities = predict_probabilities(model, meta, image.unsqueeze(0), tta)
        full = full_size_mask(probabilities, (width, height), meta["threshold"], postprocess)
        return full[0, 0].numpy(), float(confidence.scores(probabilities, calibration)[0])

    return write_predictions(files, output_dir, predict_one, calibration.get("flag_below"), overlays)


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
