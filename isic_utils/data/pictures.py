"""Pictures read without torch: an image file opened (the errors named), oriented, turned into 8-bit RGB and resized
as the report decodes it. ``decoding`` builds its tensors on this, and the ONNX predictor (``deploy``) runs on it in a
process without torch.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .sources import DataError


def open_picture(path: Path) -> Image.Image:
    """``path`` opened and loaded; a ``DataError`` naming the file and the fix when it cannot be."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            width, height = image.size  # above Pillow's warning size, below its limit: read, and said in one line
            print(
                f"note: {path} is {width * height / 1e6:.1f} megapixels ({width}×{height}); it is read whole, "
                "which takes a while and memory",
                file=sys.stderr,
                flush=True,
            )
    except PermissionError as exc:
        raise DataError(f"cannot read {path}: permission denied. Fix its permissions (chmod a+r).") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{path} is larger than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels ({exc}). "
            "If it is a genuine image of yours, downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS before "
            "running."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        size = path.stat().st_size if path.exists() else 0
        what = "is empty (0 bytes)" if size == 0 else f"cannot be decoded ({exc})"
        raise DataError(f"{path} {what}. Replace it with the original file from the archive.") from exc
    return image


WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
MASK_MODES = ("1", "L", "P", "LA", "RGB", "RGBA", *WIDE_GREY_MODES)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is displayed: after its EXIF orientation (a quarter turn swaps them)."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def to_8bit(array: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit or floating-point grey values to uint8, scaled to the range they use, never wrapped: floats
    in [0, 1] by 255; values up to 255 kept; up to 65535 (16-bit) by 255/65535; beyond that (32-bit) by
    255/(2³²−1). Negative values become 0."""
    wide = array.astype(np.float64)
    top = wide.max(initial=0)
    full = 1.0 if array.dtype.kind == "f" and top <= 1 else 255 if top <= 255 else 65535 if top <= 65535 else 2**32 - 1
    return np.clip(wide * (255.0 / full), 0, 255).round().astype(np.uint8)


def rgb_array(path: str | Path, size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image to a uint8 ``size×size×3`` array (or its own size when ``size`` is None), resized bilinear
    (antialiased); EXIF orientation applied, any mode made RGB. Returns the array and the original (width, height)
    after orientation."""
    path = Path(path)
    try:
        image = Image.open(path)
        full_size = displayed_size(image)  # before draft(), which shrinks image.size
        if size is not None and image.format == "JPEG":
            image.draft("RGB", (2 * size, 2 * size))  # DCT-domain downscale: decodes several times faster
        image.load()
    except Exception:
        image = open_picture(path)  # re-open to raise a precise DataError
        full_size = displayed_size(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GREY_MODES:
        image = Image.fromarray(to_8bit(np.asarray(image)))
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA") else image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy(), full_size
