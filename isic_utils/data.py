"""ISIC 2016 Part 1 data: find, download, verify, decode once, cache, split and augment.

Layout (the official archives, unzipped under one root)::

    ROOT/ISBI2016_ISIC_Part1_Training_Data/ISIC_0000000.jpg
    ROOT/ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_0000000_Segmentation.png
    ROOT/ISBI2016_ISIC_Part1_Test_Data/...        ROOT/ISBI2016_ISIC_Part1_Test_GroundTruth/...

Input policy: every case is either an error naming the file and the fix, or a documented conversion.

Errors (``DataError``, nothing is silently dropped):
  - missing split folder, or a folder with no images;
  - image without mask, mask without image, two files for one id (``.jpg`` and ``.png``);
  - a file that cannot be decoded (zero bytes, truncated, not an image, unreadable permissions);
  - a mask whose size differs from its image's;
  - a colour mask whose channels differ (it is not a label map).

Conversions (applied silently, because each has one obvious meaning):
  - EXIF orientation is applied to images (masks are drawn on the displayed image);
  - grayscale, 16-bit grey (scaled, not clipped), CMYK, palette and RGBA images become RGB (alpha is dropped);
  - masks: RGB/RGBA masks with equal channels, palette and 16-bit masks become 8-bit grey;
    a mask whose maximum is 1 (values {0, 1}) is read as {0, 1} labels; any other mask is binarised at > 127
    of 255 (so anti-aliased edges go to the nearer class).

Ignored: stray files (``.DS_Store``, ``*_superpixels.png``, ``__MACOSX``, anything not named ``ISIC_<digits>``).

External sets (another clinic's images, e.g. PH2) are read by ``find_external_pairs`` with the same error policy:
images ``*.jpg|*.jpeg|*.png|*.bmp|*.tif`` matched by a glob, each mask found by a naming rule relative to its image's
folder (``{stem}_Segmentation.png``, ``../masks/{stem}.png``, PH2's ``../{stem}_lesion/{stem}_lesion.bmp``), masks
1-bit, grey or RGB with equal channels.

Colour constancy (``color_constancy``: shades of grey, Minkowski norm 6) is applied to the decoded, resized uint8
images by one function, ``apply_color_constancy``, wherever a model sees images: training, evaluation, ``predict``
and the external chapter.

Decoding happens once: images are resized to ``image_size`` (antialiased bilinear), masks with
nearest-neighbour, and the uint8 tensors are cached on disk keyed by the source files and the size.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import atomic_path, progress_bar, third_party_progress

SPLIT_FOLDERS = {
    "train": ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
    "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
}
OFFICIAL_COUNTS = {"train": 900, "test": 379}
ISIC2016_URL = "https://isic-challenge-data.s3.amazonaws.com/2016"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXTERNAL_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Named layouts of external sets: a glob for the images under the set's folder, and the mask's path relative to
# each image's folder ({stem}: the image's name without its suffix).
EXTERNAL_LAYOUTS = {
    "ph2": {"images": "**/*_Dermoscopic_Image/*.bmp", "masks": "../{stem}_lesion/{stem}_lesion.bmp"},
    "isic": {"images": "*", "masks": "{stem}_Segmentation.png"},
    "masks_folder": {"images": "images/*", "masks": "../masks/{stem}.png"},
}
PH2_URL = "https://www.fc.up.pt/addi/ph2%20database.html"
MASK_SUFFIX = "_Segmentation.png"
_ID = re.compile(r"^(ISIC_\d+)$")
_MASK = re.compile(r"^(ISIC_\d+)_Segmentation\.png$", re.IGNORECASE)
CACHE_VERSION = 1


class DataError(ValueError):
    """A problem with the input data; the message names the file and the fix."""


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    mask: Path


# ----------------------------------------------------------------------------- finding files


def find_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pair images with masks by id in ``root``'s official folders for ``split`` ("train" or "test").

    Returns pairs sorted by id. Raises ``DataError`` for a missing folder, an empty folder, an unpaired
    image or mask, or two images with one id.
    """
    root = Path(root)
    image_folder, mask_folder = SPLIT_FOLDERS[split]
    image_dir, mask_dir = root / image_folder, root / mask_folder
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise DataError(
                f"folder {folder} not found. Expected the official ISIC 2016 Part 1 layout under {root} "
                f"(folders {image_folder}/ and {mask_folder}/); found {present or 'nothing'}. "
                "Unzip the archives there, or download them with isic_utils.data.download_isic2016()."
            )
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = _ID.match(path.stem)
        if match is None:  # stray files such as ISIC_0000000_superpixels.png
            continue
        if match.group(1) in images:
            raise DataError(
                f"duplicate id {match.group(1)} in {image_dir}/: {images[match.group(1)].name} and {path.name}. "
                "Keep one file per id."
            )
        images[match.group(1)] = path
    masks: dict[str, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        match = _MASK.match(path.name)
        if path.is_file() and match:
            masks[match.group(1)] = path
    if not images:
        raise DataError(f"no ISIC_<id>.jpg images in {image_dir}/. Check the folder or re-extract the archive.")
    missing_masks = sorted(set(images) - set(masks))
    if missing_masks:
        first = missing_masks[0]
        raise DataError(
            f"mask missing for {first} in {mask_dir}/ (expected {first}{MASK_SUFFIX})"
            + (f" and {len(missing_masks) - 1} more" if len(missing_masks) > 1 else "")
            + ". Restore the mask or remove the image."
        )
    missing_images = sorted(set(masks) - set(images))
    if missing_images:
        first = missing_images[0]
        raise DataError(
            f"image missing for mask {masks[first].name} in {image_dir}/ (expected {first}.jpg)"
            + (f" and {len(missing_images) - 1} more" if len(missing_images) > 1 else "")
            + ". Restore the image or remove the mask."
        )
    return [Pair(i, images[i], masks[i]) for i in sorted(images)]


def has_split(root: str | Path, split: str) -> bool:
    """True when both official folders of ``split`` exist under ``root``."""
    return all((Path(root) / name).is_dir() for name in SPLIT_FOLDERS[split])


def find_external_pairs(root: str | Path, images: str = "*", masks: str = "{stem}_Segmentation.png") -> list[Pair]:
    """Pair an external set's images with their masks: every ``*.jpg|*.jpeg|*.png|*.bmp|*.tif`` file matching the
    glob ``images`` under ``root``, its mask at ``masks.format(stem=...)`` relative to the image's folder.

    Files that are some image's mask, hidden files and ``*_superpixels`` files are not images. Returns pairs sorted
    by id (the image's stem). Raises ``DataError`` for a missing folder, no images, an image without its mask, or two
    images with one stem; a mask of another size than its image is refused when decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"external data folder {root} not found. Point the set's dir (or its environment variable) at "
                        "the folder holding the images and masks.")
    candidates = sorted(p for p in root.glob(images) if p.is_file() and p.suffix.lower() in EXTERNAL_IMAGE_SUFFIXES
                        and not p.name.startswith(".") and "__MACOSX" not in p.parts
                        and not p.stem.endswith("_superpixels"))
    mask_of = {p: (p.parent / masks.format(stem=p.stem)) for p in candidates}
    mask_paths = {os.path.normpath(m) for m in mask_of.values()}
    pairs: dict[str, Pair] = {}
    missing = []
    for path in candidates:
        if os.path.normpath(path) in mask_paths:  # a mask the images glob also matched
            continue
        mask = Path(os.path.normpath(mask_of[path]))
        if path.stem in pairs:
            raise DataError(f"two images with the id {path.stem} under {root}: {pairs[path.stem].image} and {path}. "
                            "Keep one file per id.")
        if not mask.is_file():
            missing.append((path, mask))
            continue
        pairs[path.stem] = Pair(path.stem, path, mask)
    if missing:
        image, mask = missing[0]
        raise DataError(f"mask missing for {image}: expected {mask} (mask rule {masks!r})"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                        + ". Restore the mask, remove the image, or fix the set's masks rule in the profile.")
    if not pairs:
        raise DataError(f"no images ({', '.join('*' + s for s in EXTERNAL_IMAGE_SUFFIXES)}) matching {images!r} under "
                        f"{root}. Check the folder, or the set's images glob / layout in the profile.")
    return [pairs[k] for k in sorted(pairs)]


# ----------------------------------------------------------------------------- download


def archive_names(split: str) -> tuple[str, str]:
    """The two official archive base names (data, ground truth) for ``split``."""
    return SPLIT_FOLDERS[split]


def verify_zip(path: Path) -> None:
    """Raise ``DataError`` if ``path`` is not a complete zip archive (truncated or corrupt)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"{path} is not a valid zip archive ({exc}). Delete it and download again."
        ) from exc
    if bad is not None:
        raise DataError(f"{path} is corrupt (member {bad} fails its CRC check). Delete it and download again.")


