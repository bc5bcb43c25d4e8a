"""Style mixing in the encoder while task 3 trains (MixStyle, Zhou et al., ICLR 2021): a domain-generalisation
augmentation in feature space. After each of the encoder's early blocks (strides 2, 4 and 8, the first three U-Net
skips) each image's per-channel feature mean and standard deviation, the "style" that a camera, a light or a site
leaves there, are replaced with a random mix of its own and those of another image of the batch; the content
(the normalised features) is kept. The network then sees styles between those of its training images, never only
the one clinic's; the later ISIC releases come from other sites and cameras than ISIC 2016's.

Training only: the mixing is a forward hook on those blocks for one step (``mixed_styles``), so validation, scoring,
checkpoints and ``predict`` run the plain network. Its random draws come from the training loop's seeded generator
(one number a batch), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..model.networks import SegmentationModel

# The paper's settings: mix with probability 0.5 at each block, λ ~ Beta(0.1, 0.1) (mostly near 0 or 1); the blocks
# whose outputs are the encoder's first three skips (the paper mixes after a ResNet's first three stages).
MIXSTYLE = {"probability": 0.5, "alpha": 0.1, "blocks": 3, "eps": 1e-6}


def draw_style_mixing(count: int, generator: torch.Generator, blocks: int = MIXSTYLE["blocks"]) -> list[dict] | None:
    """For one batch of ``count`` images: for each mixed block, None (not mixed this step) or λ (count) and the
    partner of each image (a permutation); None for a batch of one image, which has no partner."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if count < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(blocks):
        if rng.random() >= MIXSTYLE["probability"]:
            draws.append(None)
            continue
        lam = rng.beta(MIXSTYLE["alpha"], MIXSTYLE["alpha"], size=count).astype(np.float32)
        draws.append({"lam": torch.from_numpy(lam), "partner": torch.from_numpy(rng.permutation(count))})
    return draws


def mix_styles(features: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``features`` (N×C×H×W) with each image's per-channel mean and std replaced by λ · its own + (1 − λ) · its
    partner's; the statistics are not differentiated through (as in the paper)."""
    x = features.float()
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = (x.var(dim=(2, 3), keepdim=True) + MIXSTYLE["eps"]).sqrt().detach()
    lam = lam.to(x.device).view(-1, 1, 1, 1)
    partner = partner.to(x.device)
    mixed_mean = lam * mean + (1 - lam) * mean[partner]
    mixed_std = lam * std + (1 - lam) * std[partner]
    return ((x - mean) / std * mixed_std + mixed_mean).to(features.dtype)


@contextmanager
def mixed_styles(model: SegmentationModel, draws: list[dict] | None) -> Iterator[None]:
    """Within the block, the encoder's first ``len(draws)`` skip blocks mix their outputs' styles by ``draws``."""
    handles = []
    for index, draw in zip(model.spec.skip_indices, draws or []):
        if draw is not None:
            handles.append(
                model.encoder[index].register_forward_hook(
                    lambda module, inputs, output, draw=draw: mix_styles(output, draw["lam"], draw["partner"])
                )
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
