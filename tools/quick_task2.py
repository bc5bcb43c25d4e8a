"""Train task 2 (the report's model, encoder fine-tuned) for a few epochs on ALL training ids under a folder,
split 80/20 into train/validation, and print validation IoU per epoch. A quick real-data check of the core package.

    ISIC_ENCODER_WEIGHTS=/path/mobilenet_v2_imagenet.pth \\
        python tools/quick_task2.py /path/to/isic2016-train-512 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isic_utils.base.devices import set_threads
from isic_utils.config.params import TrainConfig  # noqa: E402
from isic_utils.data.decoding import decode_pairs
from isic_utils.data.sources import find_pairs
from isic_utils.data.splits import ReportData, split_ids  # noqa: E402
from isic_utils.model.networks import build_model  # noqa: E402
from isic_utils.training.loop import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder with ISBI2016_ISIC_Part1_Training_Data/ and _GroundTruth/")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="imagenet", help="'imagenet' ($ISIC_ENCODER_WEIGHTS if set) or a path")
    args = parser.parse_args()
    set_threads()
    start = time.perf_counter()
    decoded = decode_pairs(find_pairs(args.root, "train"), 128, cache_dir=Path(tempfile.gettempdir()) / "isic-cache")
    train_ids, val_ids = split_ids(decoded.ids, 0.2, args.seed)
    val = decoded.subset(val_ids)
    # no test set here: the validation split stands in for it, and per-epoch test monitoring is off
    data = ReportData(
        decoded.subset(train_ids), val, val, "validation split (no test set in this check)", Path(args.root)
    )
    print(
        f"{len(decoded)} ids → {len(train_ids)} train / {len(val_ids)} validation; decoded in "
        f"{time.perf_counter() - start:.0f} s"
    )
    torch.manual_seed(args.seed)
    model = build_model(encoder_weights=args.weights, freeze_encoder=False)
    config = TrainConfig(freeze_encoder=False, epochs=args.epochs, seed=args.seed, monitor_test=False)
    result = fit(model, data, config, Path(tempfile.mkdtemp(prefix="quick-task2-")), resume=False)
    print(
        result.history[
            ["epoch", "train_loss", "val_loss", "val_iou_mean", "val_iou_pooled", "val_dice_mean", "epoch_seconds"]
        ].to_string(index=False)
    )
    print(f"best epoch {result.best_epoch}; total {(time.perf_counter() - start) / 60:.1f} min ({result.precision})")


if __name__ == "__main__":
    main()
