"""Where the models fail: each test image's Jaccard beside its lesion's area (the fraction of the image the ground
truth covers, at original size) and the image's original size; JA by lesion-size quartile; the worst images; and
sentences saying what these show. Everything is computed from the per-image test tables a run writes.
"""

from __future__ import annotations

import pandas as pd
from scipy.stats import spearmanr

from ..base.files import signed
from ..scoring.metrics import THRESHOLD_JACCARD
from ..training.experiments import SavedRun

FAIL_BELOW = THRESHOLD_JACCARD  # the ISIC 2018 rule: an image below this Jaccard counts as a failure


def per_image_frame(per_image: pd.DataFrame) -> pd.DataFrame:
    """A per-image test table with ``lesion_area`` (ground-truth pixels / all pixels, original size) and
    ``megapixels`` (original width × height) added."""
    table = per_image.copy()
    pixels = table[["tp", "fp", "fn", "tn"]].sum(axis=1)
    table["lesion_area"] = (table["tp"] + table["fn"]) / pixels
    table["megapixels"] = table["width"] * table["height"] / 1e6 if "width" in table else pixels / 1e6
    return table


def seed_mean_frame(run: SavedRun) -> pd.DataFrame:
    """``per_image_frame`` of the run's lowest seed, with ``iou`` averaged over every seed of the run (the ground
    truth, hence lesion area and size, is the same for every seed)."""
    seeds = sorted(run.per_image)
    table = per_image_frame(run.per_image[seeds[0]])
    table["iou"] = (
        pd.concat([run.per_image[s].set_index("id")["iou"] for s in seeds], axis=1)
        .mean(axis=1)
        .reindex(table["id"])
        .to_numpy()
    )
    return table


