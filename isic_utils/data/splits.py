"""The data a run trains on: the training ids split into train and validation (seeded), the test set (official,
or held out from the training ids), each decoded once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .decoding import DecodedSplit, decode_pairs
from .sources import RELEASES, DataError, find_pairs

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
        raise DataError(
            f"cannot split {len(ids)} ids with val_fraction={val_fraction}: need at least one id each side."
        )
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
    release: str = "isic2016",
) -> ReportData:
    """Find, decode (once, cached) and split the data under ``root``.

    ``test_split="official"`` uses the official test folders; ``"holdout"`` holds back ``holdout_fraction`` of
    the training ids as the test set (for data that has no official test folders, such as development
    samples). ``limit`` keeps the first ``limit`` ids of each split (tiny runs). The validation split is taken
    from the remaining training ids with ``seed``; the holdout test split uses a fixed seed (1000) so that every
    seed of a study is scored on the same test images. With ``expected_counts`` (the official 900 / 379) and the
    official test split, other counts give a warning naming the folder: an incomplete copy or extraction.
    ``release`` (``sources.RELEASES``) names the archives' layout; one with an official validation split (ISIC 2017,
    2018) validates on it when the test set is official, as the challenge did, instead of splitting the training ids.
    """
    root, official = Path(root), RELEASES[release]
    train_pairs = find_pairs(root, "train", release)
    val_pairs = None
    if test_split == "official":
        test_pairs = find_pairs(root, "test", release)
        source = f"official {official.name} test set"
        found = {"train": len(train_pairs), "test": len(test_pairs)}
        if "validation" in official.folders:
            val_pairs = find_pairs(root, "validation", release)
            found["validation"] = len(val_pairs)
        if expected_counts and limit is None and found != {k: expected_counts[k] for k in found}:
            said = ", ".join(
                f"{found[k]} {'training' if k == 'train' else k} pairs ({official.name} has {expected_counts[k]})"
                for k in found
            )
            warnings.warn(
                f"{root} holds {said}. If this is not a subset on purpose, a copy or an extraction was incomplete: "
                f"delete the {', '.join(official.folders['train'])} … folders there and unzip the archives again "
                "(or set download: true).",
                stacklevel=2,
            )
    elif test_split == "holdout":
        rest, held = split_ids([p.id for p in train_pairs], holdout_fraction, seed=1000)
        by_id = {p.id: p for p in train_pairs}
        train_pairs, test_pairs = [by_id[i] for i in rest], [by_id[i] for i in held]
        source = f"held-out {holdout_fraction:.0%} of the training ids (no official test set used)"
    else:
        raise ValueError(f"test_split must be 'official' or 'holdout', got {test_split!r}")
    if limit is not None:
        train_pairs, test_pairs = train_pairs[:limit], test_pairs[: max(2, limit // 2)]
        val_pairs = val_pairs[: max(2, limit // 2)] if val_pairs else val_pairs
    train_all = decode_pairs(train_pairs, image_size, cache_dir, progress)
    test = decode_pairs(test_pairs, image_size, cache_dir, progress)
    if val_pairs:
        return ReportData(train_all, decode_pairs(val_pairs, image_size, cache_dir, progress), test, source, root)
    train_ids, val_ids = split_ids(train_all.ids, val_fraction, seed)
    return ReportData(train_all.subset(train_ids), train_all.subset(val_ids), test, source, root)
