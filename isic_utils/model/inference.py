"""A trained checkpoint applied: the model rebuilt from what ``best.pt`` says of itself and its weights loaded
(``weights_only``), images turned into the model's input, and probability maps (flip-averaged with ``tta``). The path
``predict``, the external chapter and training's evaluation share.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..data.decoding import resize_image
from ..data.transforms import apply_color_constancy, normalize
from .networks import SegmentationModel, build_model

TTA = ("none", "flips")
# Coarse-to-fine ("zoom"): the crop spans this many times the predicted lesion's box (the image's aspect ratio kept, so
# the crop is squeezed to the model's square input as whole images are); no zoom when the crop would cover at least
# ZOOM_SKIP of the image's sides (the lesion is large already), and never more than 1 / ZOOM_FLOOR times.
ZOOM_CONTEXT, ZOOM_SKIP, ZOOM_FLOOR = 2.0, 0.8, 0.25


class CheckpointMismatch(RuntimeError):
    """A checkpoint holds another configuration than the one asked for."""


def memory_formatted(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def to_input(images_uint8: torch.Tensor, spec, device: str, channels_last: bool) -> torch.Tensor:
    """uint8 images → normalised float input on ``device`` (moved as uint8, a quarter of the bytes)."""
    return memory_formatted(normalize(images_uint8.to(device, non_blocking=True), spec.mean, spec.std), channels_last)


FLIPS = ((), (-1,), (-2,), (-2, -1))  # test-time flips: the identity, horizontal, vertical and both


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Probabilities of ``forward`` (a model: input → logits) on ``x``; with ``tta="flips"`` the mean of the
    probabilities of the identity and the horizontally, vertically and doubly flipped inputs, each flipped back."""
    if tta == "none":
        return torch.sigmoid(forward(x).float())
    if tta != "flips":
        raise ValueError(f"tta must be one of {list(TTA)}, got {tta!r}")
    return without_and_with_flips(forward, x)[1]