def size_quartiles(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """JA by lesion-size quartile: one row per quartile of lesion area (its range and image count), and for each
    run the mean JA and the share of images below ``FAIL_BELOW``. Quartiles come from the ground truth, so they are
    the same images for every run."""
    first = next(iter(frames.values()))
    quartile = pd.qcut(first["lesion_area"].rank(method="first"), 4, labels=False)
    rows = []
    for q in range(4):
        chosen = (quartile == q).to_numpy()
        areas = first["lesion_area"][chosen]
        row = {
            "lesion size": ["Q1 (smallest)", "Q2", "Q3", "Q4 (largest)"][q],
            "lesion area (% of image)": f"{100 * areas.min():.1f}–{100 * areas.max():.1f}",
            "images": int(chosen.sum()),
        }
        for name, frame in frames.items():
            scores = frame["iou"].to_numpy()[chosen]
            row[f"{name} JA"] = float(scores.mean())
            row[f"{name} JA < {FAIL_BELOW}"] = f"{(scores < FAIL_BELOW).mean():.0%}"
        rows.append(row)
    return pd.DataFrame(rows)


def worst(frame: pd.DataFrame, k: int = 6) -> pd.DataFrame:
    """The ``k`` test images with the lowest JA (id, JA, lesion area, megapixels), worst first."""
    return frame.nsmallest(k, "iou")[["id", "iou", "lesion_area", "megapixels"]].reset_index(drop=True)


def failure_reading(frames: dict[str, pd.DataFrame]) -> str:
    """What the failure analysis shows, one bullet per run, from the numbers."""
    lines = []
    quartiles = size_quartiles(frames)
    for name, frame in frames.items():
        failures = int((frame["iou"] < FAIL_BELOW).sum())
        line = (
            f"- **{name}**: {failures} of {len(frame)} test images ({failures / len(frame):.0%}) score JA below "
            f"{FAIL_BELOW}; mean JA {quartiles[f'{name} JA'].iloc[0]:.3f} on the smallest quarter of lesions "
            f"vs {quartiles[f'{name} JA'].iloc[-1]:.3f} on the largest"
        )
        if len(frame) >= 4 and frame["iou"].nunique() > 1:
            for column, label in (("lesion_area", "lesion area"), ("megapixels", "original image size")):
                if frame[column].nunique() > 1:
                    rho, p = spearmanr(frame[column], frame["iou"])
                    if p >= 0.05:
                        trend = "shows no clear trend with"
                    else:
                        trend = ("weakly " if abs(rho) < 0.3 else "") + ("rises with" if rho > 0 else "falls with")
                    line += f"; JA {trend} {label} (Spearman ρ {signed(rho, 2)}, p {p:.2g})"
        worst_row = frame.loc[frame["iou"].idxmin()]
        line += (
            f". Worst: {worst_row['id']} (JA {worst_row['iou']:.2f}, lesion {100 * worst_row['lesion_area']:.1f}% "
            f"of the image)."
        )
        lines.append(line)
    return "\n".join(lines)


OVER, UNDER = 1.3, 1 / 1.3  # a predicted mask this much larger (smaller) than the ground truth over- (under-)segments


def area_ratio(per_image: pd.DataFrame) -> pd.Series:
    """Each image's predicted-to-true lesion area, (TP + FP) / (TP + FN) at original size; NaN where the ground
    truth is empty (no ratio to speak of)."""
    true = per_image["tp"] + per_image["fn"]
    return ((per_image["tp"] + per_image["fp"]) / true.where(true > 0)).rename("area ratio")


def area_ratio_table(frames: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per (run, set): images, the median predicted-to-true area ratio, the share of masks over ``OVER``×
    and under ``UNDER``× the ground truth's area, and what that says (over- or under-segments, or neither)."""
    rows = []
    for (run, data), table in frames.items():
        ratio = area_ratio(table).dropna()
        median = float(ratio.median()) if len(ratio) else float("nan")
        over, under = float((ratio > OVER).mean()), float((ratio < UNDER).mean())
        verdict = (
            "over-segments"
            if median > 1.1 and over > under
            else "under-segments"
            if median < 0.9 and under > over
            else "neither, on the whole"
        )
        rows.append(
            {
                "run": run,
                "data": data,
                "images": int(len(ratio)),
                "median area ratio": median,
                f"> {OVER}×": f"{over:.0%}",
                f"< {UNDER:.2f}×": f"{under:.0%}",
                "reading": verdict,
            }
        )
    return pd.DataFrame(rows)


# The lesion's area as a share of the image (``per_image_frame``'s lesion_area), in the bins chapter 3 reads JA by: the
# later ISIC releases' lesions are smaller (median 12% of the image against 28% in ISIC 2016's training set).
AREA_BINS = (0.0, 0.05, 0.15, 0.50, 1.0)
AREA_LABELS = ("< 5%", "5–15%", "15–50%", "> 50%")


def lesion_area_table(frames: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per (run, set, lesion-area bin): how many images, their mean per-image JA, and the bin's share of the
    set; a row per (run, set) over all images ("all") with the set's median lesion area."""
    rows = []
    for (run, data), table in frames.items():
        area = per_image_frame(table)["lesion_area"]
        bins = pd.cut(area, AREA_BINS, labels=AREA_LABELS, include_lowest=True)
        for label in AREA_LABELS:
            chosen = table["iou"][bins == label]
            rows.append(
                {
                    "run": run,
                    "data": data,
                    "lesion area": label,
                    "images": int(len(chosen)),
                    "of the set": len(chosen) / len(table) if len(table) else float("nan"),
                    "JA": float(chosen.mean()) if len(chosen) else float("nan"),
                }
            )
        rows.append(
            {
                "run": run,
                "data": data,
                "lesion area": f"all (median {area.median():.0%})",
                "images": int(len(table)),
                "of the set": 1.0,
                "JA": float(table["iou"].mean()),
            }
        )
    return pd.DataFrame(rows)


def lesion_area_view(table: pd.DataFrame) -> pd.DataFrame:
    """``lesion_area_table`` as a page shows it: one row per run and set, a column per lesion-area bin reading
    "JA (images)"."""
    shown = table.assign(
        cell=["" if not n else f"{ja:.3f} ({n})" for ja, n in zip(table["JA"], table["images"])],
        column=[label if label in AREA_LABELS else "all" for label in table["lesion area"]],
    )
    medians = table[~table["lesion area"].isin(AREA_LABELS)].set_index(["run", "data"])["lesion area"]
    wide = shown.pivot_table(index=["run", "data"], columns="column", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(columns=[*AREA_LABELS, "all"]).fillna("")
    wide["median lesion area"] = [medians[key].removeprefix("all (median ").rstrip(")") for key in wide.index]
    return wide.reset_index()


def lesion_area_reading(table: pd.DataFrame) -> str:
    """Sentences from ``lesion_area_table``: per run and set, JA on the smallest lesions against the largest."""
    lines = []
    binned = table[table["lesion area"].isin(AREA_LABELS) & (table["images"] > 0)]
    for (run, data), rows in binned.groupby(["run", "data"], sort=False):
        if len(rows) < 2:
            continue
        small, large = rows.iloc[0], rows.iloc[-1]
        lines.append(
            f"{run} on {data}: JA {small['JA']:.3f} on lesions of {small['lesion area']} of the image "
            f"({small['images']} images) against {large['JA']:.3f} on {large['lesion area']} ({large['images']})."
        )
    return " ".join(lines)
