"""Comparing finished runs: Table 9 (mean ± std over seeds), paired Wilcoxon tests on per-image Jaccard, each
run's headline scores, and the written reading generated from the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from ..base.files import signed
from ..scoring.metrics import seed_spread
from ..training.experiments import SavedRun, random_encoder
from . import failures

SPREAD_COLUMNS = {
    "test_iou_mean_orig": "JA / IoU (mean per image, original size)",
    "test_threshold_iou_mean_orig": "threshold JA (ISIC 2018: an image below 0.65 scores 0)",
    "test_iou_pooled_orig": "IoU (pooled pixels, original size)",
    "test_dice_mean_orig": "Dice (mean per image)",
    "test_accuracy_mean_orig": "pixel accuracy (mean per image)",
    "test_sensitivity_mean_orig": "sensitivity (mean per image)",
    "test_specificity_mean_orig": "specificity (mean per image)",
    "test_iou_mean_model_px": "IoU (mean per image, model resolution)",
}


MISSED_BELOW, MISSED_SHARE = 0.05, 0.9  # JA under 0.05 on 90% of test predictions or more: it learned nothing


def learned_nothing(per_image: Iterable[pd.DataFrame]) -> tuple[int, int] | None:
    """(predictions that miss the lesion, predictions) over every seed's per-image test table when at least
    ``MISSED_SHARE`` of them score JA below ``MISSED_BELOW`` (a frozen random encoder after a few epochs predicts
    empty masks or specks beside the lesion); None for a run that segments."""
    frames = [frame for frame in per_image if "iou" in frame]
    total = sum(len(frame) for frame in frames)
    missed = int(sum((frame["iou"] < MISSED_BELOW).sum() for frame in frames))
    return (missed, total) if total and missed >= MISSED_SHARE * total else None


def caveat(info: dict, per_image: Iterable[pd.DataFrame]) -> str:
    """What a reader must know before reading a run's scores: it learned nothing, or its encoder was random; ""."""
    nothing = learned_nothing(per_image)
    random = random_encoder(info)
    if nothing:
        return (
            f"learned nothing: its masks miss the lesion (JA < {MISSED_BELOW}) on {nothing[0]} of {nothing[1]} "
            "test predictions" + (" (its encoder is random: no ImageNet weights)" if random else "")
        )
    return "random encoder (no ImageNet weights): not transfer learning" if random else ""


def caveats(runs: dict[str, SavedRun]) -> dict[str, str]:
    """``caveat`` of every run that has one."""
    found = {name: caveat(run.info, run.per_image.values()) for name, run in runs.items()}
    return {name: text for name, text in found.items() if text}


