"""Tables (pandas) and writing outputs atomically to a run's folder.

Every file is written to a temporary name beside its target and renamed into place, so a killed run never
leaves a half-written table, figure, checkpoint or page that a later chapter would read.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .data import check_alignment
from .experiments import RunResult
from .files import save_table, write_text
from .model import IMAGENET_MEAN, IMAGENET_STD, count_parameters

# The student report's printed results (its Tables 2, 6 and 9), reproduced for comparison only.
STUDENT_REPORT = {
    "task1": {"iou": 0.5585, "dice": 0.7167, "accuracy": 0.8150},
    "task2": {"iou": 0.7165, "dice": 0.8348, "accuracy": 0.8973},
}


# ----------------------------------------------------------------------------- the report's tables

EPOCH_COLUMNS = {
    "epoch": "epoch",
    "train_loss": "train loss",
    "val_loss": "val loss",
    "val_iou_mean": "val IoU (mean/img)",
    "val_iou_pooled": "val IoU (pooled)",
    "val_dice_mean": "val Dice (mean/img)",
    "val_accuracy_mean": "val pixel acc (mean/img)",
    "test_loss": "test loss [monitor]",
    "test_iou_mean": "test IoU (mean/img) [monitor]",
    "test_iou_pooled": "test IoU (pooled) [monitor]",
    "test_dice_mean": "test Dice (mean/img) [monitor]",
    "test_accuracy_mean": "test pixel acc (mean/img) [monitor]",
    "epoch_seconds": "seconds",
}


def epoch_table(history: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch table (the report's Tables 1 and 5): losses, IoU, Dice and pixel accuracy per epoch.

    Test columns are labelled ``[monitor]``: they are printed as the report did, never used to choose.
    """
    present = [c for c in EPOCH_COLUMNS if c in history.columns]
    return history[present].rename(columns=EPOCH_COLUMNS)


def summary_table(history: pd.DataFrame, final_val: dict, final_test: dict, best_epoch: int) -> pd.DataFrame:
    """The summary (the report's Tables 2 and 6) in two blocks.

    ``over epochs``: mean losses and min / max / mean of the per-epoch IoU, Dice and accuracy, as the report
    printed them. ``selected``: the checkpoint chosen by validation IoU (epoch ``best_epoch``), scored once on the
    whole validation and test sets; these are the numbers to quote.
    """
    rows = []

    def monitor(split: str) -> str:  # a test number over epochs is what test-set selection would pick
        return " [monitor]" if split == "test" else ""

    for split in ("train", "val", "test"):
        if f"{split}_loss" in history:
            rows.append({"block": "over epochs", "quantity": f"mean {split} loss{monitor(split)}",
                         "value": history[f"{split}_loss"].mean()})
    for split in ("val", "test"):
        for name in ("iou", "dice"):
            column = f"{split}_{name}_mean"
            if column in history:
                for stat in ("min", "max", "mean"):
                    rows.append({"block": "over epochs", "quantity": f"{stat} {split} {name} (mean/img){monitor(split)}",
                                 "value": getattr(history[column], stat)()})
        if f"{split}_accuracy_mean" in history:
            rows.append({"block": "over epochs", "quantity": f"mean {split} pixel accuracy{monitor(split)}",
                         "value": history[f"{split}_accuracy_mean"].mean()})
    rows.append({"block": "selected", "quantity": "epoch chosen by validation IoU", "value": best_epoch})
    for split, values in (("val", final_val), ("test", final_test)):
        for key in ("loss", "iou_mean", "iou_pooled", "dice_mean", "dice_pooled", "accuracy_mean",
                    "sensitivity_mean", "specificity_mean"):
            if key in values:
                rows.append({"block": "selected", "quantity": f"{split} {key} (model resolution)", "value": values[key]})
        for key, value in values.items():
            if "original size" in key:
                rows.append({"block": "selected", "quantity": f"{split} {key}", "value": value})
    return pd.DataFrame(rows)


def parameter_table(module, name: str) -> pd.DataFrame:
    """Total / trainable / non-trainable parameters of ``module`` (the report's Tables 3, 4, 7, 8)."""
    counts = count_parameters(module)
    return pd.DataFrame([{"part": name, "total": counts["total"], "trainable": counts["trainable"],
                          "non-trainable": counts["non_trainable"]}])


def write_decoder_parameters(decoder, path: str | Path, max_values: int = 20) -> Path:
    """Write each decoder tensor's name, shape, statistics and first values to a text file (as the report did)."""
    lines = []
    for name, tensor in decoder.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.flatten().float()
        lines.append(f"{name}  shape={tuple(tensor.shape)}  mean={flat.mean():.6f}  std={flat.std(correction=0):.6f}  "
                     f"min={flat.min():.6f}  max={flat.max():.6f}")
        lines.append("  " + " ".join(f"{v:.5f}" for v in flat[:max_values].tolist()) + (" ..." if flat.numel() > max_values else ""))
    return write_text(path, "\n".join(lines) + "\n")


