"""Where the data is: the official ISIC lesion-segmentation archives (ISIC 2016 Part 1, ISIC 2017 Part 1, ISIC 2018
Task 1: ``RELEASES``) downloaded, verified and extracted, and the image/mask pairs found in them and in external sets
(another clinic's images in their own layout, e.g. PH2).

Layout (a release's official archives, unzipped under one root; ISIC 2016 shown, the others in ``RELEASES``)::

    ROOT/ISBI2016_ISIC_Part1_Training_Data/ISIC_0000000.jpg
    ROOT/ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_0000000_Segmentation.png   (2017, 2018: _segmentation.png)
    ROOT/ISBI2016_ISIC_Part1_Test_Data/...        ROOT/ISBI2016_ISIC_Part1_Test_GroundTruth/...

Errors (``DataError``, nothing is silently dropped): a missing split folder or one with no images; an image without
mask, a mask without image, two files for one id (``.jpg`` and ``.png``). Ignored: stray files (``.DS_Store``,
``*_superpixels.png``, ``__MACOSX``, anything not named ``ISIC_<digits>``).

External sets are read by ``find_external_pairs`` with the same policy: images ``*.jpg|*.jpeg|*.png|*.bmp|*.tif``
matched by a glob, each mask found by a naming rule relative to its image's folder (``{stem}_Segmentation.png``,
``../masks/{stem}.png``, PH2's ``../{stem}_lesion/{stem}_lesion.bmp``).
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..base.files import progress_bar, third_party_progress


@dataclass(frozen=True)
class Release:
    """One official ISIC lesion-segmentation release as its archives unzip: per split the image folder and the mask
    folder (each archive's name is its folder's), how many pairs each split holds, where the archives are."""

    key: str  # the profile's data_source
    name: str  # how pages say it
    folders: dict[str, tuple[str, str]]  # split ("train", "validation", "test") -> (images, masks)
    counts: dict[str, int]
    url: str
    mask_suffix: str

    def layout(self, split: str) -> dict[str, str]:
        """The split as an external set's layout: the images glob and the mask rule (``EXTERNAL_LAYOUTS``)."""
        images, masks = self.folders[split]
        return {"images": f"{images}/*", "masks": f"../{masks}/{{stem}}{self.mask_suffix}"}


CHALLENGE_URL = "https://isic-challenge-data.s3.amazonaws.com"
RELEASES = {
    "isic2016": Release(
        "isic2016",
        "ISIC 2016",
        {
            "train": ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
            "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
        },
        {"train": 900, "test": 379},
        f"{CHALLENGE_URL}/2016",
        "_Segmentation.png",
    ),
    "isic2017": Release(
        "isic2017",
        "ISIC 2017",
        {
            "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
            "validation": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
            "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
        },
        {"train": 2000, "validation": 150, "test": 600},
        f"{CHALLENGE_URL}/2017",
        "_segmentation.png",
    ),
    "isic2018": Release(
        "isic2018",
        "ISIC 2018",
        {
            "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
            "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
            "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
        },
        {"train": 2594, "validation": 100, "test": 1000},
        f"{CHALLENGE_URL}/2018",
        "_segmentation.png",
    ),
}
SPLIT_FOLDERS = RELEASES["isic2016"].folders  # the 2016 layout, which the synthetic data copies
OFFICIAL_COUNTS = RELEASES["isic2016"].counts
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXTERNAL_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Named layouts of external sets: a glob for the images under the set's folder, and the mask's path relative to
# each image's folder ({stem}: the image's name without its suffix). Every split of every release is one too
# (``isic2018_train``: the ISIC 2018 training archives, as the later releases' shared sample is laid out).
EXTERNAL_LAYOUTS = {
    "ph2": {"images": "**/*_Dermoscopic_Image/*.bmp", "masks": "../{stem}_lesion/{stem}_lesion.bmp"},
    "isic": {"images": "*", "masks": "{stem}_Segmentation.png"},
    "masks_folder": {"images": "images/*", "masks": "../masks/{stem}.png"},
    **{f"{key}_{split}": release.layout(split) for key, release in RELEASES.items() for split in release.folders},
}
PH2_URL = "https://www.fc.up.pt/addi/ph2%20database.html"
_ID = re.compile(r"^(ISIC_\d+)$")
_MASK = re.compile(r"^(ISIC_\d+)_Segmentation\.png$", re.IGNORECASE)


class DataError(ValueError):
    """A problem with the input data; the message names the file and the fix."""


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    mask: Path


