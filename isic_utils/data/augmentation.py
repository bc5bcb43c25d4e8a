"""The training augmentations: drawn per image from the run's generator (``draw_augmentation``) and applied to a
batch of uint8 images and masks together (``apply_augmentation``), the one implementation training and Figure 3
(``each_augmentation``) call. Only training runs them: scoring, ``predict`` and export never do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

AUGMENTATIONS = (
    "hflip",
    "vflip",
    "rot90",
    "color_jitter",
    "scale_rotate",
    "zoom_out",
    "shrink_on_skin",
    "color_strong",
)
COLOR_JITTER = 0.2  # brightness, contrast and saturation factors in [1 - j, 1 + j], hue shift in ±j/10
SCALE_ROTATE = {"zoom": (1.0, 1.5), "degrees": 20.0}  # random resized crop (area 44–100%) and a small rotation
# Half the images shrunk to 50–100% of the side (the lesion to 25–100% of its area) at a random place in a black
# frame: lesions as small as the later ISIC releases' (a median 12% of the frame against ISIC 2016's 28%).
ZOOM_OUT = {"probability": 0.5, "scale": (0.5, 1.0)}
# Half the images shrunk to 25–100% of the side (the lesion to 6–100% of its area: ISIC 2016's median 28% down to
# 2%, the later releases' smallest) at a random place on a field of the image's own skin: the median colour of its
# pixels outside the lesion with a coarse texture in brightness, the image fading into it over the outer `fade` of
# its half-side. A black frame (zoom_out) tells the network where the image ends; skin does not.
SHRINK_ON_SKIN = {"probability": 0.5, "scale": (0.25, 1.0), "texture_cells": 8, "texture": 8.0, "fade": 0.3}
COLOR_STRONG = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "hue": 0.05, "gamma": (0.7, 1.5)}


def constants(augment: Sequence[str]) -> dict:
    """The constants each augmentation in ``augment`` draws within (``COLOR_JITTER``, ``SHRINK_ON_SKIN``, ...), by name,
    as JSON reads them back: part of what a run is, beside its parameters, so that a run trained before a constant
    was tuned is neither resumed nor counted as the tuned one (``checkpoints.run_fingerprint``)."""
    table = {
        "color_jitter": COLOR_JITTER,
        "scale_rotate": SCALE_ROTATE,
        "zoom_out": ZOOM_OUT,
        "shrink_on_skin": SHRINK_ON_SKIN,
        "color_strong": COLOR_STRONG,
    }
    return json.loads(json.dumps({name: table[name] for name in augment if name in table}))


def draw_augmentation(count: int, augment: Sequence[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random per-image choices for one batch. Drawn in a fixed order, so cached and uncached paths agree."""
    draws = {}
    for name in ("hflip", "vflip"):
        if name in augment:
            draws[name] = torch.rand(count, generator=generator) < 0.5
    if "rot90" in augment:
        draws["rot90"] = torch.randint(0, 4, (count,), generator=generator)
    if "color_jitter" in augment:
        draws["jitter"] = torch.rand(count, 4, generator=generator)
    if "scale_rotate" in augment:  # zoom, angle, x and y offset of the crop, each uniform in [0, 1)
        draws["scale_rotate"] = torch.rand(count, 4, generator=generator)
    if "zoom_out" in augment:  # whether, scale, x and y offset in the frame
        draws["zoom_out"] = torch.rand(count, 4, generator=generator)
    if "shrink_on_skin" in augment:  # whether, scale, x and y offset; the skin's brightness texture (coarse cells)
        draws["shrink_on_skin"] = torch.rand(count, 4, generator=generator)
        cells = SHRINK_ON_SKIN["texture_cells"]
        draws["skin_texture"] = torch.randn(count, 1, cells, cells, generator=generator)
    if "color_strong" in augment:  # brightness, contrast, saturation, hue, gamma
        draws["color_strong"] = torch.rand(count, 5, generator=generator)
    return draws


