"""The frozen encoder's feature cache: with a frozen encoder and at most flip augmentation, the encoder's features
are computed once per image and flip variant, which gives the same result as encoding every batch (the encoder is
deterministic in eval mode) at a fraction of the cost; a ``FeatureStore`` shared by a run's seeds computes them once
for all seeds that start from the same encoder weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base.devices import autocast
from ..config.params import TrainConfig
from ..data.splits import ReportData
from ..model.inference import memory_formatted, to_input
from ..model.networks import SegmentationModel

FLIPS = ("hflip", "vflip")


def uses_feature_cache(model: SegmentationModel, config: TrainConfig) -> bool:
    return bool(
        config.feature_cache
        and model.freeze_encoder
        and set(config.augment) <= set(FLIPS)
        and config.style_mixing == "none"  # mixing changes the encoder's features every step
    )


def flip_variants(augment: Sequence[str]) -> list[tuple[bool, bool]]:
    """(hflip, vflip) combinations that ``augment`` can produce; index = hflip + 2 * vflip when both are on."""
    hs = (False, True) if "hflip" in augment else (False,)
    vs = (False, True) if "vflip" in augment else (False,)
    return [(h, v) for v in vs for h in hs]


@torch.no_grad()
def encode_all(
    model: SegmentationModel,
    images: torch.Tensor,
    precision: str,
    device: str,
    batch_size: int = 64,
    channels_last: bool = True,
    hflip: bool = False,
    vflip: bool = False,
) -> list[torch.Tensor]:
    """The frozen encoder's features for every image (after the given flips), on ``device``: a list with one
    ``N×C×h×w`` tensor per level the decoder reads (the deepest map alone, or the skips then the deepest)."""
    outputs: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if hflip:
            batch = batch.flip(-1)
        if vflip:
            batch = batch.flip(-2)
        with autocast(precision, device):
            features = model.encode(to_input(batch, model.spec, device, channels_last))
        features = [features] if torch.is_tensor(features) else features
        if not outputs:
            outputs = [torch.empty((len(images), *f.shape[1:]), dtype=f.dtype, device=f.device) for f in features]
        for store, feature in zip(outputs, features):
            store[start : start + len(feature)] = feature
    return outputs


def select_features(features: list[torch.Tensor], rows: torch.Tensor, channels_last: bool) -> list[torch.Tensor]:
    return [memory_formatted(level[rows.to(level.device)], channels_last) for level in features]


def cached_batch(
    cache: list[torch.Tensor], variants: torch.Tensor, rows: torch.Tensor, channels_last: bool
) -> list[torch.Tensor]:
    """Features for ``rows`` from the flip variant each image drew (``variants``: one index per row).

    ``cache`` holds one ``V×N×C×h×w`` tensor per level (V flip variants); one gather per level, on the cache's
    device, with nothing read back to the host.
    """
    return [memory_formatted(level[variants.to(level.device), rows.to(level.device)], channels_last) for level in cache]


def variant_index(draws: dict, count: int, horizontal_choices: int) -> torch.Tensor:
    """Index into ``flip_variants`` (ordered vflip-major): hflip + horizontal_choices * vflip."""
    h = draws.get("hflip", torch.zeros(count, dtype=torch.bool)).long()
    v = draws.get("vflip", torch.zeros(count, dtype=torch.bool)).long()
    return h + horizontal_choices * v


@dataclass
class Features:
    """The frozen encoder's cached features, each a list with one tensor per level the decoder reads
    (``train``: ``V×N×…``, one slice per flip variant), or all None."""

    train: list | None = None
    val: list | None = None
    test: list | None = None


class FeatureStore:
    """The frozen encoder's features, shared by the seeds of a run: keyed by the encoder's starting weights (their
    SHA-256) and everything else that decides the features, so seeds starting from the same weights compute them
    once, and seeds with their own random encoders each get their own. Holds one data set: make one per data set."""

    def __init__(self) -> None:
        self._features: dict[tuple, Features] = {}

    def get(self, model: SegmentationModel, data: ReportData, config: TrainConfig, precision: str) -> Features:
        key = (
            model.encoder_weights.get("sha256") or id(model),
            bool(getattr(model.decoder, "needs_skips", False)),
            tuple(flip_variants(config.augment)),
            config.monitor_test,
            precision,
            config.device,
            config.channels_last,
            id(data),
        )
        if key not in self._features:
            self._features[key] = encode_splits(model, data, config, precision)
        return self._features[key]


def encode_splits(model: SegmentationModel, data: ReportData, config: TrainConfig, precision: str) -> Features:
    """The frozen encoder's features: every training image in each flip variant, validation and (monitored) test."""
    model.eval()

    def encode(images):
        return encode_all(model, images, precision, config.device, config.eval_batch_size, config.channels_last)

    return Features(
        encode_variants(model, data.train.images, config, precision),
        encode(data.val.images),
        encode(data.test.images) if config.monitor_test else None,
    )


def encode_variants(
    model: SegmentationModel, images: torch.Tensor, config: TrainConfig, precision: str
) -> list[torch.Tensor]:
    """The training cache: per level, a ``V×N×…`` tensor of the features of every image in each of the V flip
    variants ``config.augment`` can draw (filled variant by variant, so there is never a second copy)."""
    variants = flip_variants(config.augment)
    stacked: list[torch.Tensor] = []
    for index, (h, v) in enumerate(variants):
        levels = encode_all(model, images, precision, config.device, config.eval_batch_size, config.channels_last, h, v)
        if not stacked:
            stacked = [
                torch.empty((len(variants), *level.shape), dtype=level.dtype, device=level.device) for level in levels
            ]
        for store, level in zip(stacked, levels):
            store[index] = level
    return stacked