def report_vs_reproduction(ours: dict[str, dict]) -> pd.DataFrame:
    """The student report's numbers beside ours (task1, task2), with the method differences that explain them."""
    rows = []
    for task, theirs in STUDENT_REPORT.items():
        if task not in ours:
            continue
        mine = ours[task]
        rows.append({
            "task": task,
            "report IoU (max over epochs, last test batch)": theirs["iou"],
            "ours IoU (mean/img, whole test set, val-selected)": mine.get("iou_mean"),
            "ours IoU (pooled)": mine.get("iou_pooled"),
            "report Dice": theirs["dice"],
            "ours Dice (mean/img)": mine.get("dice_mean"),
            "report accuracy": theirs["accuracy"],
            "ours accuracy (mean/img)": mine.get("accuracy_mean"),
        })
    return pd.DataFrame(rows)


METHOD_DIFFERENCES = [
    ("Test metrics", "the last test batch only", "every test image, once",
     "a single batch of a few images is a noisy sample; ours averages the whole set"),
    ("Model selection", "max IoU over epochs on the test set", "best validation IoU; test scored once",
     "choosing on the test set inflates the number by the noise across epochs"),
    ("Frozen BatchNorm", "left in train mode (running stats drift)", "kept in eval mode",
     "task 1 then really is feature extraction with ImageNet statistics"),
    ("Input normalisation", "none", "ImageNet mean/std, as the weights expect",
     "the encoder sees inputs on the scale it was trained on"),
    ("Mask resizing", "bilinear (grey edge values)", "nearest-neighbour, binarised",
     "targets stay binary, so BCE and IoU are computed on true labels"),
    ("Threshold", "0.5 on raw logits (= probability 0.62)", "0.5 on probabilities",
     "a logit threshold of 0.5 shrinks every predicted lesion"),
    ("IoU averaging", "unstated (batch-level)", "mean per image and pooled, both labelled",
     "the challenge ranked by mean per-image Jaccard; pooled IoU is higher on large lesions"),
]


def method_differences_table() -> pd.DataFrame:
    return pd.DataFrame(METHOD_DIFFERENCES, columns=["aspect", "student report", "this reproduction", "effect"])


def counts_table(dataset) -> pd.DataFrame:
    """Images per split, with where the test set came from."""
    return pd.DataFrame([{"split": split, "images": count} for split, count in dataset.counts().items()]
                        + [{"split": "test source", "images": dataset.test_source}])


def size_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Distinct original sizes and how many images have each, most common first."""
    table = sizes.groupby(["width", "height"]).size().reset_index(name="images")
    return table.sort_values("images", ascending=False).reset_index(drop=True)


def pixel_stats_table(stats: dict) -> pd.DataFrame:
    """Per-channel mean/std of the training images beside ImageNet's."""
    return pd.DataFrame({"channel": ["R", "G", "B"], "mean (training images)": stats["mean"],
                         "std (training images)": stats["std"], "ImageNet mean": IMAGENET_MEAN,
                         "ImageNet std": IMAGENET_STD})


def alignment_summary(splits: dict) -> pd.DataFrame:
    """Per split: images checked, masks named for their image, empty or full masks, lesion darker than skin."""
    rows = []
    for name, split in splits.items():
        table = check_alignment(split)
        rows.append({
            "split": name, "images": len(table),
            "mask named for its image": int(table["mask_named_for_image"].sum()),
            "empty masks": int((table["lesion_fraction"] == 0).sum()),
            "full masks": int((table["lesion_fraction"] == 1).sum()),
            "lesion darker than skin": int(table["lesion_darker_than_skin"].sum()),
            "mean lesion fraction": table["lesion_fraction"].mean(),
        })
    return pd.DataFrame(rows)


def run_tables(run: RunResult) -> dict[str, pd.DataFrame]:
    """A training chapter's tables for its lowest seed, written under the run's ``tables/`` (and the decoder's
    parameters to ``decoder_parameters.txt``): ``epochs`` (Tables 1 / 5), ``summary`` (2 / 6), ``parameters``."""
    first = run.results[0]
    original = {f"{k} (original size)": v for k, v in first["test_orig"].items() if k.endswith("_mean")}
    write_decoder_parameters(run.model.decoder, run.run_dir / "decoder_parameters.txt")
    return {
        "epochs": save_table(epoch_table(run.history), run.run_dir, "epochs"),
        "summary": save_table(summary_table(run.history, first["val"], {**first["test"], **original},
                                            first["best_epoch"]), run.run_dir, "summary"),
        "parameters": save_table(pd.concat([parameter_table(run.model.encoder, "encoder"),
                                            parameter_table(run.model.decoder, "decoder"),
                                            parameter_table(run.model, "whole model")], ignore_index=True),
                                 run.run_dir, "parameters"),
    }