def without_and_with_flips(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``flip_averaged``'s "none", its "flips") from the four passes "flips" runs: its identity pass is "none"."""
    passes = []
    for dims in FLIPS:
        p = torch.sigmoid(forward(x.flip(dims) if dims else x).float())
        passes.append(p.flip(dims) if dims else p)
    return passes[0], sum(passes[1:], passes[0]) / 4


def model_meta(model: SegmentationModel, image_size: int) -> dict:
    """What a checkpoint must say about the model so that ``predict`` can rebuild and check it."""
    return {
        **model.built_with,  # encoder, decoder and its arguments: what load_trained rebuilds the model from
        "image_size": image_size,
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "threshold": 0.5,
        "encoder_weights": dict(getattr(model, "encoder_weights", {})),
    }


def load_checkpoint(path: str | Path, fix: str = "Delete it to start the run afresh.") -> dict:
    """Load a checkpoint written by ``fit`` (safely: ``weights_only=True``); one that cannot be read raises
    ``CheckpointMismatch`` saying why in words, and ``fix``."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("best.pt")) or sorted(path.glob("*/best.pt"))
        hint = f" (e.g. {inside[0]})" if inside else ""
        raise CheckpointMismatch(f"{path} is a folder; give the checkpoint file in it, a best.pt{hint}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        size = path.stat().st_size if path.is_file() else None
        reason = (
            "it is empty (0 bytes: a copy or a download that did not finish?)"
            if size == 0
            else str(exc).strip() or type(exc).__name__
        )
        raise CheckpointMismatch(f"{path} cannot be read as a checkpoint of this project: {reason}. {fix}") from exc


def load_trained(checkpoint: str | Path) -> tuple[SegmentationModel, dict]:
    """Rebuild the model a ``best.pt`` describes and load its weights (``weights_only=True``); (model in eval mode,
    its meta: image size, mean/std, threshold, and the colour constancy, test-time flips and post-processing the run
    was trained and scored with; "none" for checkpoints from before those options)."""
    state = load_checkpoint(
        checkpoint, "Give a best.pt that a training run wrote (outputs/<profile>/<run>/seed<k>/best.pt)."
    )
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise CheckpointMismatch(f"{checkpoint} is not a best.pt written by this project's training (no 'meta').")
    meta = {"color_constancy": "none", "tta": "none", "postprocess": "none", **state["meta"]}
    try:
        model = build_model(meta["encoder"], encoder_weights=None, decoder=meta["decoder"], dropout=meta["dropout"])
    except (KeyError, ValueError) as exc:  # an encoder or decoder this version does not know
        raise CheckpointMismatch(
            f"{checkpoint} describes a model this version cannot build (encoder {meta.get('encoder')!r}, decoder "
            f"{meta.get('decoder')!r}: {exc}). Use the version of isic_utils that trained it, or retrain."
        ) from exc
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointMismatch(
            f"{checkpoint} holds weights that do not fit a {meta['encoder']} + {meta['decoder']} model: {exc}"
        ) from exc
    return model.eval(), meta


def model_input(meta: dict, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images as a checkpoint's model takes them: its colour constancy, then its normalisation."""
    images = apply_color_constancy(images_uint8, meta.get("color_constancy", "none"))
    return normalize(images, meta["mean"], meta["std"])


@torch.inference_mode()
def predicted_probabilities(
    model: SegmentationModel, meta: dict, images_uint8: torch.Tensor, tta: str | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Probability maps ``N×1×S×S`` (fp32, CPU) for decoded uint8 ``N×3×S×S`` images at the checkpoint's size:
    the checkpoint's colour constancy, normalisation, then the model (flip-averaged with ``tta``, default the
    checkpoint's). The path ``predict`` and the external chapter share with training's evaluation."""
    tta = meta.get("tta", "none") if tta is None else tta
    return _batched(lambda x: flip_averaged(model, x, tta), model, meta, images_uint8, batch_size)


@torch.inference_mode()
def probabilities_without_and_with_flips(
    model: SegmentationModel, meta: dict, images_uint8: torch.Tensor, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """``predicted_probabilities`` with ``tta`` "none" and "flips", equal to each, at the cost of "flips" alone
    (four passes, not five): {"none": …, "flips": …}."""
    both = _batched(lambda x: torch.stack(without_and_with_flips(model, x)), model, meta, images_uint8, batch_size, 1)
    return {"none": both[0], "flips": both[1]}


def _batched(apply, model, meta: dict, images_uint8: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):  # colour constancy is per image: batching changes nothing
        x = model_input(meta, images_uint8[start : start + batch_size].to(device))
        out.append(apply(x).cpu())
    return torch.cat(out, dim)


def zoom_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the crop coarse-to-fine segments again, around the lesion of ``mask`` (``H×W``
    bool at the image's original size), or None when there is nothing to zoom on (no lesion, or a large one)."""
    rows, columns = mask.any(1).nonzero(), mask.any(0).nonzero()
    if not len(rows):
        return None
    height, width = mask.shape
    top, bottom = int(rows.min()), int(rows.max()) + 1
    left, right = int(columns.min()), int(columns.max()) + 1
    scale = max(ZOOM_CONTEXT * (bottom - top) / height, ZOOM_CONTEXT * (right - left) / width, ZOOM_FLOOR)
    if scale >= ZOOM_SKIP:
        return None
    crop_h, crop_w = max(1, round(scale * height)), max(1, round(scale * width))
    y0 = min(max(0, (top + bottom - crop_h) // 2), height - crop_h)
    x0 = min(max(0, (left + right - crop_w) // 2), width - crop_w)
    return y0, y0 + crop_h, x0, x0 + crop_w


@torch.inference_mode()
def zoomed_probabilities(
    model: SegmentationModel, meta: dict, image: torch.Tensor, coarse: torch.Tensor
) -> torch.Tensor:
    """Coarse-to-fine at the original size: ``coarse`` (``1×1×S×S``, the whole image at the model's size) upsampled to
    ``image``'s (uint8 ``3×H×W``) size; then the crop around its lesion (``zoom_box``) resized to the model's size,
    segmented again, and its probabilities pasted back. ``1×1×H×W``, fp32."""
    height, width = image.shape[-2:]
    full = torch.nn.functional.interpolate(
        coarse.float().reshape(1, 1, *coarse.shape[-2:]), size=(height, width), mode="bilinear", align_corners=False
    )
    box = zoom_box(full[0, 0] > meta.get("threshold", 0.5))
    if box is None:
        return full
    top, bottom, left, right = box
    crop = resize_image(image[:, top:bottom, left:right], int(meta["image_size"]))
    fine = predicted_probabilities(model, meta, crop.unsqueeze(0), "none")
    full[..., top:bottom, left:right] = torch.nn.functional.interpolate(
        fine, size=(bottom - top, right - left), mode="bilinear", align_corners=False
    )
    return full
