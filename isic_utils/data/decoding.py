"""Decoding, once: every image and mask read, converted and resized to the model's size, and the uint8 tensors
cached on disk keyed by the source files and the size.

Input policy: every case is either an error naming the file and the fix (``DataError``), or a documented conversion.
Errors: a file that cannot be decoded (zero bytes, truncated, not an image, unreadable permissions, past Pillow's
size limit); a mask whose size differs from its image's; a colour mask whose channels differ (not a label map).
Conversions (each has one obvious meaning): EXIF orientation is applied to images (masks are drawn on the displayed
image); grayscale, 16-bit grey (scaled, not clipped), CMYK, palette and RGBA images become RGB (alpha is dropped);
RGB/RGBA masks with equal channels, palette and 16-bit masks become 8-bit grey; a mask whose maximum is 1 is read as
{0, 1} labels, any other is binarised at > 127 of 255. Images are resized antialiased bilinear, masks nearest.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..base.files import atomic_path, progress_bar
from .pictures import MASK_MODES, WIDE_GREY_MODES, open_picture, rgb_array, to_8bit
from .sources import DataError, Pair

CACHE_VERSION = 1


# ----------------------------------------------------------------------------- decoding


def read_image(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an image to a uint8 ``3×size×size`` tensor (or its own size when ``size`` is None): ``rgb_array``.

    EXIF orientation is applied; any mode becomes RGB. Returns the tensor and the original
    (width, height) after orientation.
    """
    array, full_size = rgb_array(path, size)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), full_size


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 ``3×H×W`` image resized to ``3×size×size`` the way ``read_image`` resizes (PIL, bilinear)."""
    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    array = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: str | Path, size: int | None = None, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode a mask to a uint8 ``1×size×size`` tensor of {0, 1} (nearest-neighbour resize).

    See the module docstring for the conversions; raises ``DataError`` for a colour mask, or when
    ``expected_size`` (the image's (width, height)) is given and the mask's size differs.
    """
    path = Path(path)
    image = open_picture(path)
    if expected_size is not None and tuple(image.size) != tuple(expected_size):
        raise DataError(
            f"mask {path} is {image.size[0]}×{image.size[1]} but its image is {expected_size[0]}×{expected_size[1]}. "
            "The mask must have its image's size: re-export it at the image's size."
        )
    if image.mode not in MASK_MODES:
        raise DataError(
            f"{path} is a {image.mode} image; masks must be single-channel 0/255 (grey, 1-bit or RGB with "
            "equal channels): re-export it as a grayscale PNG."
        )
    array = np.asarray(image)
    if image.mode in ("RGB", "RGBA"):
        channels = array[..., :3]
        if not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise DataError(
                f"{path} is a colour mask (its R, G and B channels differ). Masks must be single-channel "
                "0/255 PNGs: re-export it as grayscale."
            )
        array = channels[..., 0]
    elif image.mode == "P":
        array = np.asarray(image.convert("L"))
    elif image.mode in WIDE_GREY_MODES:
        array = to_8bit(array)
    elif image.mode == "1":
        array = array.astype(np.uint8)
    elif image.mode == "LA":
        array = array[..., 0]
    binary = (array > 0) if array.max() <= 1 else (array > 127)
    mask = Image.fromarray(binary.astype(np.uint8) * 255)
    if size is not None:
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.uint8)).unsqueeze(0)


@dataclass
class DecodedSplit:
    """Decoded, resized images and masks of one split, in memory.

    ``images``: uint8 ``N×3×S×S``; ``masks``: uint8 ``N×1×S×S`` of {0, 1}; ``sizes``: original (width, height).
    """

    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    sizes: list[tuple[int, int]]
    sources: list[Pair] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: Sequence[str]) -> DecodedSplit:
        """The rows for ``ids``, in that order."""
        index = {i: k for k, i in enumerate(self.ids)}
        rows = torch.tensor([index[i] for i in ids], dtype=torch.long)
        return DecodedSplit(
            list(ids),
            self.images[rows],
            self.masks[rows],
            [self.sizes[k] for k in rows.tolist()],
            [self.sources[k] for k in rows.tolist()] if self.sources else [],
        )


def _decode_pair(pair: Pair, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    image, full_size = read_image(pair.image, size)
    return image, read_mask(pair.mask, size, expected_size=full_size), full_size


def sources_key(pairs: Sequence[Pair], size: int) -> str:
    """What a split decoded from ``pairs`` at ``size`` depends on: each file's path, size and modification time (a
    hash; it names the decode cache, and the options study's stored scores are keyed by it)."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}:{size}".encode())
    for pair in pairs:
        for path in (pair.image, pair.mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


_CONTENT_KEYS: dict[str, str] = {}  # sources_key → content_key, for this process: each file is read once


def content_key(pairs: Sequence[Pair]) -> str:
    """What the files of ``pairs`` hold, in order: a hash of every image's and mask's bytes, wherever the files are
    and whenever they were written. A data folder copied, moved or provisioned anew keeps its key; an edited file
    changes it. (The options study's stored scores are keyed by it: scoring them again takes many minutes, hashing
    1,149 images a fraction of a second.)"""
    stat_key = sources_key(pairs, 0)
    if stat_key not in _CONTENT_KEYS:
        digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
        for pair in pairs:
            for path in (pair.image, pair.mask):
                with open(path, "rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
        _CONTENT_KEYS[stat_key] = digest.hexdigest()[:16]
    return _CONTENT_KEYS[stat_key]


def decode_pairs(
    pairs: Sequence[Pair],
    image_size: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> DecodedSplit:
    """Decode and resize ``pairs`` once; with ``cache_dir``, reuse the cached tensors on the next call.

    The cache file is keyed by each source file's path, size and modification time and by ``image_size``,
    so an edited file or another size decodes again.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"decoded_{image_size}px_{sources_key(pairs, image_size)}.pt"
        if cache_file.exists():
            try:
                stored = torch.load(cache_file, weights_only=True)
                if stored["ids"] != [p.id for p in pairs]:
                    raise ValueError("it holds other ids")
                return DecodedSplit(
                    stored["ids"], stored["images"], stored["masks"], [tuple(s) for s in stored["sizes"]], list(pairs)
                )
            except Exception as exc:  # truncated, overwritten or from another version: decoding again is safe
                warnings.warn(
                    f"decode cache {cache_file} is unreadable ({type(exc).__name__}: {exc}); decoding the "
                    "images again and rewriting it.",
                    stacklevel=2,
                )
    count = len(pairs)
    images = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    masks = torch.empty(count, 1, image_size, image_size, dtype=torch.uint8)
    sizes: list[tuple[int, int]] = [(0, 0)] * count
    # PIL releases the GIL while decoding, so one thread per CPU the OS reports decodes in parallel.
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda pair: _decode_pair(pair, image_size), pairs)
        shown = progress_bar(results, total=count, desc="decode", enabled=progress, unit="images")
        for k, (image, mask, size) in enumerate(shown):
            images[k], masks[k], sizes[k] = image, mask, size
    decoded = DecodedSplit([p.id for p in pairs], images, masks, sizes, list(pairs))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            torch.save({"ids": decoded.ids, "images": images, "masks": masks, "sizes": [list(s) for s in sizes]}, tmp)
    return decoded
