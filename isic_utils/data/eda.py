"""The data chapter's measurements: original image sizes (from the headers), pixel statistics, and whether each image
meets its own mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from .decoding import DecodedSplit
from .pictures import displayed_size
from .sources import DataError, Pair

# ----------------------------------------------------------------------------- EDA helpers


def original_sizes(pairs: Sequence[Pair]):
    """A DataFrame of id, width, height (after EXIF orientation) read from the image headers only."""
    import pandas as pd

    rows = []
    for pair in pairs:
        try:
            with Image.open(pair.image) as header:
                width, height = displayed_size(header)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{pair.image} cannot be read ({exc}). Replace it with the original file.") from exc
        rows.append({"id": pair.id, "width": width, "height": height})
    return pd.DataFrame(rows)


def pixel_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 ``N×3×H×W`` images, in [0, 1] units, over all pixels."""
    x = images.double().div(255)
    return {
        "mean": x.mean(dim=(0, 2, 3)).tolist(),
        "std": x.std(dim=(0, 2, 3)).tolist(),
    }


def check_alignment(split: DecodedSplit) -> pd.DataFrame:  # noqa: F821
    """One row per image: does each image meet its own mask?

    Checks the id pairing (mask file named for the image), that the original sizes matched (enforced at
    decode), and that the mask is not empty or full, and reports the lesion fraction and the contrast
    between lesion and skin (lesions are darker than the skin around them in dermoscopy).
    """
    import pandas as pd

    images = split.images.float().mean(dim=1)  # luminance proxy, N×S×S
    masks = split.masks[:, 0].bool()
    area = masks.float().mean(dim=(1, 2))
    inside = (images * masks).sum(dim=(1, 2)) / masks.sum(dim=(1, 2)).clamp(min=1)
    outside = (images * ~masks).sum(dim=(1, 2)) / (~masks).sum(dim=(1, 2)).clamp(min=1)
    rows = []
    for k, image_id in enumerate(split.ids):
        paired = not split.sources or split.sources[k].mask.name.lower() == f"{image_id}_segmentation.png".lower()
        rows.append(
            {
                "id": image_id,
                "mask_named_for_image": paired,
                "lesion_fraction": float(area[k]),
                "lesion_darker_than_skin": bool(inside[k] < outside[k]),
                "contrast": float(outside[k] - inside[k]) / 255,
            }
        )
    return pd.DataFrame(rows)
