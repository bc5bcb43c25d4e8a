"""The embedded default: a deterministic synthetic lesion data set in the official ISIC 2016 folder layout.

Each image is skin-toned with low- and high-frequency texture and dermoscope vignetting; it holds one irregular
pigmented lesion (random harmonics on a circle, varied colour, contrast, size and position, a darker core and
blotches) and a few hairs drawn across it. Original sizes vary (600–1,500 px wide, 4:3-ish) so the size
distribution means something. Masks are 0/255 PNGs of the lesion. Same seed → same files.

It is not dermoscopy: numbers on it say that the pipeline works, not how well a model segments real lesions.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..base.files import atomic_path, write_json
from .sources import SPLIT_FOLDERS, DataError, has_split

MARKER = "synthetic.json"


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random grid upsampled bicubically to width × height."""
    grid = rng.uniform(0, 255, size=(cells, max(2, int(cells * height / width)), channels)).astype(np.uint8)
    layers = [
        np.asarray(Image.fromarray(grid[..., c].T).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        for c in range(channels)
    ]
    return np.stack(layers, axis=-1) / 127.5 - 1


def make_lesion_image(seed: int) -> tuple[Image.Image, Image.Image]:
    """One synthetic (image, mask) pair, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    width = int(rng.integers(600, 1501))
    height = int(round(width * rng.uniform(0.66, 0.8)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    skin = np.array([rng.uniform(200, 240), rng.uniform(150, 195), rng.uniform(125, 170)], dtype=np.float32)
    image = np.broadcast_to(skin, (height, width, 3)).copy()
    image += 14 * _smooth_noise(rng, width, height, 6, 3)
    image += 5 * rng.standard_normal(size=(height, width, 1), dtype=np.float32)

    # the lesion: a circle whose radius varies with a few random harmonics of the angle
    scale = min(width, height)
    cx = width * (0.5 + rng.uniform(-0.15, 0.15))
    cy = height * (0.5 + rng.uniform(-0.15, 0.15))
    radius = scale * rng.uniform(0.2, 0.42)  # lesion covers ~1/3 of the image on average, as in ISIC 2016
    theta = np.arctan2(yy - cy, xx - cx)
    boundary = np.ones_like(theta)
    for k in range(2, 8):
        boundary += rng.uniform(0.02, 0.16) / k**0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(xx - cx, yy - cy) / (radius * boundary)
    edge = rng.uniform(0.03, 0.12)  # width of the blurred border, as a fraction of the radius
    alpha = np.clip((1 + edge - distance) / (2 * edge), 0, 1)
    mask = distance < 1.0

    darkness = rng.uniform(0.35, 0.8)  # low values: faint, hard lesions
    hue = rng.choice([[0.55, 0.38, 0.30], [0.45, 0.28, 0.22], [0.60, 0.35, 0.38], [0.40, 0.33, 0.32]])
    lesion = skin * (1 - darkness) + darkness * np.array(hue, dtype=np.float32) * 255 * rng.uniform(0.5, 0.9)
    core = np.clip(1 - distance, 0, 1)[..., None]
    blotches = _smooth_noise(rng, width, height, 10)
    colour = lesion * (1 - 0.35 * core) * (1 + 0.18 * blotches)
    image = image * (1 - alpha[..., None]) + colour * alpha[..., None]

    # dermoscope vignetting: darker towards the corners, sometimes a dark circular rim
    r2 = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
    image *= (1 - rng.uniform(0.05, 0.3) * r2)[..., None]
    if rng.uniform() < 0.3:
        image *= np.clip(1.9 - r2, 0.05, 1)[..., None]

    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(0, 7))):  # hairs: dark quadratic curves
        p0, p1, p2 = (rng.uniform([0, 0], [width, height]) for _ in range(3))
        t = np.linspace(0, 1, 40)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        shade = int(rng.uniform(20, 70))
        draw.line(
            [tuple(p) for p in curve],
            fill=(shade, shade - 10 if shade > 10 else 0, shade // 2),
            width=int(rng.integers(2, 5)),
        )
    picture = picture.filter(ImageFilter.GaussianBlur(radius=0.8))
    return picture, Image.fromarray((mask * 255).astype(np.uint8))


def refuse_foreign_files(root: Path, marker: Path) -> None:
    """Synthetic data replaces only what synthetic generation wrote: a folder holding files but no marker is someone's
    data (a real ISIC copy named by ``data_dir`` while the profile is synthetic) and is never written into."""
    if marker.exists() or not root.is_dir():
        return
    found = next((p for p in sorted(root.rglob("*")) if p.is_file()), None)
    if found is not None:
        raise DataError(
            f"{root} already holds files that synthetic generation did not write (e.g. {found.relative_to(root)}), "
            f"so no synthetic data is written there and nothing in it is touched. Fix: for real ISIC data use "
            f"DATA=isic2016 (data_source: isic2016) with this data_dir; for synthetic data name an empty or new "
            f"folder, or leave data_dir unset."
        )


def make_synthetic_isic(root: str | Path, n_train: int = 200, n_test: int = 60, seed: int = 0) -> Path:
    """Write ``n_train`` training and ``n_test`` test pairs under ``root`` in the official layout.

    Skips the work when ``root`` already holds a set made with the same arguments. Writes only into a folder it
    owns: an empty or new one, or one holding its marker (``synthetic.json``); a folder with files of its own (real
    ISIC images, say) is refused with a ``DataError`` and left as it is. Returns ``root``.
    """
    root = Path(root)
    settings = {"n_train": n_train, "n_test": n_test, "seed": seed, "version": 2}
    marker = root / MARKER
    if (
        marker.exists()
        and json.loads(marker.read_text()) == settings
        and has_split(root, "train")
        and has_split(root, "test")
    ):
        return root
    refuse_foreign_files(root, marker)
    write_json(marker, {**settings, "complete": False})  # ours from the first file on: a killed run is redone
    for split, count, first_id in (("train", n_train, 0), ("test", n_test, 1_000_000)):
        image_dir, mask_dir = (root / name for name in SPLIT_FOLDERS[split])
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(image_dir.glob("ISIC_*.jpg")) + list(mask_dir.glob("ISIC_*_Segmentation.png")):
            stale.unlink()

        def write(k: int, image_dir=image_dir, mask_dir=mask_dir, first_id=first_id) -> None:
            image_id = f"ISIC_{first_id + k:07d}"
            image, mask = make_lesion_image(seed * 10_000_019 + first_id + k)
            with atomic_path(image_dir / f"{image_id}.jpg") as tmp:
                image.save(tmp, format="JPEG", quality=90)
            with atomic_path(mask_dir / f"{image_id}_Segmentation.png") as tmp:
                mask.save(tmp, format="PNG")

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(write, range(count)))
    write_json(marker, settings)
    return root


PH2_FOLDER = "PH2 Dataset images"


def make_synthetic_external(root: str | Path, count: int = 20, seed: int = 1) -> Path:
    """Write ``count`` synthetic cases "from another clinic" under ``root`` in PH2's own layout::

        root/PH2 Dataset images/IMD001/IMD001_Dermoscopic_Image/IMD001.bmp
        root/PH2 Dataset images/IMD001/IMD001_lesion/IMD001_lesion.bmp

    The images are 24-bit BMPs of about 768×576 with another camera's colour cast (bluer, a gamma) and the masks
    binary BMPs, most 1-bit and every fourth RGB 0/255, as in PH2. Same arguments → same files; skipped when done.
    """
    root = Path(root)
    settings = {"external": count, "seed": seed, "version": 1}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    refuse_foreign_files(root, marker)
    write_json(marker, {**settings, "complete": False})
    rng = np.random.default_rng(seed)
    cast = np.array([0.86, 0.97, 1.12], dtype=np.float32)
    for k in range(count):
        case = f"IMD{k + 1:03d}"
        image, mask = make_lesion_image(seed * 7_000_003 + k)
        size = (int(rng.integers(761, 769)), int(rng.integers(571, 577)))
        image, mask = image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)
        pixels = np.asarray(image, dtype=np.float32) / 255
        shifted = np.clip(255 * (pixels**1.15) * cast, 0, 255).astype(np.uint8)
        folder = root / PH2_FOLDER / case
        with atomic_path(folder / f"{case}_Dermoscopic_Image" / f"{case}.bmp") as tmp:
            Image.fromarray(shifted).save(tmp, format="BMP")
        lesion = mask.convert("RGB") if k % 4 == 3 else mask.convert("1")
        with atomic_path(folder / f"{case}_lesion" / f"{case}_lesion.bmp") as tmp:
            lesion.save(tmp, format="BMP")
    write_json(marker, settings)
    return root