def comparison_table(runs: dict[str, SavedRun]) -> pd.DataFrame:
    """Table 9: test scores of each run's validation-selected checkpoint, mean ± std over seeds."""
    rows = []
    for name, run in runs.items():
        row = {"run": name, "seeds": len(run.seeds)}
        for column, label in SPREAD_COLUMNS.items():
            if column not in run.seeds:  # a run trained before this score existed
                row[label] = "— (retrain to score)"
                continue
            values = run.seeds[column]
            row[label] = (
                f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_wilcoxon(a: pd.Series, b: pd.Series) -> tuple[pd.DataFrame, float, float]:
    """Join two per-image series on id; Wilcoxon signed-rank (W, p), or (nan, 1.0) when every pair is tied."""
    from scipy.stats import wilcoxon

    joined = pd.concat([a, b], axis=1, keys=["A", "B"]).dropna()
    if ((joined["B"] - joined["A"]) != 0).any():
        statistic, p_value = wilcoxon(joined["A"], joined["B"])
        return joined, float(statistic), float(p_value)
    return joined, float("nan"), 1.0


def wilcoxon_table(runs: dict[str, SavedRun], metric: str = "iou") -> pd.DataFrame:
    """Paired Wilcoxon signed-rank tests on per-image JA between every pair of runs.

    The main test pairs each image's score averaged over the run's seeds. With several seeds in common it is also
    run seed by seed (seed k of A against seed k of B) and the largest of those p-values is reported, so a reader
    sees whether the conclusion holds for every single training run and not only for the average.
    """

    def by_id(frame: pd.DataFrame) -> pd.Series:
        return frame.set_index("id")[metric]

    per_image = {
        name: pd.concat(list(run.per_image.values())).groupby("id")[metric].mean() for name, run in runs.items()
    }
    names = list(runs)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            joined, statistic, p_value = _paired_wilcoxon(per_image[a], per_image[b])
            difference = joined["B"] - joined["A"]
            row = {
                "A": a,
                "B": b,
                "images": len(joined),
                f"mean {metric} A": joined["A"].mean(),
                f"mean {metric} B": joined["B"].mean(),
                "mean B − A": difference.mean(),
                "B better on": f"{(difference > 0).mean():.0%} of images",
                "Wilcoxon W": statistic,
                "p-value": p_value,
            }
            common = sorted(set(runs[a].per_image) & set(runs[b].per_image))
            if len(common) > 1:
                row["p-value, worst single seed"] = max(
                    _paired_wilcoxon(by_id(runs[a].per_image[s]), by_id(runs[b].per_image[s]))[2] for s in common
                )
            spread = seed_spread(
                by_id(runs[b].per_image[s]).mean() - by_id(runs[a].per_image[s]).mean() for s in common
            )
            row["B − A per seed (mean ± std)"] = (
                f"{signed(spread['mean'], 4)} ± {spread['std']:.4f}"
                if spread["seeds"] > 1
                else signed(spread['mean'], 4)
            )
            row["against the seed spread"] = spread["verdict"]
            rows.append(row)
    return pd.DataFrame(rows)


def best_run(means: dict[str, float], learned_nothing_: set[str] | frozenset = frozenset()) -> str | None:
    """The run with the highest mean per-image JA on the test set (``means``) among those that learned to segment
    (not in ``learned_nothing_``); None when none did. The comparison chapter and the index both name it so."""
    segmenting = [name for name in means if name not in learned_nothing_]
    return max(segmenting, key=means.get) if segmenting else None


def written_reading(runs: dict[str, SavedRun], tests: pd.DataFrame) -> str:
    """A short reading of the comparison, generated from the numbers."""
    means = {name: run.seeds["test_iou_mean_orig"].mean() for name, run in runs.items()}
    lines = [
        f"- **{name}** {text}: its scores, and any test against it, say nothing about the method."
        for name, text in caveats(runs).items()
        if text.startswith("learned nothing")
    ]
    nothing = {name for name, run in runs.items() if learned_nothing(run.per_image.values())}
    best = best_run(means, nothing) or best_run(means)
    lines.append(f"- Best mean per-image Jaccard on the test set: **{best}** ({means[best]:.3f}).")
    for _, row in tests.iterrows():
        verdict = "a significant" if row["p-value"] < 0.05 else "no significant"
        lines.append(
            f"- {row['B']} vs {row['A']}: mean per-image JA changes by {signed(row['mean B − A'])} "
            f"({row['B better on']} improve); Wilcoxon p = {row['p-value']:.2g}, {verdict} difference at 0.05"
            + (
                f" (largest p over single seeds: {row['p-value, worst single seed']:.2g})."
                if pd.notna(row.get("p-value, worst single seed"))
                else "."
            )
        )
    spreads = {name: run.seeds["test_iou_mean_orig"].std(ddof=1) for name, run in runs.items() if len(run.seeds) > 1}
    if spreads:
        lines.append(
            "- Spread over seeds (std of mean JA): " + ", ".join(f"{n} {s:.3f}" for n, s in spreads.items()) + "."
        )
    else:
        lines.append(
            "- One seed per run: differences smaller than a few hundredths may be seed noise "
            "(set `seeds: [0, 1, 2]` for the spread)."
        )
    if all({"tp", "fp", "fn", "tn"} <= set(table) for run in runs.values() for table in run.per_image.values()):
        lines.append("\nWhere each run fails (per-image JA averaged over seeds; lesion area from the ground truth):\n")
        lines.append(failures.failure_reading({name: failures.seed_mean_frame(run) for name, run in runs.items()}))
    return "\n".join(lines)


def headline(run: SavedRun) -> dict[str, float]:
    """A run's test scores averaged over seeds (original size, challenge-style)."""
    return {
        "iou_mean": run.seeds["test_iou_mean_orig"].mean(),
        "iou_pooled": run.seeds["test_iou_pooled_orig"].mean(),
        "dice_mean": run.seeds["test_dice_mean_orig"].mean(),
        "accuracy_mean": run.seeds["test_accuracy_mean_orig"].mean(),
    }
