"""Which masks to trust, per run: how each seed's confidence (chosen on validation, see ``confidence``) flags the
images under the ISIC 2018 failure line on validation and on the test set, the calibration of its probabilities,
and the gallery pages that put every prediction in view. Read from what training saved (per-image tables with a
``confidence`` column, ``result.json``'s calibration), so the training and comparison chapters say the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..base.files import read_table, signed
from ..data.decoding import DecodedSplit
from ..scoring import confidence
from ..scoring.metrics import THRESHOLD_JACCARD
from ..training.experiments import SavedRun
from . import gallery
from .failures import per_image_frame

SETS = {"val": "validation", "test": "ISIC test"}


def calibrations(run_dir: Path) -> dict[int, dict]:
    """Each seed's calibration, as its ``result.json`` records it (seeds trained before it: left out)."""
    found = {}
    for path in sorted(Path(run_dir).glob("seed*/result.json")):
        result = json.loads(path.read_text())
        if "calibration" in result:
            found[int(result["seed"])] = result["calibration"]
    return found


def confidence_table(run_dir: Path, name: str) -> pd.DataFrame:
    """One row per seed and set (validation, ISIC test): Spearman ρ between confidence and JA, the AUROC for flagging
    JA < 0.65, the share flagged at the seed's threshold, and the flagged-vs-failed counts."""
    rows = []
    for seed, calibration in calibrations(run_dir).items():
        for split, label in SETS.items():
            table = read_table(run_dir, f"per_image_{split}_seed{seed}")
            if "confidence" in table:
                rows.append(
                    {
                        "run": name,
                        "set": label,
                        "seed": seed,
                        "confidence": calibration["confidence"],
                        **confidence.assessment(table["confidence"], table["iou"], calibration["flag_below"]),
                    }
                )
    return pd.DataFrame(rows)


def candidates_table(run_dir: Path, name: str) -> pd.DataFrame:
    """Each candidate's Spearman ρ with JA on validation, per seed (where the confidence was chosen)."""
    return pd.DataFrame(
        [
            {"run": name, "seed": seed, **calibration["validation_rho"], "kept": calibration["confidence"]}
            for seed, calibration in calibrations(run_dir).items()
        ]
    )


def calibration_table(run_dir: Path, name: str) -> pd.DataFrame:
    """Per seed: the temperature fitted on validation and whether it was kept, the pixel ECE before and after on
    validation and test, and how many test mask pixels it changed (always 0: a temperature keeps p > 0.5)."""
    return pd.DataFrame(
        [
            {
                "run": name,
                "seed": seed,
                "fitted T": c["fitted_temperature"],
                "kept T": c["temperature"],
                "ECE validation": c["ece_val"],
                "ECE validation, calibrated": c["ece_val_calibrated"],
                "ECE test": c["ece_test"],
                "ECE test, calibrated": c["ece_test_calibrated"],
                "test mask pixels changed": c.get("mask_pixels_changed", 0),
            }
            for seed, c in calibrations(run_dir).items()
        ]
    )


def trust_reading(trust: pd.DataFrame, calibration: pd.DataFrame) -> str:
    """What the confidence and calibration tables show, one bullet per run."""
    if trust.empty:
        return "No confidence recorded: these runs were trained before it. Rerun the training chapters."
    lines = []
    auroc = f"AUROC (JA < {THRESHOLD_JACCARD})"
    for name, rows in trust.groupby("run", sort=False):
        parts = []
        for label, group in rows.groupby("set", sort=False):
            parts.append(f"on {label} {_set_reading(group, auroc)}")
        cal = calibration[calibration["run"] == name]
        kept = cal[cal["kept T"] != 1.0]
        temperature = (
            f"a temperature of {kept['kept T'].mean():.2f} lowers the test ECE from "
            f"{kept['ECE test'].mean():.3f} to {kept['ECE test, calibrated'].mean():.3f}"
            if len(kept)
            else "no temperature lowered the validation ECE, so none is applied"
        )
        lines.append(f"- **{name}** ({rows['confidence'].iloc[0]}): " + "; ".join(parts) + f"; {temperature}.")
    return "\n".join(lines)


def _set_reading(group: pd.DataFrame, auroc: str) -> str:
    """One set's confidence in words: ρ, AUROC and the flagged failures, or why there is nothing to rank (every
    image failed, none did, or every mask had one confidence): never a ``nan``."""
    images = int(group["images"].sum())
    failed = int((group["failed & flagged"] + group["failed, not flagged"]).sum())
    caught, alarms = int(group["failed & flagged"].sum()), int(group["flagged, not failed"].sum())
    if failed == images:
        return (
            f"every image failed (JA < {THRESHOLD_JACCARD}): the confidence has no success to tell them from "
            f"({caught} of {failed} flagged)"
        )
    rho, value = group["Spearman ρ"].mean(), group[auroc].mean()
    rho = "ρ — (one confidence or one JA for every image)" if np.isnan(rho) else f"ρ {signed(rho, 2)}"
    value = "— (no failure)" if np.isnan(value) else f"{value:.2f}"
    return f"{rho}, AUROC {value}, {caught} of {failed} failures flagged with {alarms} false alarms"


# ----------------------------------------------------------------------------- galleries


def run_gallery(
    path: Path,
    name: str,
    test: DecodedSplit,
    probabilities,
    per_image: pd.DataFrame,
    flag_below: float | None,
    masks=None,
) -> Path:
    """A run's gallery: every test image with its ground truth and prediction (the lowest seed's)."""
    intro = (
        f"Every test image of <b>{name}</b> (its lowest seed): JA at original size, the confidence the run "
        "computes from its probabilities alone, the lesion's share of the image."
    )
    return gallery.write_gallery(
        path,
        f"{name} — every test prediction",
        intro,
        test.images,
        test.masks,
        test.ids,
        {
            name: {
                "masks": probabilities if masks is None else masks,
                "table": per_image_frame(per_image),
                "flag_below": flag_below,
            }
        },
    )


def compare_gallery(path: Path, test: DecodedSplit, runs: dict[str, SavedRun], masks: dict) -> Path:
    """Every test image with each run's prediction side by side (lowest seeds); sorted keys are means over runs."""
    entries = {}
    for name, run in runs.items():
        seed = int(run.seeds["seed"].iloc[0])
        entries[name] = {
            "masks": masks[name],
            "table": per_image_frame(run.per_image[seed]),
            "flag_below": calibrations(run.run_dir).get(seed, {}).get("flag_below"),
        }
    intro = (
        "Every test image, one thumbnail per run (" + ", ".join(runs) + "): JA and confidence per run; sorting "
        "uses the mean over runs."
    )
    return gallery.write_gallery(
        path, "Every test prediction, run by run", intro, test.images, test.masks, test.ids, entries
    )
