"""The confidence rule's pieces that need no torch: what counts as an uncertain pixel and as the boundary's band, and
the one-lesion check (one connected piece, clear of the image's border); and the largest-lesion post-processing. ``confidence`` scores with them in torch;
the ONNX predictor (``deploy.predictor``) in numpy, in a process without torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

UNCERTAIN = 0.8  # |2p − 1| below this (0.1 < p < 0.9) is an uncertain pixel
BAND = 2  # pixels either side of the predicted boundary
BORDER_FREE = 0.1  # the share of the image's border a plausible lesion leaves as background, at least


def one_lesion(mask: np.ndarray) -> float:
    """Share of the predicted lesion in its largest piece × the border check (1 while a tenth of the border is
    background, 0 when none is); 0 for an empty mask."""
    total = int(mask.sum())
    if total == 0:
        return 0.0
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    largest = np.bincount(labels.ravel())[1:].max() if count else 0
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(largest / total * min(1.0, (1 - border.mean()) / BORDER_FREE))


def largest_lesion(mask: np.ndarray) -> np.ndarray:
    """A binary ``H×W`` mask's largest 8-connected foreground piece, its holes filled (one lesion per dermoscopy
    image); an empty mask stays empty."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)