def _scale_rotate(images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A random resized crop (zoom in by 1–1.5×, at a random offset inside the image) turned by up to ±20°, for the
    whole batch in one ``grid_sample`` (borders reflected)."""
    low, high = SCALE_ROTATE["zoom"]
    u = u.to(images.device, torch.float32)
    zoom = low + (high - low) * u[:, 0]
    angle = torch.deg2rad(SCALE_ROTATE["degrees"] * (2 * u[:, 1] - 1))
    reach = 1 - 1 / zoom  # how far the crop's centre may move, in [-1, 1] coordinates
    shift_x, shift_y = reach * (2 * u[:, 2] - 1), reach * (2 * u[:, 3] - 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    return _resample(images, masks, _grid(theta, images), "reflection")


def _shrinking(u: torch.Tensor, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(which images are chosen, their affine maps): ``settings``' probability and scale range; a chosen image is
    shrunk by its scale to a random place wholly inside the frame (``u``: whether, scale, x and y offset)."""
    low, high = settings["scale"]
    chosen = u[:, 0] < settings["probability"]
    scale = torch.where(chosen, low + (high - low) * u[:, 1], torch.ones_like(u[:, 1]))
    reach = 1 / scale - 1  # the input's centre may sit anywhere that keeps the whole image in the frame
    shift_x, shift_y = reach * (2 * u[:, 2] - 1), reach * (2 * u[:, 3] - 1)
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([1 / scale, zero, shift_x], 1), torch.stack([zero, 1 / scale, shift_y], 1)], 1)
    return chosen, theta