MAX_EXTRACTED_BYTES = 16 * 2**30  # the four official archives hold about 1.5 GB; a zip that claims more is refused


def safe_extract(archive_path: Path, target: Path, max_bytes: int = MAX_EXTRACTED_BYTES) -> list[Path]:
    """Extract a zip into ``target``; refuses members that would land outside it (``..`` or absolute paths) and an
    archive whose members add up to more than ``max_bytes`` (one that expands without end).

    Members are extracted into a staging folder beside ``target`` first; each top-level entry is renamed into
    ``target`` only once the whole archive is out, so a run killed half-way never leaves a folder that a later
    run would take for a complete split. A folder that exists already is never replaced: the archive's files are
    added to it and a file of the same name there is kept as it is.
    """
    target = target.resolve()
    staging = target / f".extracting-{archive_path.stem}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    written = []
    with zipfile.ZipFile(archive_path) as archive:
        total = sum(member.file_size for member in archive.infolist())
        if total > max_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"{archive_path} would expand to {total / 2**30:.1f} GiB (more than {max_bytes / 2**30:.0f} "
                            "GiB): not an official ISIC archive. Delete it and download again.")
        members = archive.infolist()
        for member in progress_bar(members, total=len(members), desc=f"extract {archive_path.name}", unit="files"):
            name = member.filename
            destination = (staging / name).resolve()
            if name.startswith(("/", "\\")) or ".." in Path(name).parts or not destination.is_relative_to(staging):
                shutil.rmtree(staging, ignore_errors=True)
                raise DataError(
                    f"{archive_path} holds member {name!r}, which would be written outside {target}. "
                    "The archive is not an official ISIC archive; delete it."
                )
            if name.startswith("__MACOSX/"):
                continue
            archive.extract(member, staging)
            written.append(target / name)
    for entry in staging.iterdir():
        _move_in(entry, target / entry.name)
    shutil.rmtree(staging)
    return written