# ----------------------------------------------------------------------------- finding files


def find_pairs(root: str | Path, split: str, release: str = "isic2016") -> list[Pair]:
    """Pair images with masks by id in ``root``'s official folders of ``release`` (``RELEASES``) for ``split``
    ("train", "test", or "validation" where the release has one).

    Returns pairs sorted by id. Raises ``DataError`` for a missing folder, an empty folder, an unpaired
    image or mask, or two images with one id.
    """
    root, official = Path(root), RELEASES[release]
    image_folder, mask_folder = official.folders[split]
    image_dir, mask_dir = root / image_folder, root / mask_folder
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise DataError(
                f"folder {folder} not found. Expected the official {official.name} layout under {root} "
                f"(folders {image_folder}/ and {mask_folder}/); found {present or 'nothing'}. "
                f"Unzip the archives there, or let the report download them (download: true)."
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
    _unpaired(
        sorted(set(images) - set(masks)),
        lambda i: f"mask missing for {i} in {mask_dir}/ (expected {i}{official.mask_suffix})",
        "Restore the mask or remove the image.",
    )
    _unpaired(
        sorted(set(masks) - set(images)),
        lambda i: f"image missing for mask {masks[i].name} in {image_dir}/ (expected {i}.jpg)",
        "Restore the image or remove the mask.",
    )
    return [Pair(i, images[i], masks[i]) for i in sorted(images)]


def _unpaired(ids: list[str], first: Callable[[str], str], fix: str) -> None:
    """A ``DataError`` naming the first of ``ids`` (an image without its mask, or the reverse), how many more, and
    ``fix``; nothing when ``ids`` is empty."""
    if ids:
        more = f" and {len(ids) - 1} more" if len(ids) > 1 else ""
        raise DataError(f"{first(ids[0])}{more}. {fix}")


def has_split(root: str | Path, split: str, release: str = "isic2016") -> bool:
    """True when both official folders of ``release``'s ``split`` exist under ``root``."""
    return all((Path(root) / name).is_dir() for name in RELEASES[release].folders[split])


NOT_IMAGES = ("_Segmentation", "_superpixels", "_lesion", "_overlay")  # masks, and the overlays predict writes
COLOUR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")
OVERLAY_COMMENT = b"isic_utils predict overlay"  # the JPEG comment of an overlay predict wrote


def folder_images(folder: str | Path, option: str) -> tuple[list[Path], list[Path]]:
    """The images a command reads from ``folder`` (``option`` names its flag in errors), sorted, and the files it
    leaves out. A file is left out when it is not a JPEG/PNG/BMP/TIFF, or when it belongs to an image of the folder:
    named after it (``a_Segmentation.png``, ``a_lesion.bmp``, ``a_superpixels.png`` beside ``a.jpg``) and one
    channel (a mask), or an overlay predict wrote (``a_overlay.jpg``: beside ``a.jpg``, or saying so in its JPEG
    comment). ``arm_lesion.jpg`` with no ``arm`` image is an image. ``DataError`` for a missing folder, a file, or a folder without images."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise DataError(f"{option} {folder} {what}: point it at a folder of images.")
    everything = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    pictures = [p for p in everything if p.suffix.lower() in EXTERNAL_IMAGE_SUFFIXES]
    stems = {p.stem for p in pictures}
    files = [p for p in pictures if not _belongs_to_an_image(p, stems)]
    if not files:
        raise DataError(f"no .jpg/.jpeg/.png/.bmp/.tif images in {folder}. Point {option} at a folder of images.")
    return files, [p for p in everything if p not in files]


def _belongs_to_an_image(path: Path, stems: set[str]) -> bool:
    """Whether ``path`` is a mask or an overlay of another image of its folder (see ``folder_images``)."""
    for suffix in NOT_IMAGES:
        if not path.stem.endswith(suffix):
            continue
        try:
            with Image.open(path) as opened:
                if suffix == "_overlay":  # predict's, by its comment, wherever its image is now
                    return opened.info.get("comment") == OVERLAY_COMMENT or path.stem[: -len(suffix)] in stems
                return path.stem[: -len(suffix)] in stems and opened.mode not in COLOUR_MODES
        except (OSError, ValueError):
            return False  # not readable as a picture: read as an image, whose error names it
    return False


def find_external_pairs(root: str | Path, images: str = "*", masks: str = "{stem}_Segmentation.png") -> list[Pair]:
    """Pair an external set's images with their masks: every ``*.jpg|*.jpeg|*.png|*.bmp|*.tif`` file matching the
    glob ``images`` under ``root``, its mask at ``masks.format(stem=...)`` relative to the image's folder.

    Files that are some image's mask, hidden files and ``*_superpixels`` files are not images. Returns pairs sorted
    by id (the image's stem). Raises ``DataError`` for a missing folder, no images, an image without its mask, or two
    images with one stem; a mask of another size than its image is refused when decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"external data folder {root} not found. Point the set's dir (or its environment variable) at "
            "the folder holding the images and masks."
        )
    candidates = sorted(
        p
        for p in root.glob(images)
        if p.is_file()
        and p.suffix.lower() in EXTERNAL_IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and "__MACOSX" not in p.parts
        and not p.stem.endswith("_superpixels")
    )
    mask_of = {p: (p.parent / masks.format(stem=p.stem)) for p in candidates}
    mask_paths = {os.path.normpath(m) for m in mask_of.values()}
    pairs: dict[str, Pair] = {}
    missing = []
    for path in candidates:
        if os.path.normpath(path) in mask_paths:  # a mask the images glob also matched
            continue
        mask = Path(os.path.normpath(mask_of[path]))
        if path.stem in pairs:
            raise DataError(
                f"two images with the id {path.stem} under {root}: {pairs[path.stem].image} and {path}. "
                "Keep one file per id."
            )
        if not mask.is_file():
            missing.append((path, mask))
            continue
        pairs[path.stem] = Pair(path.stem, path, mask)
    if missing:
        image, mask = missing[0]
        raise DataError(
            f"mask missing for {image}: expected {mask} (mask rule {masks!r})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + ". Restore the mask, remove the image, or fix the set's masks rule in the profile."
        )
    if not pairs:
        raise DataError(
            f"no images ({', '.join('*' + s for s in EXTERNAL_IMAGE_SUFFIXES)}) matching {images!r} under "
            f"{root}. Check the folder, or the set's images glob / layout in the profile."
        )
    return [pairs[k] for k in sorted(pairs)]


# ----------------------------------------------------------------------------- download


def archive_names(split: str, release: str = "isic2016") -> tuple[str, str]:
    """The two official archive base names (data, ground truth) of ``release``'s ``split``."""
    return RELEASES[release].folders[split]


def verify_zip(path: Path) -> None:
    """Raise ``DataError`` if ``path`` is not a complete zip archive (truncated or corrupt)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a valid zip archive ({exc}). Delete it and download again.") from exc
    if bad is not None:
        raise DataError(f"{path} is corrupt (member {bad} fails its CRC check). Delete it and download again.")


MAX_EXTRACTED_BYTES = (
    16 * 2**30
)  # the largest official archive (ISIC 2018 training images) holds about 10 GB; more is refused


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
            raise DataError(
                f"{archive_path} would expand to {total / 2**30:.1f} GiB (more than {max_bytes / 2**30:.0f} "
                "GiB): not an official ISIC archive. Delete it and download again."
            )
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


def download_release(
    root: str | Path,
    release: str = "isic2016",
    splits: Sequence[str] = ("train", "test"),
    base_url: str | None = None,
    expected_counts: dict[str, int] | None = None,
) -> Path:
    """Download and extract the official archives of ``release`` (``RELEASES``) for ``splits`` into ``root``.

    Uses torchvision's download helper (progress bar); an archive is downloaded to ``NAME.zip.part`` and
    renamed only once complete and valid, so an interrupted download is redone, never trusted. Splits whose
    folders already exist are skipped; into a split's folder that exists alone, the archive's files are added and
    the files already there are kept (``safe_extract``). After extraction the image/mask counts are verified against
    ``expected_counts`` (default: the release's official counts, e.g. 900 / 379 for ISIC 2016). Returns ``root``.
    """
    from torchvision.datasets.utils import download_url

    root, official = Path(root), RELEASES[release]
    base_url = base_url or official.url
    root.mkdir(parents=True, exist_ok=True)
    expected_counts = official.counts if expected_counts is None else expected_counts
    for split in splits:
        if has_split(root, split, release):
            continue
        for name in archive_names(split, release):
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
        pairs = find_pairs(root, split, release)
        if expected_counts.get(split) is not None and len(pairs) != expected_counts[split]:
            raise DataError(
                f"{root}: {len(pairs)} {split} image/mask pairs after extraction, expected {expected_counts[split]}. "
                f"Delete {', '.join(archive_names(split, release))} (folders and .zip) under {root} and download "
                "again."
            )
    return root