def _zoom_out(images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ZOOM_OUT``: the chosen images shrunk by a random scale and placed at a random offset, wholly inside the
    frame; the rest of the frame black (image) and background (mask). The others are returned unchanged."""
    chosen, theta = _shrinking(u.to(images.device, torch.float32), ZOOM_OUT)
    moved, moved_masks = _resample(images, masks, _grid(theta, images), "zeros")
    return _where(chosen, moved, images), _where(chosen, moved_masks, masks)


def _shrink_on_skin(
    images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor, texture: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SHRINK_ON_SKIN``: the chosen images shrunk by a random scale to a random place wholly inside the frame, the
    rest of the frame the image's own skin (the median colour outside the lesion, a coarse brightness texture), the
    image fading into it near its edges; masks shrunk alike (lesion where the image outweighs the skin), background
    around. The others are returned unchanged."""
    settings = SHRINK_ON_SKIN
    chosen, theta = _shrinking(u.to(images.device, torch.float32), settings)
    grid = _grid(theta, images)
    moved, moved_masks = _resample(images, masks, grid, "zeros")
    weight = ((1 - grid.abs().amax(-1)) / settings["fade"]).clamp(0, 1).unsqueeze(1)
    pixels = images.float().flatten(2)
    skin = (masks == 0).flatten(2)
    skin = (skin | ~skin.any(-1, keepdim=True)).expand_as(pixels)  # no skin in the image: all its pixels
    colour = torch.where(skin, pixels, torch.nan).nanmedian(-1).values
    coarse = torch.nn.functional.interpolate(
        texture.to(images.device, torch.float32), size=list(images.shape[2:]), mode="bicubic", align_corners=False
    )
    field = colour[..., None, None] + settings["texture"] * coarse
    blended = (weight * moved.float() + (1 - weight) * field).round_().clamp_(0, 255).to(images.dtype)
    return _where(chosen, blended, images), _where(chosen, moved_masks * (weight > 0.5).to(masks.dtype), masks)


def _grid(theta: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each output pixel's place in its input (N×H×W×2, in [-1, 1]) under the affine maps ``theta`` (N×2×3)."""
    return torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)


def _resample(
    images: torch.Tensor, masks: torch.Tensor, grid: torch.Tensor, padding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (bilinear) and masks (nearest) sampled at ``grid`` (``_grid``), the whole batch in one ``grid_sample``
    each."""
    moved = torch.nn.functional.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False
    )
    moved_masks = torch.nn.functional.grid_sample(
        masks.float(), grid, mode="nearest", padding_mode=padding, align_corners=False
    )
    return moved.round_().clamp_(0, 255).to(images.dtype), moved_masks.round_().to(masks.dtype)


def _color_strong(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stronger colour changes than ``color_jitter`` (another camera, another lamp): brightness, contrast and
    saturation factors, a hue shift and a gamma, per image."""
    from torchvision.transforms.v2 import functional as F

    c = COLOR_STRONG
    out = []
    for image, (b, k, s, h, g) in zip(images, u.tolist()):
        image = F.adjust_brightness(image, 1 + c["brightness"] * (2 * b - 1))
        image = F.adjust_contrast(image, 1 + c["contrast"] * (2 * k - 1))
        image = F.adjust_saturation(image, 1 + c["saturation"] * (2 * s - 1))
        image = F.adjust_hue(image, c["hue"] * (2 * h - 1))
        out.append(F.adjust_gamma(image, c["gamma"][0] + (c["gamma"][1] - c["gamma"][0]) * g))
    return torch.stack(out)


def _where(selected: torch.Tensor, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    selected = selected.to(original.device, non_blocking=True)
    return torch.where(selected.view(-1, *([1] * (original.dim() - 1))), changed, original)


def apply_augmentation(
    images: torch.Tensor, masks: torch.Tensor, draws: dict[str, torch.Tensor], jitter: float = COLOR_JITTER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the drawn augmentations: flips, 90° rotations, ``scale_rotate`` (a random resized crop with a small
    rotation), ``zoom_out`` and ``shrink_on_skin`` (the image shrunk in a black frame or on its own skin) jointly to
    uint8 images and masks; ``color_jitter`` and ``color_strong`` (brightness, contrast, saturation, hue and gamma)
    to images only.

    The one augmentation of the project: training and Figure 3 both call it. Flips and
    rotations are done for the whole batch at once; colour changes use ``torchvision.transforms.v2.functional``
    per image. Images and masks may live on a GPU: the
    draws are CPU tensors (from the CPU generator) and nothing is read back from the device.
    """
    from torchvision.transforms.v2 import functional as F

    if "hflip" in draws:
        images, masks = _where(draws["hflip"], images.flip(-1), images), _where(draws["hflip"], masks.flip(-1), masks)
    if "vflip" in draws:
        images, masks = _where(draws["vflip"], images.flip(-2), images), _where(draws["vflip"], masks.flip(-2), masks)
    if "rot90" in draws:
        turns = draws["rot90"]
        rotated_images, rotated_masks = images.clone(), masks.clone()
        for k in (1, 2, 3):
            chosen = (turns.cpu() == k).nonzero().flatten()  # decided on the host, so no device sync
            if len(chosen):
                chosen = chosen.to(images.device, non_blocking=True)
                rotated_images[chosen] = images[chosen].rot90(k, dims=(-2, -1))
                rotated_masks[chosen] = masks[chosen].rot90(k, dims=(-2, -1))
        images, masks = rotated_images, rotated_masks
    if "jitter" in draws:
        factors = 1 + jitter * (2 * draws["jitter"] - 1)
        jittered = []
        for image, (brightness, contrast, saturation, hue) in zip(images, factors.tolist()):
            image = F.adjust_brightness(image, brightness)
            image = F.adjust_contrast(image, contrast)
            image = F.adjust_saturation(image, saturation)
            jittered.append(F.adjust_hue(image, (hue - 1) / 10))
        images = torch.stack(jittered)
    if "scale_rotate" in draws:
        images, masks = _scale_rotate(images, masks, draws["scale_rotate"])
    if "zoom_out" in draws:
        images, masks = _zoom_out(images, masks, draws["zoom_out"])
    if "shrink_on_skin" in draws:
        images, masks = _shrink_on_skin(images, masks, draws["shrink_on_skin"], draws["skin_texture"])
    if "color_strong" in draws:
        images = _color_strong(images, draws["color_strong"])
    return images, masks


def each_augmentation(images: torch.Tensor, masks: torch.Tensor, seed: int = 0) -> dict[str, tuple]:
    """Each augmentation alone on ``images``/``masks`` (Figure 3's columns), through ``apply_augmentation``.

    Flips, a rotation, the zoom out and the shrink on skin are forced on so they show; the rest is drawn as training draws it (seeded).
    """
    count = len(images)
    generator = torch.Generator().manual_seed(seed)
    zoom_out = draw_augmentation(count, ["zoom_out"], generator)["zoom_out"]
    zoom_out[:, 0] = 0  # below ZOOM_OUT["probability"]: every image shrunk
    shrink = draw_augmentation(count, ["shrink_on_skin"], generator)
    shrink["shrink_on_skin"][:, 0] = 0  # every image shrunk
    every = torch.ones(count, dtype=torch.bool)
    return {
        "original": (images, masks),
        "horizontal flip": apply_augmentation(images, masks, {"hflip": every}),
        "vertical flip": apply_augmentation(images, masks, {"vflip": every}),
        "90° rotation": apply_augmentation(
            images, masks, {"rot90": torch.randint(1, 4, (count,), generator=generator)}
        ),
        "colour jitter": apply_augmentation(images, masks, draw_augmentation(count, ["color_jitter"], generator)),
        "crop and rotation": apply_augmentation(images, masks, draw_augmentation(count, ["scale_rotate"], generator)),
        "zoom out": apply_augmentation(images, masks, {"zoom_out": zoom_out}),
        "shrunk on skin": apply_augmentation(images, masks, shrink),
        "strong colour": apply_augmentation(images, masks, draw_augmentation(count, ["color_strong"], generator)),
    }