def _move_in(source: Path, final: Path) -> None:
    """Move ``source`` to ``final``; into an existing folder file by file, keeping every file already there."""
    if not final.exists():
        os.replace(source, final)
    elif source.is_dir() and final.is_dir():
        for entry in source.iterdir():
            _move_in(entry, final / entry.name)


def download_isic2016(
    root: str | Path,
    splits: Sequence[str] = ("train", "test"),
    base_url: str = ISIC2016_URL,
    expected_counts: dict[str, int] | None = None,
) -> Path:
    """Download and extract the official ISIC 2016 Part 1 archives for ``splits`` into ``root``.

    Uses torchvision's download helper (progress bar); an archive is downloaded to ``NAME.zip.part`` and
    renamed only once complete and valid, so an interrupted download is redone, never trusted. Splits whose
    folders already exist are skipped; into a split's folder that exists alone, the archive's files are added and
    the files already there are kept (``safe_extract``). After extraction the image/mask counts are verified against
    ``expected_counts`` (default: the official 900 / 379). Returns ``root``.
    """
    from torchvision.datasets.utils import download_url

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected_counts = OFFICIAL_COUNTS if expected_counts is None else expected_counts
    for split in splits:
        if has_split(root, split):
            continue
        for name in archive_names(split):
            archive = root / f"{name}.zip"
            if archive.exists():
                try:
                    verify_zip(archive)
                except DataError:
                    archive.unlink()  # a partial or corrupt file from an earlier run: fetch again
            if not archive.exists():
                partial = root / f"{name}.zip.part"
                partial.unlink(missing_ok=True)
                try:
                    with third_party_progress():  # its bar in the terminal, never in a notebook
                        download_url(f"{base_url}/{name}.zip", str(root), filename=partial.name)
                except Exception as exc:
                    partial.unlink(missing_ok=True)
                    raise DataError(
                        f"could not download {base_url}/{name}.zip ({exc}). Check the network, or download "
                        f"the archive by hand and put it at {archive}."
                    ) from exc
                verify_zip(partial)
                os.replace(partial, archive)
                print(f"download: {archive.name} ({archive.stat().st_size / 2**20:.0f} MB)", flush=True)
            safe_extract(archive, root)
        pairs = find_pairs(root, split)
        if expected_counts.get(split) is not None and len(pairs) != expected_counts[split]:
            raise DataError(
                f"{root}: {len(pairs)} {split} image/mask pairs after extraction, expected {expected_counts[split]}. "
                f"Delete {', '.join(archive_names(split))} (folders and .zip) under {root} and download again."
            )
    return root


