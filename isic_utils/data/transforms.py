"""What the model sees of an image: normalisation and colour constancy (shades of grey, Minkowski norm 6: one
function, ``apply_color_constancy``, wherever a model sees images — training, evaluation, ``predict``, the external
chapter). The training augmentations are in ``augmentation``: code that only training runs, so that a stored score
(keyed by the code that scores) outlives a change to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ----------------------------------------------------------------------------- tensors for the model


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``N×3×H×W`` (or float in [0, 1]) → float32 normalised with ``mean``/``std`` (per channel, [0, 1] scale)."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


COLOR_CONSTANCY = ("none", "shades_of_grey")


def apply_color_constancy(images: torch.Tensor, method: str = "none", power: int = 6) -> torch.Tensor:
    """Colour constancy on uint8 ``N×3×H×W`` images (the one implementation: training, evaluation, ``predict``).

    ``shades_of_grey`` (Finlayson & Trezzi 2004; for dermoscopy Barata et al. 2015): each image's illuminant is the
    Minkowski ``power``-mean of each channel; each channel is scaled so that the illuminant becomes neutral grey with
    the same norm, then clipped to [0, 255]. Removes a camera's or a lamp's colour cast; ``none`` returns ``images``.
    """
    if method == "none":
        return images
    if method != "shades_of_grey":
        raise ValueError(f"color_constancy must be one of {list(COLOR_CONSTANCY)}, got {method!r}")
    x = images.double()
    illuminant = x.pow(power).mean(dim=(-2, -1), keepdim=True).pow(1.0 / power)  # N×3×1×1
    unit = illuminant / illuminant.norm(dim=1, keepdim=True).clamp(min=1e-12)
    scaled = x / (unit * 3**0.5).clamp(min=1e-12)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)