# ----------------------------------------------------------------------------- decoding


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except PermissionError as exc:
        raise DataError(f"cannot read {path}: permission denied. Fix its permissions (chmod a+r).") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is larger than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels ({exc}). "
                        "If it is a genuine image of yours, downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS before "
                        "running.") from exc
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


def read_image(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an image to a uint8 ``3×size×size`` tensor (or its own size when ``size`` is None).

    EXIF orientation is applied; any mode becomes RGB. Returns the tensor and the original
    (width, height) after orientation.
    """
    path = Path(path)
    try:
        image = Image.open(path)
        full_size = displayed_size(image)  # before draft(), which shrinks image.size
        if size is not None and image.format == "JPEG":
            image.draft("RGB", (2 * size, 2 * size))  # DCT-domain downscale: decodes several times faster
        image.load()
    except Exception:
        image = _open(path)  # re-open to raise a precise DataError
        full_size = displayed_size(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GREY_MODES:
        image = Image.fromarray(to_8bit(np.asarray(image)))
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA") else image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), full_size


def read_mask(path: str | Path, size: int | None = None, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode a mask to a uint8 ``1×size×size`` tensor of {0, 1} (nearest-neighbour resize).

    See the module docstring for the conversions; raises ``DataError`` for a colour mask, or when
    ``expected_size`` (the image's (width, height)) is given and the mask's size differs.
    """
    path = Path(path)
    image = _open(path)
    if expected_size is not None and tuple(image.size) != tuple(expected_size):
        raise DataError(
            f"mask {path} is {image.size[0]}×{image.size[1]} but its image is {expected_size[0]}×{expected_size[1]}. "
            "The mask must have its image's size: re-export it at the image's size."
        )
    if image.mode not in MASK_MODES:
        raise DataError(f"{path} is a {image.mode} image; masks must be single-channel 0/255 (grey, 1-bit or RGB with "
                        "equal channels): re-export it as a grayscale PNG.")
    array = np.asarray(image)
    if image.mode in ("RGB", "RGBA"):
        channels = array[..., :3]
        if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
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


def _cache_key(pairs: Sequence[Pair], size: int) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION}:{size}".encode())
    for pair in pairs:
        for path in (pair.image, pair.mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


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
        cache_file = Path(cache_dir) / f"decoded_{image_size}px_{_cache_key(pairs, image_size)}.pt"
        if cache_file.exists():
            try:
                stored = torch.load(cache_file, weights_only=True)
                if stored["ids"] != [p.id for p in pairs]:
                    raise ValueError("it holds other ids")
                return DecodedSplit(stored["ids"], stored["images"], stored["masks"],
                                    [tuple(s) for s in stored["sizes"]], list(pairs))
            except Exception as exc:  # truncated, overwritten or from another version: decoding again is safe
                warnings.warn(f"decode cache {cache_file} is unreadable ({type(exc).__name__}: {exc}); decoding the "
                              "images again and rewriting it.", stacklevel=2)
    count = len(pairs)
    images = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    masks = torch.empty(count, 1, image_size, image_size, dtype=torch.uint8)
    sizes: list[tuple[int, int]] = [(0, 0)] * count
    # PIL releases the GIL while decoding, so threads use both cores.
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


# ----------------------------------------------------------------------------- splits


def split_ids(ids: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded random split of ``ids`` into (train, validation); validation gets round(len * fraction) ids.

    900 ids with 0.2 give 720 / 180. Both lists come back sorted.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = sorted(ids)
    n_val = int(round(len(ids) * val_fraction))
    if n_val < 1 or n_val >= len(ids):
        raise DataError(f"cannot split {len(ids)} ids with val_fraction={val_fraction}: need at least one id each side.")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(ids[k] for k in order[:n_val])
    train = sorted(ids[k] for k in order[n_val:])
    return train, val


@dataclass
class ReportData:
    """The three splits the report uses, decoded; ``test_source`` says where the test set came from."""

    train: DecodedSplit
    val: DecodedSplit
    test: DecodedSplit
    test_source: str
    root: Path

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.val), "test": len(self.test)}


def load_report_data(
    root: str | Path,
    image_size: int = 128,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_split: str = "official",
    holdout_fraction: float = 0.2,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    expected_counts: dict[str, int] | None = None,
) -> ReportData:
    """Find, decode (once, cached) and split the data under ``root``.

    ``test_split="official"`` uses the official test folders; ``"holdout"`` holds back ``holdout_fraction`` of
    the training ids as the test set (for data that has no official test folders, such as development
    samples). ``limit`` keeps the first ``limit`` ids of each split (tiny runs). The validation split is taken
    from the remaining training ids with ``seed``; the holdout test split uses a fixed seed (1000) so that every
    seed of a study is scored on the same test images. With ``expected_counts`` (the official 900 / 379) and the
    official test split, other counts give a warning naming the folder: an incomplete copy or extraction.
    """
    root = Path(root)
    train_pairs = find_pairs(root, "train")
    if test_split == "official":
        test_pairs = find_pairs(root, "test")
        source = "official ISIC 2016 test set"
        found = {"train": len(train_pairs), "test": len(test_pairs)}
        if expected_counts and limit is None and found != {k: expected_counts[k] for k in found}:
            warnings.warn(
                f"{root} holds {found['train']} training image/mask pairs (ISIC 2016 has {expected_counts['train']}) "
                f"and {found['test']} test pairs (ISIC 2016 has {expected_counts['test']}). If this is not a subset "
                "on purpose, a copy or an extraction was incomplete: delete the ISBI2016_* folders there and unzip "
                "the archives again (or set download: true).", stacklevel=2)
    elif test_split == "holdout":
        rest, held = split_ids([p.id for p in train_pairs], holdout_fraction, seed=1000)
        by_id = {p.id: p for p in train_pairs}
        train_pairs, test_pairs = [by_id[i] for i in rest], [by_id[i] for i in held]
        source = f"held-out {holdout_fraction:.0%} of the training ids (no official test set used)"
    else:
        raise ValueError(f"test_split must be 'official' or 'holdout', got {test_split!r}")
    if limit is not None:
        train_pairs, test_pairs = train_pairs[:limit], test_pairs[: max(2, limit // 2)]
    train_all = decode_pairs(train_pairs, image_size, cache_dir, progress)
    test = decode_pairs(test_pairs, image_size, cache_dir, progress)
    train_ids, val_ids = split_ids(train_all.ids, val_fraction, seed)
    return ReportData(train_all.subset(train_ids), train_all.subset(val_ids), test, source, root)


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
    scaled = x / (unit * 3 ** 0.5).clamp(min=1e-12)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


AUGMENTATIONS = ("hflip", "vflip", "rot90", "color_jitter", "scale_rotate", "color_strong")
COLOR_JITTER = 0.2  # brightness, contrast and saturation factors in [1 - j, 1 + j], hue shift in ±j/10
SCALE_ROTATE = {"zoom": (1.0, 1.5), "degrees": 20.0}  # random resized crop (area 44–100%) and a small rotation
COLOR_STRONG = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.4, "hue": 0.05, "gamma": (0.7, 1.5)}


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
    if "color_strong" in augment:  # brightness, contrast, saturation, hue, gamma
        draws["color_strong"] = torch.rand(count, 5, generator=generator)
    return draws


def _scale_rotate(images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A random resized crop (zoom in by 1–1.5×, at a random offset inside the image) turned by up to ±20°, for the
    whole batch in one ``grid_sample`` (bilinear for images, nearest for masks, borders reflected)."""
    low, high = SCALE_ROTATE["zoom"]
    u = u.to(images.device, torch.float32)
    zoom = low + (high - low) * u[:, 0]
    angle = torch.deg2rad(SCALE_ROTATE["degrees"] * (2 * u[:, 1] - 1))
    reach = 1 - 1 / zoom  # how far the crop's centre may move, in [-1, 1] coordinates
    shift_x, shift_y = reach * (2 * u[:, 2] - 1), reach * (2 * u[:, 3] - 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection",
                                            align_corners=False)
    moved_masks = torch.nn.functional.grid_sample(masks.float(), grid, mode="nearest", padding_mode="reflection",
                                                  align_corners=False)
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


def apply_augmentation(images: torch.Tensor, masks: torch.Tensor, draws: dict[str, torch.Tensor],
                       jitter: float = COLOR_JITTER) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn flips / 90° rotations jointly to uint8 images and masks, and colour jitter to images only.

    The one augmentation of the project: training, Figure 3 and ``SegmentationDataset`` all call it. Flips and
    rotations are done for the whole batch at once; colour jitter uses ``torchvision.transforms.v2.functional``
    per image (brightness, contrast, saturation, hue, in that order). Images and masks may live on a GPU: the
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
    if "color_strong" in draws:
        images = _color_strong(images, draws["color_strong"])
    return images, masks


def augmentation_examples(images: torch.Tensor, masks: torch.Tensor, seed: int = 0) -> dict[str, tuple]:
    """Each augmentation alone on ``images``/``masks`` (Figure 3's columns), through ``apply_augmentation``.

    Flips and a rotation are forced on so they show; colour jitter is drawn as training draws it (seeded).
    """
    count = len(images)
    generator = torch.Generator().manual_seed(seed)
    every = torch.ones(count, dtype=torch.bool)
    return {
        "original": (images, masks),
        "horizontal flip": apply_augmentation(images, masks, {"hflip": every}),
        "vertical flip": apply_augmentation(images, masks, {"vflip": every}),
        "90° rotation": apply_augmentation(images, masks, {"rot90": torch.randint(1, 4, (count,), generator=generator)}),
        "colour jitter": apply_augmentation(images, masks, draw_augmentation(count, ["color_jitter"], generator)),
        "crop and rotation": apply_augmentation(images, masks, draw_augmentation(count, ["scale_rotate"], generator)),
        "strong colour": apply_augmentation(images, masks, draw_augmentation(count, ["color_strong"], generator)),
    }


class SegmentationDataset(torch.utils.data.Dataset):
    """Normalised images and float masks from a ``DecodedSplit``, with the training augmentation (seeded).

    Yields ``(image float32 3×S×S normalised with mean/std, mask float32 1×S×S of {0, 1})``.
    The training loop itself slices whole batches from memory; this class is for inspection, figures and users
    who want a standard DataLoader. Augmentation draws come from one generator seeded with ``seed``.
    """

    def __init__(self, split: DecodedSplit, mean, std, augment: Sequence[str] = (), seed: int = 0):
        self.split, self.mean, self.std, self.augment = split, mean, std, tuple(augment)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image, mask = self.split.images[index:index + 1], self.split.masks[index:index + 1]
        if self.augment:
            image, mask = apply_augmentation(image, mask, draw_augmentation(1, self.augment, self.generator))
        return normalize(image, self.mean, self.std)[0], mask[0].float()


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
        paired = not split.sources or split.sources[k].mask.name == f"{image_id}{MASK_SUFFIX}"
        rows.append({
            "id": image_id,
            "mask_named_for_image": paired,
            "lesion_fraction": float(area[k]),
            "lesion_darker_than_skin": bool(inside[k] < outside[k]),
            "contrast": float(outside[k] - inside[k]) / 255,
        })
    return pd.DataFrame(rows)
